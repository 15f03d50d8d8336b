"""The local engine: messages + settings -> routed, streamed answer events, many users on one model.

request -> prompt (prompting.py) -> waits for a batch (scheduler.py) -> one prefill that routes
every row (modeling.py) -> decode, rows together (batch.py) -> token ids -> text -> parser ->
events (streaming.py). All per-request state lives in the call and its `Row`; the model's own
state (Qwen2.5-VL's rope offsets, the loaded gates) is only touched by whoever holds the slot.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from transformers import LogitsProcessorList, StoppingCriteriaList, StopStringCriteria

from ..budget import RequestLimits, fit, prompt_limit
from ..explain import explain
from ..finetune.data import Example
from ..finetune.export import check_router
from ..finetune.features import Features, feature_steps
from ..loading import LoadedModel
from ..prompting import Message, PromptBuilder, left_pad
from ..routing import RoutingTrace
from ..sizing import decode_tokens_per_s
from ..streaming import (
    ANSWER_CLOSE,
    THINK_CLOSE,
    Done,
    Event,
    Failed,
    GenerationStats,
    IncrementalDecoder,
    Notice,
    OutputParser,
    Progress,
    Routed,
)
from .batch import Prefilled, Row, RowBudgets, RowEnd, RowStops, RowStreamer, StopRules, ThinkingBudget, generate_arguments
from .interface import Answer, GenerationSettings, ModelDescription, collect
from .scheduler import BatchLimits, ModelSlot, Scheduler
from .tuning import RouterProbe, save_checkpoint


class Engine:
    available, error = True, None  # serving/interface.py: a loaded engine has no load error

    def __init__(self, loaded: LoadedModel, batch: BatchLimits | None = None):
        model, tokenizer = loaded.model, loaded.tokenizer
        self.model = model
        self.tokenizer = tokenizer
        self.info = loaded.info
        self.prompts = PromptBuilder(
            tokenizer, loaded.image_processor, loaded.prompt_config, system_prompt=model.config.system_prompt
        )
        # control tokens never reach the text; the tags stay (single special tokens in small vocabularies)
        tags = {"<think>", "</think>", "<answer>", "</answer>"}
        self.hidden_ids = {i for t, i in zip(tokenizer.all_special_tokens, tokenizer.all_special_ids) if t not in tags}
        # the chat turn's end and whatever else the checkpoint ends on (Qwen: also <|endoftext|>)
        configured = model.generation_config.eos_token_id
        configured = configured if isinstance(configured, list) else [configured] if configured is not None else []
        self.eos_ids = sorted({tokenizer.convert_tokens_to_ids("<|im_end|>"), *configured})
        # Nothing after </answer> is shown, so generating on would only keep Stop waiting. Where the
        # tag is one token it stops like an end of sequence (a set lookup per step); where it spans
        # several (Qwen2.5's vocabulary) transformers' stop-string matcher finds it, built once here.
        answer_close = tokenizer(ANSWER_CLOSE, add_special_tokens=False)["input_ids"]
        one_token = len(answer_close) == 1
        self.close_ids = tokenizer(THINK_CLOSE, add_special_tokens=False)["input_ids"]
        self.limits = RequestLimits.from_env()  # prompt tokens and seconds per request (metis/budget.py)
        self.stops = StopRules(self.eos_ids, answer_close if one_token else [],
                               None if one_token else StopStringCriteria(tokenizer, [ANSWER_CLOSE]))
        self.batch = batch or BatchLimits.from_env()
        self.slot = ModelSlot()
        self.scheduler = Scheduler(self._generate, self.batch, self.slot)
        self.shipped_router = {k: v.clone() for k, v in model.router_state_dict().items()}
        self._gates_of = None  # the session router whose gates are loaded; None: the shipped ones

    @property
    def concurrency(self) -> int:
        """Answers in flight: one batch; later ones wait in the app's queue."""
        return self.batch.max_batch

    @classmethod
    def load(cls, spec: str | None = None, batch: BatchLimits | None = None, **kwargs) -> "Engine":
        from ..loading import load

        return cls(load(spec, **kwargs), batch=batch)

    # -- what the UI shows and fine-tuning uses (serving/interface.py) ---------------------------
    @property
    def default_threshold(self) -> float:
        return self.model.config.routing_threshold

    def describe(self) -> ModelDescription:
        info = self.info
        return ModelDescription(info.to_dict() if info else {}, getattr(info, "attn_implementation", None),
                                self.limits, self.batch, decode_tokens_per_s(info) if info else None)

    def features(self, examples: list[Example], cache_dir: str | Path | None = None) -> Iterator[int | Features]:
        return feature_steps(RouterProbe(self), examples, cache_dir)

    def check_router(self, router: dict) -> None:
        check_router(self.model, router)

    def save_model(self, router: dict, out: str | Path) -> Path:
        return save_checkpoint(self, router, out)

    # -- routing only -------------------------------------------------------------------------
    def route(self, messages: list[Message], mode: str = "auto", threshold: float | None = None,
              router: dict | None = None) -> RoutingTrace:
        """The routing decision of a query: one prefill pass, no token generated. It runs in the
        caller's thread, between two decode steps of a running batch if there is one."""
        settings = GenerationSettings(mode=mode, threshold=threshold)
        messages, _ = self._within_limits(messages)
        inputs = self._on_device(self.prompts.build(messages))
        routing = self._routing(inputs, [settings])
        language = self.model.model
        with self.slot.hold(), self._gates(router), torch.inference_mode():
            offsets = language.rope_deltas  # a paused batch's; this prefill would overwrite them
            try:
                self.model(**inputs, routing=routing, use_cache=False, logits_to_keep=1)
            finally:
                language.rope_deltas = offsets
        return self._explained(Prefilled(routing, 0, inputs["input_ids"]), inputs)

    # -- streaming ------------------------------------------------------------------------------
    def stream(self, messages: list[Message], settings: GenerationSettings | None = None,
               cancel: threading.Event | None = None, router: dict | None = None) -> Iterator[Event]:
        """Events of one answer. Setting `cancel` (or closing the iterator) ends this answer at
        the next decode step; the other answers in its batch go on unchanged.

        `router` (router weights from fine-tuning) applies to this call only, so a session can
        chat with its own router while others keep the shipped one.
        """
        settings = settings or GenerationSettings()
        start = time.perf_counter()
        messages, note = self._within_limits(messages)
        if note:
            yield Notice(note)
        row = Row(self.prompts.build(messages), settings, cancel or threading.Event(), router)
        self.scheduler.submit(row)
        decoder = IncrementalDecoder(self.tokenizer, self.hidden_ids)
        parser = OutputParser()
        tokens = thinking = 0
        ttft = None
        try:
            while not isinstance(item := row.out.get(), RowEnd):
                if isinstance(item, Prefilled):
                    ttft = time.perf_counter() - start
                    yield Routed(self._explained(item, row.inputs))
                    continue
                for token in item:
                    tokens += 1
                    # one Progress per token that shows nothing: the events follow from the
                    # tokens alone, never from how the handoff happened to batch them
                    if not (events := parser.feed(decoder.push(token))):
                        events = [Progress(tokens)]
                    yield from events
                    thinking += parser.in_reasoning
            yield from parser.finish()
        finally:
            row.cancel.set()  # a consumer that stops early (closed browser tab) frees its row
        total = time.perf_counter() - start
        stats = GenerationStats(ttft or total, total, tokens, thinking, item.reason)
        if item.error is not None:
            yield Failed(f"Generation failed: {type(item.error).__name__}: {item.error}", stats)
        else:
            yield Done(stats)

    def run(self, messages: list[Message], settings: GenerationSettings | None = None, **kwargs) -> Answer:
        return collect(self.stream(messages, settings, **kwargs))

    # -- one batch --------------------------------------------------------------------------------
    def _generate(self, rows: list[Row]) -> None:
        """One `generate` call for `rows` (the scheduler's worker thread, holding the slot)."""
        batch = left_pad([r.inputs for r in rows], self.tokenizer.pad_token_id)
        inputs = self._on_device(batch)
        prompt_len = inputs["input_ids"].shape[1]
        routing = self._routing(inputs, [r.settings for r in rows])
        streamer = RowStreamer(rows, lambda: [r.out.put(Prefilled(routing, i, batch["input_ids"])) for i, r in enumerate(rows)])
        budgets = [None if r.settings.thinking_budget is None else
                   ThinkingBudget(r.settings.thinking_budget, self.close_ids, IncrementalDecoder(self.tokenizer, self.hidden_ids))
                   for r in rows]
        stops = RowStops(rows, streamer, prompt_len, self.stops, self.limits.max_seconds, self.slot.pause)
        error = None
        try:
            with self._gates(rows[0].router), torch.inference_mode():
                if rows[0].settings.seed is not None:
                    torch.manual_seed(rows[0].settings.seed)
                self.model.generate(
                    **inputs, routing=routing, streamer=streamer,
                    logits_processor=LogitsProcessorList([RowBudgets(budgets, prompt_len)] if any(budgets) else []),
                    stopping_criteria=StoppingCriteriaList([stops]),
                    **generate_arguments(rows, self.stops, self.tokenizer.pad_token_id),
                )
        except BaseException as exc:  # every row still open reports it as a Failed event
            error = exc
        streamer.end()
        for i, end in enumerate(streamer.ends):  # without an error, a row still open reached the token limit
            streamer.finish(i, "error" if error else end[1] if end else "max_new_tokens", error)

    # -- helpers --------------------------------------------------------------------------------
    def _routing(self, inputs: dict, settings: list[GenerationSettings]):
        """One routing for a batch: the router pools over each row's own prompt (padding
        excluded), and each row keeps its mode and threshold."""
        default = self.model.config.routing_threshold
        rows = tuple((s.mode, default if s.threshold is None else s.threshold) for s in settings)
        token = settings[0].mode == "token"  # the scheduler never mixes token mode with the others
        return self.model.new_routing("token" if token else "auto", rows[0][1],
                                      prompt_mask=inputs["attention_mask"].bool(), rows=None if token else rows)

    def _explained(self, prefilled: Prefilled, inputs: dict) -> RoutingTrace:
        routing, sample = prefilled.routing, prefilled.sample
        return explain(routing.trace(sample), routing, prefilled.input_ids, self.tokenizer,
                       image_token_id=self.model.config.image_token_id,
                       image_grid_thw=inputs.get("image_grid_thw"), merge=self.prompts.merge, sample=sample)

    def prompt_limit(self) -> int:
        """Prompt tokens one request may send: the server's setting, lowered to the model's context."""
        return prompt_limit(self.limits, getattr(self.model.config.get_text_config(), "max_position_embeddings", None))

    def _within_limits(self, messages: list[Message]):
        """The messages within this server's prompt budget (metis/budget.py), and a note if trimmed."""
        return fit(self.prompts, messages, self.prompt_limit(), self.limits.overflow)

    def _on_device(self, tensors: dict) -> dict:
        return {k: v.to(self.model.device) for k, v in tensors.items()}

    @contextlib.contextmanager
    def _gates(self, router: dict | None):
        """Inside, the model routes with `router`'s gates (None: the shipped ones). Callers hold
        the slot; a routing call paused into a batch puts the batch's gates back when done."""
        previous = self._gates_of
        if router is not previous:
            self._load_gates(router)
        try:
            yield
        finally:
            if router is not previous:
                self._load_gates(previous)

    def _load_gates(self, router: dict | None) -> None:
        self.model.load_state_dict(self.shipped_router if router is None else router, strict=False)
        self._gates_of = router
