"""The engine: messages + settings -> routed, streamed answer events.

request -> prompt (prompting.py) -> one prefill that also routes (modeling.py) -> decode in a
worker thread -> token ids -> text -> parser -> events (streaming.py). One engine serves many
users; all per-request state lives in the call. Calls on one model run one at a time: besides
CPU/GPU contention, transformers keeps Qwen2.5-VL's rope offsets on the module between steps.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from transformers import LogitsProcessor, LogitsProcessorList, MaxTimeCriteria, StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from .budget import RequestLimits, fit, prompt_limit
from .explain import explain
from .prompting import Message, PromptBuilder
from .routing import MODES, RoutingTrace
from .streaming import (
    ANSWER_CLOSE,
    THINK_CLOSE,
    AnswerDelta,
    Done,
    Event,
    Failed,
    GenerationStats,
    IncrementalDecoder,
    Notice,
    OutputParser,
    Progress,
    ReasoningDelta,
    Routed,
)


@dataclass(frozen=True)
class GenerationSettings:
    """What a user may set per request. Out-of-range values are refused, never clamped."""

    mode: str = "auto"
    threshold: float | None = None  # None: the model's configured threshold
    max_new_tokens: int = 1024
    thinking_budget: int | None = None  # close the reasoning after this many tokens
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    seed: int | None = None

    LIMITS = {"max_new_tokens": (1, 16384), "temperature": (0.0, 2.0), "top_p": (0.01, 1.0)}

    def __post_init__(self):
        problems = []
        if self.mode not in MODES:
            problems.append(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.threshold is not None and not 0.0 <= self.threshold <= 1.0:
            problems.append(f"threshold must be within [0, 1], got {self.threshold}")
        for name, (lo, hi) in self.LIMITS.items():
            value = getattr(self, name)
            if not lo <= value <= hi:
                problems.append(f"{name} must be within [{lo}, {hi}], got {value}")
        if self.thinking_budget is not None and not 1 <= self.thinking_budget <= 16384:
            problems.append(f"thinking_budget must be within [1, 16384] or empty, got {self.thinking_budget}")
        if problems:
            raise ValueError("; ".join(problems))


@dataclass
class Answer:
    """A whole answer, for callers that do not stream (evaluation, tests, the CLI's `--json`)."""

    reasoning: str = ""
    answer: str = ""
    trace: RoutingTrace | None = None
    stats: GenerationStats | None = None
    error: str | None = None


class _TokenQueue(BaseStreamer):
    """`generate` pushes token ids here from its thread; the consumer reads them as they come.

    Ids are handed over in small batches, at most one handoff per `FLUSH_S`: a thread handoff per
    token cost ~7% of a fast model's decode speed (bench/streaming.py), while 10 ms is invisible
    to a reader and a model slower than that still hands over every token at once.
    """

    FLUSH_S = 0.01

    def __init__(self):
        self.queue: queue.SimpleQueue = queue.SimpleQueue()
        self._prompt_seen = False
        self._pending: list[int] = []
        self._last_flush = None

    def put(self, value):
        if not self._prompt_seen:  # generate() first hands over the prompt
            self._prompt_seen = True
            return
        self._pending.append(int(value.reshape(-1)[0]))
        now = time.perf_counter()
        if self._last_flush is None or now - self._last_flush >= self.FLUSH_S:
            self.queue.put(self._pending)
            self._pending, self._last_flush = [], now

    def end(self):
        if self._pending:
            self.queue.put(self._pending)
            self._pending = []
        self.queue.put(None)


class _Cancelled(StoppingCriteria):
    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids, scores, **kwargs):
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


