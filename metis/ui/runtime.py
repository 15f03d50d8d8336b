"""How the tabs call the engine: user-facing errors, ZeroGPU, throttled streaming and Stop.

Every tab goes through `Runner`, so the GPU reservation, the refusal when no model is loaded
and the way Stop ends an answer are written once.
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
import time
from collections.abc import Callable, Iterator

from ..finetune.data import Example
from ..finetune.features import Features
from ..loading import zero_gpu
from ..prompting import Message
from ..routing import RoutingTrace
from ..serving.interface import GenerationSettings
from ..streaming import AnswerDelta, Progress, ReasoningDelta
from .events import ChatTurn

log = logging.getLogger(__name__)

STREAM_INTERVAL_S = 0.05  # at most ~20 screen updates per second; a fast model makes hundreds of tokens


class ModelUnavailable(RuntimeError):
    """No model is loaded; the message says why (shown to the user instead of a traceback)."""


USER_ERRORS = (ValueError, ModelUnavailable)  # bad settings/requests (PromptError is a ValueError)


def failure_text(exc: Exception, what: str) -> str:
    """What a tab shows for a request that failed: a user error's own message; anything else is
    logged with its traceback (the app keeps serving) and shown as an internal error, by type."""
    if isinstance(exc, USER_ERRORS):
        return str(exc)
    log.error("%s failed", what, exc_info=exc)
    return f"Internal error: {type(exc).__name__}: {exc}"


class UnavailableEngine:
    """The serving interface (serving/interface.py) of an engine that failed to load, so the app
    still starts and every request answers with the one load error."""

    available = False
    concurrency = 1
    default_threshold = 0.5  # the threshold slider's start when no model says otherwise

    def __init__(self, error: BaseException | str):
        self.error = error if isinstance(error, str) else f"{type(error).__name__}: {error}"

    def describe(self) -> None:
        return None

    def _refuse(self, *args, **kwargs):
        raise ModelUnavailable(f"The model is not loaded: {self.error}")

    stream = route = run = features = check_router = save_model = _refuse


def gpu(duration: Callable[..., int]):
    """`spaces.GPU(duration=...)` on a ZeroGPU Space; elsewhere the function unchanged. On ZeroGPU
    an import failure propagates: without `spaces` the model would silently run on CPU."""
    if zero_gpu():
        import spaces

        return spaces.GPU(duration=duration)
    return lambda fn: fn


def gpu_seconds(max_new_tokens: int, tokens_per_s: float, prefill_s: float = 15.0, cap_s: int = 300) -> int:
    """GPU time to reserve for an answer: `prefill_s` for moving in, encoding images and the
    prefill, then every allowed token at the measured or estimated decode rate
    (sizing.decode_tokens_per_s) with a quarter more for slow steps, capped at ZeroGPU's usual
    5-minute maximum."""
    return int(min(cap_s, math.ceil(prefill_s + 1.25 * max_new_tokens / tokens_per_s)))


def feature_seconds(examples: int) -> int:
    """GPU time to reserve for router features: one prefill per example (well under a second for a
    7B model), capped like `gpu_seconds`."""
    return int(min(300, 30 + examples))


def answer_seconds(backend, settings: GenerationSettings) -> int:
    """GPU time to reserve for one answer of `backend`; 20 s where it knows no decode rate (nothing
    loaded: the request is refused at once)."""
    description = backend.describe()
    rate = description.decode_tokens_per_s if description else None
    return gpu_seconds(settings.max_new_tokens, rate) if rate else 20


class Runner:
    """The backend as the UI uses it, through the serving interface only (serving/interface.py).
    The GPU-decorated methods take only picklable arguments (ZeroGPU runs them in another
    process); Stop is therefore checked here, between events, and ends the answer by closing the
    stream, which stops the engine's worker."""

    def __init__(self, backend):
        self.backend = backend

        # asked only on ZeroGPU, where a local engine runs (a remote one never reaches `spaces.GPU`)
        @gpu(duration=lambda messages, settings, router=None: answer_seconds(backend, settings))
        def events(messages: list[Message], settings: GenerationSettings, router=None):
            yield from backend.stream(messages, settings, router=router)

        @gpu(duration=lambda *args, **kwargs: 20)
        def route(messages: list[Message], mode: str, threshold: float | None, router=None) -> RoutingTrace:
            return backend.route(messages, mode, threshold, router=router)

        @gpu(duration=lambda examples, cache_dir=None: feature_seconds(len(examples)))
        def features(examples: list[Example], cache_dir: str | None = None) -> Iterator[int | Features]:
            yield from backend.features(examples, cache_dir)

        self.events, self.route, self.features = events, route, features

    def answer(self, messages: list[Message], settings: GenerationSettings, router=None,
               cancel: threading.Event | None = None) -> Iterator[ChatTurn]:
        """The turn after each event, at most every STREAM_INTERVAL_S while text streams; the
        last yield is always the finished (or stopped) turn."""
        turn = ChatTurn()
        last = 0.0
        with contextlib.closing(self.events(messages, settings, router)) as events:
            for event in events:
                turn.feed(event)
                if cancel is not None and cancel.is_set():
                    turn.stop()
                    break
                now = time.perf_counter()
                if not isinstance(event, ReasoningDelta | AnswerDelta | Progress) or now - last >= STREAM_INTERVAL_S:
                    last = now
                    yield turn
        if turn.stopped:
            yield turn
