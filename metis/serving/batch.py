"""One `generate` call for several users: per-row routing, limits, stops and token streams.

Rows share one left-padded batch (prompting.left_pad) and one transformers `generate` call; the
attention, KV cache and padding are transformers'. What stays per row is ours: its routing (the
router pools over its own prompt tokens; `Routing.rows` holds each row's mode and threshold),
its thinking budget, its token limit, its Stop, and where its tokens go. A row that ends (end of
answer, its limit, Stop, deadline) stops streaming at once and its consumer is released; its slot
in the batch is padded by `generate` until every row is done, since transformers cannot drop a
row from a running batch.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from transformers import LogitsProcessor, StoppingCriteria, StopStringCriteria
from transformers.generation.streamers import BaseStreamer

from ..routing import Routing
from ..streaming import IncrementalDecoder, OutputParser
from .interface import GenerationSettings


@dataclass(frozen=True)
class Prefilled:
    """Sent to a row once the prefill has routed it: row `sample` of the batch's `routing`."""

    routing: Routing
    sample: int
    input_ids: torch.Tensor  # the batch's padded prompt ids; routing.prompt_mask picks this row's


@dataclass(frozen=True)
class RowEnd:
    """The last message of a row: why it stopped, and the error if the batch failed."""

    reason: str  # "eos", "end_of_answer", "max_new_tokens", "deadline", "cancelled", "out_of_memory" or "error"
    error: BaseException | None = None  # without its traceback, whose frames would keep the batch's tensors


@dataclass(eq=False)
class Row:
    """One request inside a batch. Its consumer reads `out`: a `Prefilled`, lists of token ids,
    then one `RowEnd`."""

    inputs: dict[str, torch.Tensor]  # one built prompt (PromptBuilder.build)
    settings: GenerationSettings
    cancel: threading.Event = field(default_factory=threading.Event)
    router: dict | None = None  # a session's fine-tuned gates, for this request only
    out: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)
    # what its consumer already has, kept across an out-of-memory retry (engine.Engine._run_batch)
    sent: list[int] = field(default_factory=list)  # token ids delivered
    routed: bool = False  # its `Prefilled` was delivered
    ended: bool = False  # its `RowEnd` was delivered
    deadline: float | None = None  # perf_counter time; set when it first runs

    def route(self, prefilled: Prefilled) -> None:
        if not self.routed:
            self.routed = True
            self.out.put(prefilled)

    def end(self, end: RowEnd) -> None:
        if not self.ended:
            self.ended = True
            self.out.put(end)

    @property
    def prompt_tokens(self) -> int:
        return self.inputs["input_ids"].shape[1]

    def key(self) -> tuple:
        """Rows with equal keys can share a `generate` call: same decoding rule, same gates.
        A seeded sampled request runs alone, so its seed reproduces its answer."""
        s = self.settings
        seeded = id(self) if s.seed is not None else None  # a seed of 0 is a seed too
        sampling = ("greedy",) if s.temperature == 0 else ("sample", s.temperature, s.top_p, seeded)
        return (*sampling, s.mode == "token", id(self.router) if self.router is not None else None)


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
        """The token this row must take next, given the tokens generated since the last call (only
        those cross to the host: a whole answer per step would grow quadratically)."""
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


class RowBudgets(LogitsProcessor):
    """Each row's `ThinkingBudget` (None: no budget) applied to its own scores; one host read of
    the batch's newest tokens per step."""

    def __init__(self, budgets: list[ThinkingBudget | None], prompt_len: int):
        self.budgets, self.prompt_len = budgets, prompt_len

    def __call__(self, input_ids, scores):
        last = input_ids[:, -1].tolist() if input_ids.shape[1] > self.prompt_len else None
        for row, budget in enumerate(self.budgets):
            if budget is not None and (token := budget.forced([] if last is None else [last[row]])) is not None:
                scores[row] = float("-inf")
                scores[row, token] = 0.0
        return scores


class Replay(LogitsProcessor):
    """After an out-of-memory retry, each row first regenerates the tokens its user already has
    (`Row.sent`): forced, so a sampled row continues its own answer rather than a new one."""

    def __init__(self, rows: list[Row], prompt_len: int):
        self.sent, self.prompt_len = [r.sent for r in rows], prompt_len

    def __call__(self, input_ids, scores):
        step = input_ids.shape[1] - self.prompt_len
        for row, sent in enumerate(self.sent):
            if step < len(sent):
                scores[row] = float("-inf")
                scores[row, sent[step]] = 0.0
        return scores


