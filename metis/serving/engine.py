"""The local engine: messages + settings -> routed, streamed answer events, many users on one model.

request -> prompt (prompting.py) -> joins the running batch between two steps (scheduler.py) ->
a prefill that routes it (modeling.py) -> decode beside the other rows (batch.py) -> token ids ->
text -> parser -> events (streaming.py). All per-request state lives in the call and its `Row`
(its settings, its router's gates, what its user already has); the model holds none of it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import torch
from transformers import StopStringCriteria

from ..budget import RequestLimits, fit, prompt_limit
from ..explain import explain
from ..finetune.data import Example
from ..finetune.export import check_router
from ..finetune.features import Features, feature_steps
from ..loading import LoadedModel, zero_gpu
from ..prompting import Message, PromptBuilder
from ..routing import RouterWeights, RoutingTrace
from ..sizing import RUNTIME_RESERVE_GIB, decode_tokens_per_s, kv_bytes_per_token
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
from .batch import RunningBatch, StopRules, ThinkingBudget
from .interface import Answer, ModelDescription, collect
from .requests import BatchLimits, GenerationSettings, Prefilled, Row, RowEnd
from .scheduler import ModelSlot, Scheduler
from .tuning import RouterProbe, save_checkpoint


class Engine:
    available, error = True, None  # serving/interface.py: a loaded engine has no load error

    def __init__(self, loaded: LoadedModel, batch: BatchLimits | None = None, limits: RequestLimits | None = None,
                 decode_tokens_per_s: float | None = None):
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
        self.limits = limits or RequestLimits()  # prompt tokens and seconds per request (metis/budget.py)
        self.measured_rate = decode_tokens_per_s  # measured decode rate, for ZeroGPU's reservations
        self.stops = StopRules(self.eos_ids, answer_close if one_token else [],
                               None if one_token else StopStringCriteria(tokenizer, [ANSWER_CLOSE]),
                               stop_tail=len(answer_close) + 2)
        self.batch = kv_token_budget(model, batch or BatchLimits())
        self.slot = ModelSlot()
        self.scheduler = Scheduler(self._new_batch, self.batch, self.slot)
        self.gate_names = list(model.router_state_dict())  # one per MoE layer, in layer order

    @property
    def concurrency(self) -> int:
        """Answers in flight: the running batch; later ones wait in the app's queue. On ZeroGPU one: each
        call is its own GPU reservation in its own worker, which moves the weights in, so calls
        never meet in a batch and parallel ones only multiply the reservations."""
        return 1 if zero_gpu() else self.batch.max_batch

    @classmethod
    def load(cls, spec: str | None = None, batch: BatchLimits | None = None, limits: RequestLimits | None = None,
             decode_tokens_per_s: float | None = None, **kwargs) -> Engine:
        """`spec`'s checkpoint (None: loading.load_default); `kwargs` go to loading.load. A server
        passes its settings here (metis/settings.py, `Settings.engine_options`)."""
        from ..loading import load, load_default

        loaded = load(spec, **kwargs) if spec else load_default(**kwargs)
        return cls(loaded, batch, limits, decode_tokens_per_s)

    # -- what the UI shows and fine-tuning uses (serving/interface.py) ---------------------------
    @property
    def default_threshold(self) -> float:
        return self.model.config.routing_threshold

    def describe(self) -> ModelDescription:
        info = self.info
        rate = decode_tokens_per_s(info, self.measured_rate) if info else None
        return ModelDescription(info.to_dict() if info else {}, getattr(info, "attn_implementation", None),
                                self.limits, self.batch, rate)

    def features(self, examples: list[Example], cache_dir: str | Path | None = None) -> Iterator[int | Features]:
        return feature_steps(RouterProbe(self), examples, cache_dir)

    def check_router(self, router: RouterWeights) -> None:
        check_router(self.model, router)

    def save_model(self, router: RouterWeights, out: str | Path) -> Path:
        return save_checkpoint(self, router, out)

    # -- routing only -------------------------------------------------------------------------
    def route(self, messages: list[Message], mode: str = "auto", threshold: float | None = None,
              router: RouterWeights | None = None) -> RoutingTrace:
        """The routing decision of a query: one prefill pass, no token generated. It runs in the
        caller's thread, between two decode steps of a running batch if there is one."""
        settings = GenerationSettings(mode=mode, threshold=threshold)
        messages, _ = self._within_limits(messages)
        inputs = self._on_device(self.prompts.build(messages))
        routing = self._routing(inputs["attention_mask"].bool(), [settings], [self._gate_stack(router)])
        with self.slot.hold(), torch.inference_mode():
            self.model(**inputs, routing=routing, use_cache=False, logits_to_keep=1)
        return self._explained(Prefilled(routing, 0, inputs["input_ids"]), inputs)

    # -- streaming ------------------------------------------------------------------------------
    def stream(self, messages: list[Message], settings: GenerationSettings | None = None,
               cancel: threading.Event | None = None, router: RouterWeights | None = None) -> Iterator[Event]:
        """Events of one answer. Setting `cancel` (or closing the iterator) ends this answer at
        the next decode step; the other answers in its batch go on unchanged.

        `router` (router weights from fine-tuning) applies to this call only, so a session can
        chat with its own router while others keep the shipped one.
        """
        settings = settings or GenerationSettings()
        start = time.perf_counter()
        messages, note = self._within_limits(messages)
        row = Row(self.prompts.build(messages), settings, cancel or threading.Event(), self._gate_stack(router))
        self._check_fits(row)
        if note:
            yield Notice(note)
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
        if item.reason == "out_of_memory":
            yield Failed(f"The GPU ran out of memory for this answer, even alone ({row.prompt_tokens} prompt tokens, "
                         f"up to {settings.max_new_tokens} new ones): lower max_new_tokens, send fewer or smaller "
                         "images, or start a shorter conversation.", stats)
        elif item.error is not None:
            yield Failed(f"Generation failed: {type(item.error).__name__}: {item.error}", stats)
        else:
            yield Done(stats)

    def run(self, messages: list[Message], settings: GenerationSettings | None = None, **kwargs) -> Answer:
        return collect(self.stream(messages, settings, **kwargs))

    # -- the running batch (scheduler.py runs it) ---------------------------------------------
    def _new_batch(self) -> RunningBatch:
        def budget(settings: GenerationSettings) -> ThinkingBudget | None:
            if settings.thinking_budget is None:
                return None
            decoder = IncrementalDecoder(self.tokenizer, self.hidden_ids)
            return ThinkingBudget(settings.thinking_budget, self.close_ids, decoder)

        return RunningBatch(self.model, self.stops, self.tokenizer.pad_token_id, self.limits.max_seconds,
                            lambda mask, rows: self._routing(mask, [r.settings for r in rows], [r.gates for r in rows]),
                            budget)

    # -- helpers --------------------------------------------------------------------------------
    def _routing(self, prompt_mask: torch.Tensor, settings: list[GenerationSettings], gates: list):
        """One routing for a prefill: the router pools over each row's own prompt (padding
        excluded), and each row keeps its mode, threshold and router."""
        default = self.model.config.routing_threshold
        rows = tuple((s.mode, default if s.threshold is None else s.threshold) for s in settings)
        token = settings[0].mode == "token"  # the scheduler never mixes token mode with the others
        return self.model.new_routing("token" if token else "auto", rows[0][1], prompt_mask=prompt_mask,
                                      rows=None if token else rows, gates=gates)

    def _gate_stack(self, router: RouterWeights | None) -> tuple[torch.Tensor, ...] | None:
        """A session's router weights (name -> tensor) as one gate per MoE layer, in layer order."""
        return None if router is None else tuple(router[name] for name in self.gate_names)

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

    def _check_fits(self, row: Row) -> None:
        """Refuse, with the numbers, a request whose KV cache could never fit, even alone."""
        length = row.prompt_tokens + row.settings.max_new_tokens
        if not self.batch.kv_fits(1, length):
            raise ValueError(
                f"This request needs room for {length:,} tokens of KV cache ({row.prompt_tokens:,} prompt + "
                f"{row.settings.max_new_tokens:,} new), and this server has room for {self.batch.max_kv_tokens:,}: "
                "lower max_new_tokens, or send a shorter conversation or smaller images.")

    def _on_device(self, tensors: dict) -> dict:
        return {k: v.to(self.model.device) for k, v in tensors.items()}


def kv_token_budget(model, limits: BatchLimits) -> BatchLimits:
    """`limits` with a KV-cache budget on CUDA when none was set: the GPUs' free memory after
    loading, less RUNTIME_RESERVE_GIB each for activations (sizing.py), in tokens."""
    if limits.max_kv_tokens is not None or model.device.type != "cuda":
        return limits
    gpus = sorted({p.device.index for p in model.parameters() if p.device.type == "cuda"})
    free = sum(max(0, torch.cuda.mem_get_info(i)[0] - int(RUNTIME_RESERVE_GIB * 2**30)) for i in gpus)
    per_token = kv_bytes_per_token(model.config.get_text_config(), model.dtype.itemsize)
    return replace(limits, max_kv_tokens=max(1, free // per_token))