class ThinkingBudget(LogitsProcessor):
    """After `budget` generated tokens with the reasoning still open, force `</think>` (one token
    per step when it spans several) so the model moves on to its answer.

    The model's own close is read from the decoded text, as the parser reads it (`decoder`: an
    `IncrementalDecoder`): in a real vocabulary it arrives as other tokens than the forced ones
    (Qwen2.5: `'</' 'think' '>\n'`, or `'></' 'think' '><'` in `<think></think><answer>`)."""

    def __init__(self, budget: int, prompt_len: int, close_ids: list[int], decoder: IncrementalDecoder | None = None):
        self.budget, self.prompt_len, self.close = budget, prompt_len, close_ids
        self.decoder, self.parser, self.read = decoder, OutputParser(), 0
        self.closed = False

    def __call__(self, input_ids, scores):
        generated = input_ids[0, self.prompt_len :].tolist()
        if self.decoder is not None:
            for token in generated[self.read :]:
                self.parser.feed(self.decoder.push(token))
            self.read = len(generated)
            self.closed |= self.parser.state not in ("start", "think")  # past </think>, or no reasoning
        if generated[-len(self.close) :] == self.close:
            self.closed = True  # fully forced
        if self.closed or len(generated) < self.budget:
            return scores
        done = next((n for n in range(len(self.close) - 1, 0, -1) if generated[-n:] == self.close[:n]), 0)
        forced = torch.full_like(scores, float("-inf"))
        forced[:, self.close[done]] = 0.0
        return forced


