"""The three runs: every question answered in each mode through a backend's event stream.

Answers are asked from a pool of `workers` threads (the backend's `concurrency`): the local
engine batches concurrent streams (serving/scheduler.py), a remote one streams them side by side.
The modes are queued one after the other into the same pool, so the next mode's first questions
fill the rows the last one's long answers leave free. Decoding is greedy, so an answer depends on
its question and mode only, which is what lets the report rebuild auto routing at any threshold
from the think and direct runs (report.py).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass

from ..prompting import Message
from ..routing import QUERY_MODES
from ..serving.interface import GenerationSettings, collect
from ..streaming import Event
from .dataset import Question
from .matching import is_correct

MODES = QUERY_MODES  # per query; token routing picks no one expert
Stream = Callable[[list[Message], GenerationSettings], Iterator[Event]]  # a backend's `stream`, or the UI's


class Cancelled(Exception):
    """The person cancelled the evaluation."""


@dataclass(frozen=True)
class RunSettings:
    threshold: float  # auto mode's; the report marks it on the curve
    max_new_tokens: int = 1024
    workers: int = 16  # answers in flight at once

    def __post_init__(self):
        self.generation("auto")  # out-of-range settings are refused (ValueError) before any answer

    def generation(self, mode: str) -> GenerationSettings:
        return GenerationSettings(mode=mode, threshold=self.threshold, max_new_tokens=self.max_new_tokens)


@dataclass(frozen=True)
class Outcome:
    """One question answered in one mode."""

    question: int  # its index in the questions
    mode: str
    answer: str  # the answer text as the backend returned it (reasoning and tags left out)
    correct: bool
    tokens: int  # generated, reasoning included
    seconds: float  # this answer's own time, request to last token
    p_think: float | None  # the router's probability of thinking, whatever the mode
    decision: str | None  # the expert that answered
    error: str | None = None


@dataclass(frozen=True)
class Results:
    questions: tuple[Question, ...]
    outcomes: dict[str, tuple[Outcome, ...]]  # mode -> one per question, in question order
    settings: RunSettings
    seconds: float  # wall time of all the runs together


def _until_cancelled(events: Iterable[Event], cancel: threading.Event) -> Iterator[Event]:
    for event in events:
        if cancel.is_set():
            raise Cancelled
        yield event


def answer(stream: Stream, questions: tuple[Question, ...], index: int, mode: str, settings: RunSettings,
           cancel: threading.Event) -> Outcome:
    """One question in one mode. A question the backend refuses (an image that will not decode, a
    prompt over the limit) is scored wrong with the reason; other errors end the evaluation."""
    if cancel.is_set():
        raise Cancelled
    question = questions[index]
    try:
        with contextlib.closing(stream(question.messages(), settings.generation(mode))) as events:
            got = collect(_until_cancelled(events, cancel))
    except ValueError as exc:  # PromptError and ImageError are ValueErrors
        return Outcome(index, mode, "", False, 0, 0.0, None, None, str(exc))
    stats, trace = got.stats, got.trace
    correct = got.error is None and is_correct(got.answer, question.answer, question.choices)
    return Outcome(index, mode, got.answer, correct, stats.tokens if stats else 0, stats.total_s if stats else 0.0,
                   trace.p_think if trace else None, trace.decision if trace else None, got.error)


def evaluate(stream: Stream, questions: list[Question], settings: RunSettings,
             cancel: threading.Event | None = None, progress: Callable[[int, int], None] | None = None) -> Results:
    """Every question in every mode; `progress(done, total)` after each answer. Raises Cancelled
    once `cancel` is set (answers in flight stop at their next event)."""
    questions, cancel = tuple(questions), cancel or threading.Event()
    start = time.perf_counter()
    found: dict[str, list[Outcome | None]] = {m: [None] * len(questions) for m in MODES}
    total = len(MODES) * len(questions)
    with ThreadPoolExecutor(max(1, settings.workers), thread_name_prefix="metis-eval") as pool:
        futures = [pool.submit(answer, stream, questions, i, mode, settings, cancel)
                   for mode in MODES for i in range(len(questions))]
        try:
            for done, future in enumerate(as_completed(futures), start=1):
                outcome = future.result()
                found[outcome.mode][outcome.question] = outcome
                if progress:
                    progress(done, total)
        except BaseException:
            cancel.set()  # the queued answers end at once instead of running to no one
            raise
    return Results(questions, {m: tuple(v) for m, v in found.items()}, settings, time.perf_counter() - start)