class RowStreamer(BaseStreamer):
    """`generate` pushes each step's tokens here; each live row's tokens go to its own queue.

    `RowStops` decides at which step a row ends; its tokens up to that step are delivered, then its
    `RowEnd`. transformers hands tokens over after the stopping check, and may hand them a step
    late (its deferred stop check), so rows end by step count, never by arrival order.
    Ids are handed over in small batches, at most one handoff per `FLUSH_S`: a thread handoff per
    token cost ~7% of a fast model's decode speed (bench/streaming.py), while 10 ms is invisible
    to a reader and a model slower than that still hands over every token at once.
    """

    FLUSH_S = 0.01

    def __init__(self, rows: list[Row], on_prefill: Callable[[], None]):
        self.rows, self.on_prefill = rows, on_prefill
        self.replayed = [len(r.sent) for r in rows]  # steps its consumer already has (a retry)
        self.ends: list[tuple[int, str] | None] = [None] * len(rows)  # (last step, reason) once decided
        self.done = [False] * len(rows)  # its RowEnd is sent
        self.step = 0
        self._pending: list[list[int]] = [[] for _ in rows]
        self._prompt_seen = False
        self._last_flush = 0.0

    def stop(self, row: int, step: int, reason: str) -> None:
        if self.ends[row] is None:
            self.ends[row] = (step, reason)

    def put(self, value):
        if not self._prompt_seen:  # generate() first hands over the prompt
            self._prompt_seen = True
            return
        if self.step == 0:  # the first token follows the prefill, which routed every row
            self.on_prefill()
        self.step += 1
        for row, token in enumerate(value.reshape(len(self.rows), -1)[:, 0].tolist()):
            if self.done[row]:
                continue
            if self.step > self.replayed[row]:
                self._pending[row].append(token)
            if self.ends[row] is not None and self.ends[row][0] <= self.step:
                self.finish(row, self.ends[row][1])
        now = time.perf_counter()
        if now - self._last_flush >= self.FLUSH_S:
            self._last_flush = now
            for row in range(len(self.rows)):
                self._flush(row)

    def finish(self, row: int, reason: str, error: BaseException | None = None) -> None:
        """End one row now: its last tokens, then its `RowEnd`."""
        if not self.done[row]:
            self._flush(row)
            self.done[row] = True
            self.rows[row].end(RowEnd(reason, error))

    def end(self):
        for row in range(len(self.rows)):
            self._flush(row)

    def _flush(self, row: int) -> None:
        if self._pending[row]:
            self.rows[row].sent += self._pending[row]
            self.rows[row].out.put(self._pending[row])
            self._pending[row] = []


@dataclass(frozen=True)
class StopRules:
    """What ends any answer on this model: its end tokens, and a one-token `</answer>`
    (`close_ids`) or transformers' matcher for a longer one."""

    eos_ids: list[int]
    close_ids: list[int]
    stop_strings: StopStringCriteria | None


def stop_reason(last: int, generated: int, settings: GenerationSettings, rules: StopRules, *,
                closed_by_string: bool, cancelled: bool, late: bool) -> str | None:
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


def generate_arguments(rows: list[Row], rules: StopRules, pad_id: int) -> dict:
    """The `generate` settings a batch shares (rows share them by `Row.key`)."""
    first = rows[0].settings
    sampling = (dict(do_sample=True, temperature=first.temperature, top_p=first.top_p)
                if first.temperature > 0 else dict(do_sample=False))
    return dict(max_new_tokens=max(r.settings.max_new_tokens for r in rows), eos_token_id=rules.eos_ids + rules.close_ids,
                pad_token_id=pad_id, use_cache=True, top_k=None, **sampling)


class RowStops(StoppingCriteria):
    """Every row's own reasons to stop, checked after each step (its tokens are streamed up to
    that step: `RowStreamer.stop`); `between_steps` runs there too (the scheduler lets
    routing-only calls use the model between two decode steps)."""

    def __init__(self, rows: list[Row], streamer: RowStreamer, prompt_len: int, rules: StopRules,
                 between_steps: Callable[[], None]):
        self.rows, self.streamer, self.prompt_len, self.rules = rows, streamer, prompt_len, rules
        self.between_steps = between_steps

    def __call__(self, input_ids, scores, **kwargs):
        generated = input_ids.shape[1] - self.prompt_len
        last = input_ids[:, -1].tolist()
        by_string = (self.rules.stop_strings(input_ids, scores).tolist() if self.rules.stop_strings
                     else [False] * len(last))
        now = time.perf_counter()
        for row, r in enumerate(self.rows):
            if self.streamer.ends[row] is None and (reason := stop_reason(
                    last[row], generated, r.settings, self.rules, closed_by_string=by_string[row],
                    cancelled=r.cancel.is_set(), late=now >= r.deadline)):
                self.streamer.stop(row, generated, reason)
        self.between_steps()
        return torch.tensor([end is not None for end in self.streamer.ends], device=input_ids.device)