class Engine:
    def __init__(self, model, tokenizer, image_processor, prompt_config=None, info=None):
        self.model = model
        self.tokenizer = tokenizer
        self.info = info
        self.prompts = PromptBuilder(
            tokenizer, image_processor, prompt_config, system_prompt=model.config.system_prompt
        )
        # control tokens never reach the text; the tags stay (single special tokens in small vocabularies)
        tags = {"<think>", "</think>", "<answer>", "</answer>"}
        self.hidden_ids = {i for t, i in zip(tokenizer.all_special_tokens, tokenizer.all_special_ids) if t not in tags}
        # the chat turn's end and whatever else the checkpoint ends on (Qwen: also <|endoftext|>)
        configured = model.generation_config.eos_token_id
        configured = configured if isinstance(configured, list) else [configured] if configured is not None else []
        self.eos_ids = sorted({tokenizer.convert_tokens_to_ids("<|im_end|>"), *configured})
        # nothing after </answer> is shown, so generating on would only keep Stop waiting
        if model.generation_config.stop_strings is None:
            model.generation_config.stop_strings = [ANSWER_CLOSE]
        self.close_ids = tokenizer(THINK_CLOSE, add_special_tokens=False)["input_ids"]
        self._lock = threading.Lock()
        self.limits = RequestLimits.from_env()  # prompt tokens and seconds per request (metis/budget.py)

    @classmethod
    def load(cls, spec: str | None = None, **kwargs) -> "Engine":
        from .loading import load

        return cls(*load(spec, **kwargs))

    # -- routing only -------------------------------------------------------------------------
    def route(self, messages: list[Message], mode: str = "auto", threshold: float | None = None,
              router: dict | None = None) -> RoutingTrace:
        """The routing decision of a query: one prefill pass, no token generated."""
        settings = GenerationSettings(mode=mode, threshold=threshold)
        messages, _ = self._within_limits(messages)
        inputs = self._inputs(messages)
        routing = self.model.new_routing(settings.mode, settings.threshold)
        with self._lock, self._router(router), torch.inference_mode():
            self.model(**inputs, routing=routing, use_cache=False, logits_to_keep=1)
        return self._explained(routing, inputs)

    # -- streaming ------------------------------------------------------------------------------
    def stream(self, messages: list[Message], settings: GenerationSettings | None = None,
               cancel: threading.Event | None = None, router: dict | None = None) -> Iterator[Event]:
        """Events of one answer. Setting `cancel` stops generation within a step or two.

        `router` (router weights from fine-tuning) applies to this call only, so a session can
        chat with its own router while others keep the shipped one.
        """
        settings = settings or GenerationSettings()
        cancel = cancel or threading.Event()
        start = time.perf_counter()
        messages, note = self._within_limits(messages)
        if note:
            yield Notice(note)
        inputs = self._inputs(messages)
        routing = self.model.new_routing(settings.mode, settings.threshold)
        streamer = _TokenQueue()
        processors = LogitsProcessorList()
        if settings.thinking_budget is not None:
            processors.append(ThinkingBudget(settings.thinking_budget, inputs["input_ids"].shape[1], self.close_ids,
                                             IncrementalDecoder(self.tokenizer, self.hidden_ids)))
        sampling = (
            dict(do_sample=True, temperature=settings.temperature, top_p=settings.top_p)
            if settings.temperature > 0
            else dict(do_sample=False)
        )
        failure: list[BaseException] = []

        def work():
            try:
                with self._lock, self._router(router), torch.inference_mode():
                    if settings.seed is not None:
                        torch.manual_seed(settings.seed)
                    self.model.generate(
                        **inputs,
                        routing=routing,
                        streamer=streamer,
                        max_new_tokens=settings.max_new_tokens,
                        logits_processor=processors,
                        stopping_criteria=StoppingCriteriaList([_Cancelled(cancel), MaxTimeCriteria(self.limits.max_seconds)]),
                        eos_token_id=self.eos_ids,
                        pad_token_id=self.tokenizer.pad_token_id,
                        tokenizer=self.tokenizer,  # for the generation config's stop strings
                        use_cache=True,
                        top_k=None,
                        **sampling,
                    )
            except BaseException as exc:  # reported to the consumer as a Failed event
                failure.append(exc)
                streamer.end()

        worker = threading.Thread(target=work, name="metis-generate", daemon=True)
        worker.start()
        decoder = IncrementalDecoder(self.tokenizer, self.hidden_ids)
        parser = OutputParser()
        tokens = thinking = 0
        ttft = None
        last = None
        try:
            while (batch := streamer.queue.get()) is not None:
                if ttft is None:
                    ttft = time.perf_counter() - start
                    yield Routed(self._explained(routing, inputs))
                shown = False
                for token in batch:
                    tokens += 1
                    # one Progress per token that shows nothing: the events follow from the
                    # tokens alone, never from how the handoff happened to batch them
                    if not (events := parser.feed(decoder.push(token))):
                        events = [Progress(tokens)]
                    yield from events
                    thinking += parser.in_reasoning
                last = batch[-1]
            yield from parser.finish()
        finally:
            cancel.set()  # a consumer that stops early (closed browser tab) stops the worker too
            worker.join()
        total = time.perf_counter() - start
        if failure:
            reason = "error"
        elif last in self.eos_ids:
            reason = "eos"
        elif parser.closed:
            reason = "end_of_answer"
        elif tokens >= settings.max_new_tokens:
            reason = "max_new_tokens"
        elif total >= self.limits.max_seconds:
            reason = "deadline"
        else:
            reason = "cancelled"
        stats = GenerationStats(ttft or total, total, tokens, thinking, reason)
        if failure:
            yield Failed(f"Generation failed: {type(failure[0]).__name__}: {failure[0]}", stats)
        else:
            yield Done(stats)

    def run(self, messages: list[Message], settings: GenerationSettings | None = None, **kwargs) -> Answer:
        out = Answer()
        for event in self.stream(messages, settings, **kwargs):
            match event:
                case Routed(trace):
                    out.trace = trace
                case ReasoningDelta(text):
                    out.reasoning += text
                case AnswerDelta(text):
                    out.answer += text
                case Done(stats):
                    out.stats = stats
                case Failed(message, stats):
                    out.error, out.stats = message, stats
        out.answer = out.answer.strip()
        return out

    # -- helpers --------------------------------------------------------------------------------
    def _explained(self, routing, inputs: dict) -> RoutingTrace:
        return explain(routing.trace(), routing, inputs["input_ids"], self.tokenizer,
                       image_token_id=self.model.config.image_token_id,
                       image_grid_thw=inputs.get("image_grid_thw"), merge=self.prompts.merge)

    def _within_limits(self, messages: list[Message]):
        """The messages within this server's prompt budget (metis/budget.py), and a note if trimmed."""
        context = getattr(self.model.config.get_text_config(), "max_position_embeddings", None)
        limit = prompt_limit(self.limits, context)
        return fit(self.prompts, messages, limit, self.limits.overflow)

    def _inputs(self, messages: list[Message]) -> dict:
        device = self.model.device
        return {k: v.to(device) for k, v in self.prompts.build(messages).items()}

    @contextlib.contextmanager
    def _router(self, router: dict | None):
        """Temporarily load other router weights; callers hold the engine lock."""
        if router is None:
            yield
            return
        own = self.model.router_state_dict()
        saved = {k: v.clone() for k, v in own.items()}
        self.model.load_state_dict(router, strict=False)
        try:
            yield
        finally:
            self.model.load_state_dict(saved, strict=False)
