"""The running batch: rows join between two decode steps and leave the moment they end.

Iteration-level scheduling, as vLLM, TGI and SGLang do it, over transformers' model forward and
`DynamicCache` (its continuous batching takes text token lists only: no images, no routing).
Rows that join are prefilled together (left-padded, prompting.left_pad); the prefill routes them
(the router pools over each row's own prompt) and fills a cache that is then left-padded to the
running rows' length and concatenated with theirs. Each step feeds every row its last token at
its own Qwen2.5-VL (mrope) position, kept per row as rows come and go, so a row's positions never
depend on who else is in the batch. A row that ends is dropped from the cache
(`batch_select_indices`) and columns no row attends to any more are cut off the left.

What stays per row: its expert, settings, thinking budget, sampling generator, stops, deadline,
Stop and token stream. An out-of-memory error frees the batch and sends its rows back to wait;
each resumes where its user is (`Row.sent` is replayed), so every answer is the one it would be
alone.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers import DynamicCache, StopStringCriteria, TemperatureLogitsWarper, TopPLogitsWarper

from ..prompting import left_pad
from ..routing import Routing, RoutingRecord
from ..streaming import IncrementalDecoder, OutputParser
from .requests import GenerationSettings, Prefilled, Row, RowEnd, StopReason


class ThinkingBudget:
    """After `budget` generated tokens with the reasoning still open, force `</think>` (one token
    per step when it spans several) so the model moves on to its answer.

    The model's own close is read from the decoded text, as the parser reads it (`decoder`: an
    `IncrementalDecoder`): in a real vocabulary it arrives as other tokens than the forced ones
    (Qwen2.5: `'</' 'think' '>\\n'`, or `'></' 'think' '><'` in `<think></think><answer>`)."""

    def __init__(self, budget: int, close_ids: list[int], decoder: IncrementalDecoder | None = None):
        self.budget, self.close = budget, close_ids
        self.decoder, self.parser = decoder, OutputParser()
        self.generated, self.tail = 0, []  # tokens so far, and the last len(close) of them
        self.closed = False

    def forced(self, new: list[int]) -> int | None:
        """The token this row must take next, given the tokens generated since the last call."""
        self.generated += len(new)
        self.tail = (self.tail + new)[-len(self.close) :]
        if self.decoder is not None:
            for token in new:
                self.parser.feed(self.decoder.push(token))
            self.closed |= self.parser.state not in ("start", "think")  # past </think>, or no reasoning
        if self.tail == self.close:
            self.closed = True  # fully forced
        if self.closed or self.generated < self.budget:
            return None
        done = next((n for n in range(len(self.close) - 1, 0, -1) if self.tail[-n:] == self.close[:n]), 0)
        return self.close[done]


@dataclass(frozen=True)
class StopRules:
    """What ends any answer on this model: its end tokens, and a one-token `</answer>`
    (`close_ids`) or transformers' matcher for a longer one."""

    eos_ids: list[int]
    close_ids: list[int]
    stop_strings: StopStringCriteria | None
    stop_tail: int = 8  # tokens of an answer's end the matcher reads


def stop_reason(last: int, generated: int, settings: GenerationSettings, rules: StopRules, *,
                closed_by_string: bool, cancelled: bool, late: bool) -> StopReason | None:
    """Why a row ends after this step, or None while it goes on; the first reason that holds."""
    if last in rules.eos_ids:
        return "eos"
    if last in rules.close_ids or closed_by_string:
        return "end_of_answer"
    if generated >= settings.max_new_tokens:
        return "max_new_tokens"
    if cancelled:
        return "cancelled"
    return "deadline" if late else None


@dataclass(eq=False)
class Live:
    """A row while it decodes: what the batch keeps for it beside its cache rows."""

    row: Row
    expert: int  # its expert, for every decode step (query modes)
    position: int  # the mrope position of the token it feeds next
    budget: ThinkingBudget | None
    generator: torch.Generator | None  # a seeded row's own random stream
    generated: list[int] = field(default_factory=list)  # this run's tokens, replayed ones included
    pending: list[int] = field(default_factory=list)  # chosen, not yet handed to its consumer

    def forced(self) -> int | None:
        """Replayed tokens first (its user has them), then its thinking budget."""
        step = len(self.generated)
        budget = self.budget.forced(self.generated[-1:]) if self.budget is not None else None
        return self.row.sent[step] if step < len(self.row.sent) else budget


