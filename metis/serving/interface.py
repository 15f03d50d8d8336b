"""What every backend offers: settings in, typed events out, and the fine-tuning operations.

The UI, the CLI, the HTTP API and the tests talk to a backend only through this shape, whether
one local model answers (`serving/engine.py`, batched), two remote pools do (`serving/remote.py`)
or nothing loaded (`ui/runtime.py`'s `UnavailableEngine`). The UI never reaches past it into a
model, tokenizer or prompt builder: that keeps `metis/ui` free of tensors and of backend kinds.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from ..prompting import Message
from ..routing import MODES, RoutingTrace
from ..streaming import AnswerDelta, Done, Event, Failed, GenerationStats, ReasoningDelta, Routed

if TYPE_CHECKING:
    from ..budget import RequestLimits
    from ..finetune.data import Example
    from ..finetune.features import Features
    from .scheduler import BatchLimits

MAX_TOKENS = 16384  # the most tokens a user may ask for, as an answer or as a thinking budget


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

    LIMITS = {"max_new_tokens": (1, MAX_TOKENS), "temperature": (0.0, 2.0), "top_p": (0.01, 1.0)}

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
        if self.thinking_budget is not None and not 1 <= self.thinking_budget <= MAX_TOKENS:
            problems.append(f"thinking_budget must be within [1, {MAX_TOKENS}] or empty, got {self.thinking_budget}")
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


def collect(events: Iterable[Event]) -> Answer:
    """Fold one answer's events into an `Answer`."""
    out = Answer()
    for event in events:
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


@dataclass(frozen=True)
class ModelDescription:
    """What the Model tab shows of a loaded backend."""

    info: dict  # its rows: loading.ModelInfo or remote.RemoteInfo as a dict
    attn_implementation: str | None = None  # None: attention runs on remote servers
    limits: RequestLimits | None = None  # per request; a remote backend's are its servers' own
    batch: BatchLimits | None = None  # how many answers decode together (local engine)
    decode_tokens_per_s: float | None = None  # for ZeroGPU's reservation (local engine)


class Backend(Protocol):
    """The serving interface. `available` is False only when loading failed, and `error` then
    says why; `concurrency` is how many answers it serves at once (the app's queue lets that many
    in). Router weights (`router`) are opaque to callers: made by `features` + training, checked
    by `check_router`, used per call by `route`/`stream`, baked in by `save_model`."""

    available: bool
    error: str | None
    concurrency: int

    @property
    def default_threshold(self) -> float: ...  # p(think) at or above which auto mode thinks

    def describe(self) -> ModelDescription | None: ...  # None: nothing loaded

    def route(self, messages: list[Message], mode: str = "auto", threshold: float | None = None,
              router: dict | None = None) -> RoutingTrace: ...

    def stream(self, messages: list[Message], settings: GenerationSettings | None = None,
               cancel: threading.Event | None = None, router: dict | None = None) -> Iterator[Event]: ...

    def run(self, messages: list[Message], settings: GenerationSettings | None = None, **kwargs) -> Answer: ...

    def features(self, examples: list[Example], cache_dir: str | Path | None = None) -> Iterator[int | Features]:
        """Router features: examples done (0 first), then the `Features` (finetune/features.py)."""
        ...

    def check_router(self, router: dict) -> None: ...  # ValueError if made for another model layout

    def save_model(self, router: dict, out: str | Path) -> Path: ...  # a full checkpoint, router baked in
