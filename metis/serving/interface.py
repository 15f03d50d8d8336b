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
from ..routing import RouterWeights, RoutingTrace
from ..streaming import AnswerDelta, Done, Event, Failed, GenerationStats, ReasoningDelta, Routed
from .requests import MAX_TOKENS, BatchLimits, GenerationSettings

__all__ = ["MAX_TOKENS", "Answer", "Backend", "GenerationSettings", "ModelDescription", "collect"]

if TYPE_CHECKING:
    from ..budget import RequestLimits
    from ..finetune.data import Example
    from ..finetune.features import Features


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
              router: RouterWeights | None = None) -> RoutingTrace: ...

    def stream(self, messages: list[Message], settings: GenerationSettings | None = None,
               cancel: threading.Event | None = None, router: RouterWeights | None = None) -> Iterator[Event]: ...

    def run(self, messages: list[Message], settings: GenerationSettings | None = None, **kwargs) -> Answer: ...

    def features(self, examples: list[Example], cache_dir: str | Path | None = None) -> Iterator[int | Features]:
        """Router features: examples done (0 first), then the `Features` (finetune/features.py)."""
        ...

    def check_router(self, router: RouterWeights) -> None: ...  # ValueError if made for another model layout

    def save_model(self, router: RouterWeights, out: str | Path) -> Path: ...  # a full checkpoint, router baked in