class RunningBatch:
    """Rows decoding together on one model. `join` prefills newcomers into it, `step` decodes
    one token for every row and drops the rows that ended; both run in the scheduler's thread
    while it holds the model."""

    FLUSH_S = 0.01  # hand tokens to consumers at most this often: one handoff per token cost ~7%

    def __init__(self, model, rules: StopRules, pad_id: int, max_seconds: float,
                 new_routing: Callable[[torch.Tensor, list[Row]], Routing],
                 new_budget: Callable[[GenerationSettings], ThinkingBudget | None]):
        self.model, self.rules, self.pad_id, self.max_seconds = model, rules, pad_id, max_seconds
        # from the engine: a prefill's routing (prompt mask, rows) and a row's thinking budget
        self.new_routing, self.new_budget = new_routing, new_budget
        self.live: list[Live] = []
        self.cache: DynamicCache | None = None
        self.mask: torch.Tensor | None = None  # [rows, cache length]: 0 where a row has no token
        self.last: torch.Tensor | None = None  # [rows] each row's newest token, fed next step
        self._flushed = 0.0

    def __len__(self) -> int:
        return len(self.live)

    @property
    def length(self) -> int:
        return 0 if self.mask is None else self.mask.shape[1]

    @property
    def key(self) -> str | None:
        return self.live[0].row.key() if self.live else None

    def remaining(self) -> int:
        """The most tokens any row may still add."""
        return max((lv.row.settings.max_new_tokens - len(lv.generated) for lv in self.live), default=0)

    # -- rows join ---------------------------------------------------------------------------------
    @torch.inference_mode()
    def join(self, rows: list[Row]) -> None:
        """Prefill `rows` together, route them, choose their first tokens and add them."""
        now = time.perf_counter()
        for row in rows:  # no answer holds the model longer than max_seconds, retries included
            row.deadline = row.deadline or now + self.max_seconds
        batch = left_pad([r.inputs for r in rows], self.pad_id)
        device = self.model.device
        inputs = {k: v.to(device) for k, v in batch.items()}
        positions, _ = self.model.model.get_rope_index(
            inputs["input_ids"], image_grid_thw=inputs.get("image_grid_thw"),
            attention_mask=inputs["attention_mask"], mm_token_type_ids=inputs["mm_token_type_ids"])
        routing = self.new_routing(inputs["attention_mask"].bool(), rows)
        cache = DynamicCache(config=self.model.config)
        logits = self.model(**inputs, position_ids=positions, cache=cache, routing=routing, use_cache=True,
                            logits_to_keep=1).logits[:, -1]
        experts = routing.record.expert_ids or [-1] * len(rows)  # token mode routes every step
        following = (positions.amax(dim=(0, 2)) + 1).tolist()
        joined = [Live(r, e, p, self.new_budget(r.settings), _generator(r.settings, device))
                  for r, e, p in zip(rows, experts, following)]
        for i, lv in enumerate(joined):
            lv.row.route(Prefilled(routing, i, batch["input_ids"]))
        self._merge(joined, cache, inputs["attention_mask"])
        self._advance(logits, first=len(self.live) - len(joined))

    def _merge(self, joined: list[Live], cache: DynamicCache, mask: torch.Tensor) -> None:
        """Left-pad the running rows' cache or the newcomers' to the longer one, then stack them."""
        if self.cache is None:
            self.live, self.cache, self.mask = joined, cache, mask
            self.last = torch.empty(0, dtype=torch.long, device=mask.device)
            return
        width = max(self.length, mask.shape[1])
        layers = [(torch.cat([_pad_left(a.keys, width), _pad_left(b.keys, width)]),
                   torch.cat([_pad_left(a.values, width), _pad_left(b.values, width)]))
                  for a, b in zip(self.cache.layers, cache.layers)]
        merged = DynamicCache(config=self.model.config)
        for i, (keys, values) in enumerate(layers):
            merged.update(keys, values, i)
        self.cache = merged
        self.mask = torch.cat([_pad_left(self.mask, width), _pad_left(mask, width)])
        self.live += joined

    # -- one step -------------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> None:
        """One token for every row, each at its own position, on its own expert."""
        rows = len(self.live)
        self.mask = F.pad(self.mask, (0, 1), value=1)
        positions = torch.tensor([lv.position for lv in self.live], device=self.mask.device).view(1, rows, 1)
        mode = "token" if self.key == "token" else "auto"  # auto: the decided expert of each row
        routing = Routing(mode=mode, gates=[lv.row.gates for lv in self.live],
                          record=RoutingRecord(decided=True, expert_ids=[lv.expert for lv in self.live]))
        logits = self.model(input_ids=self.last.view(rows, 1), attention_mask=self.mask,
                            position_ids=positions.expand(3, rows, 1), cache=self.cache, routing=routing,
                            use_cache=True, logits_to_keep=1).logits[:, -1]
        for lv in self.live:
            lv.position += 1
        self._advance(logits, first=0)

    def _advance(self, logits: torch.Tensor, first: int) -> None:
        """Choose the next token of rows `first:` from their logits, deliver it, and drop the rows
        that ended."""
        live = self.live[first:]
        # the generation config's floor (bench.common.fixed_length sets it), as transformers keeps
        # it: no end token before `min_new_tokens`
        floor = self.model.generation_config.min_new_tokens or 0
        if short := [i for i, lv in enumerate(live) if len(lv.generated) < floor]:
            ends = self.rules.eos_ids + self.rules.close_ids
            rows, ends = torch.tensor(short, device=logits.device), torch.tensor(ends, device=logits.device)
            logits[rows.unsqueeze(1), ends] = float("-inf")
        greedy = logits.argmax(-1).tolist()  # one host read for the batch
        chosen = []
        for lv, scores, best in zip(live, logits, greedy):
            token = lv.forced()
            if token is None:
                token = best if lv.row.settings.temperature == 0 else _sample(scores, lv.row.settings, lv.generator)
            chosen.append(token)
            lv.generated.append(token)
            if len(lv.generated) > len(lv.row.sent):  # a replayed token is already its user's
                lv.pending.append(token)
        self.last = torch.cat([self.last[:first], torch.tensor(chosen, device=self.last.device)])
        ended = {i: reason for i, lv in enumerate(self.live) if i >= first and (reason := self._stop(lv))}
        now = time.perf_counter()
        flush = now - self._flushed >= self.FLUSH_S
        if flush:
            self._flushed = now
        for i, lv in enumerate(self.live):
            if flush or i in ended:
                lv.row.deliver(lv.pending)
                lv.pending = []
            if i in ended:
                lv.row.end(RowEnd(ended[i]))
        if ended:
            self._keep([i for i in range(len(self.live)) if i not in ended])

    def _stop(self, lv: Live) -> StopReason | None:
        rules, tokens = self.rules, lv.generated
        by_string = False
        if rules.stop_strings is not None:
            tail = torch.tensor([tokens[-rules.stop_tail :]])
            by_string = bool(rules.stop_strings(tail, None)[0])
        return stop_reason(tokens[-1], len(tokens), lv.row.settings, rules, closed_by_string=by_string,
                           cancelled=lv.row.cancel.is_set(), late=time.perf_counter() >= lv.row.deadline)

    def _keep(self, keep: list[int]) -> None:
        """Only the rows `keep`; columns no row attends to any more leave the cache's left."""
        self.live = [self.live[i] for i in keep]
        if not keep:
            self.cache = self.mask = self.last = None
            return
        index = torch.tensor(keep, device=self.mask.device)
        self.cache.batch_select_indices(index)
        self.mask, self.last = self.mask.index_select(0, index), self.last.index_select(0, index)
        unused = int(self.mask.any(0).int().argmax())  # leading columns masked in every row
        if unused:
            self.mask = self.mask[:, unused:]
            for layer in self.cache.layers:
                layer.keys, layer.values = layer.keys[:, :, unused:], layer.values[:, :, unused:]

    # -- the batch ends -----------------------------------------------------------------------------
    def release(self) -> list[Row]:
        """After an out-of-memory error: every row's chosen tokens to its user, the cache dropped,
        and the rows back to the caller to wait again."""
        rows = []
        for lv in self.live:
            lv.row.deliver(lv.pending)
            rows.append(lv.row)
        self.live, self.cache, self.mask, self.last = [], None, None, None
        return rows

    def fail(self, error: BaseException) -> None:
        """Every row ends with `error` (its traceback dropped: its frames hold the cache)."""
        error = error.with_traceback(None)
        for lv in self.release():
            lv.end(RowEnd("error", error))


def _pad_left(x: torch.Tensor, width: int) -> torch.Tensor:
    """`x` ([rows, ..., length, dim] cache or [rows, length] mask) zero-padded on the left to `width`."""
    missing = width - (x.shape[-2] if x.dim() == 4 else x.shape[-1])
    if not missing:
        return x
    return F.pad(x, (0, 0, missing, 0) if x.dim() == 4 else (missing, 0))


def _generator(settings: GenerationSettings, device: torch.device) -> torch.Generator | None:
    """A seeded sampled row draws from its own generator, so its answer is the same in any batch."""
    if settings.temperature == 0 or settings.seed is None:
        return None
    return torch.Generator(device).manual_seed(settings.seed)


def _sample(scores: torch.Tensor, settings: GenerationSettings, generator: torch.Generator | None) -> int:
    scores = TemperatureLogitsWarper(settings.temperature)(None, scores[None].float())
    if settings.top_p < 1:
        scores = TopPLogitsWarper(settings.top_p)(None, scores)
    return int(torch.multinomial(scores.softmax(-1), 1, generator=generator))
