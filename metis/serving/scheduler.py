"""Who uses the one model when: batches of waiting requests, and routing calls between their steps.

Requests wait in arrival order. When the model is free, the oldest waiting request starts a batch
and takes with it the later ones that can share its `generate` call (`Row.key`), up to
`max_batch` rows and `max_batch_tokens` padded prompt tokens (rows x longest prompt), so that one
long conversation is never padded into everyone's prefill. A request that arrives while a batch
runs joins the next batch: joining a running batch would need its KV cache and Qwen2.5-VL's
per-row rope offsets merged mid-generation, which transformers' `generate` does not offer (its
continuous batching takes text token lists only, without images or our routing).

Routing-only calls (`/route`, fine-tuning features: one prefill each) do not wait for a batch to
finish: the batch hands the model over between two decode steps (`ModelSlot.pause`).
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from .batch import Row, RowEnd


class ModelSlot:
    """Exclusive use of the model, first come first served. The holder of a long job calls
    `pause()` at safe points (between decode steps) to let the oldest waiting caller take one turn.

    Turns are bounded, so a flood of routing calls cannot starve a running batch: at most one turn
    per `pause()`, and turns take at most `share` of the model's time while a batch runs (after a
    turn of t seconds, the holder keeps the model for t * (1 - share) / share seconds before the
    next). A lone routing call still goes at the next decode step."""

    def __init__(self, share: float = 0.1, clock: Callable[[], float] = time.monotonic):
        if not 0 < share <= 1:
            raise ValueError(f"share must be in (0, 1], got {share}")
        self.share, self._clock = share, clock
        self._cond = threading.Condition()
        self._busy = False
        self._waiting: deque[object] = deque()  # tickets of waiting callers, oldest first
        self._paused = False  # a holder is paused: only `_invited` may take the model
        self._invited: object | None = None
        self._next_turn = 0.0  # clock time before which `pause()` grants no turn
        self.turns = 0  # turns granted by `pause()` so far (tests, benchmarks)

    @contextlib.contextmanager
    def hold(self):
        ticket = object()
        with self._cond:
            self._waiting.append(ticket)
            self._cond.wait_for(lambda: not self._busy and self._waiting[0] is ticket
                                and (not self._paused or self._invited is ticket))
            self._waiting.popleft()
            self._busy = True
            if self._invited is ticket:
                self._invited = None
            self._cond.notify_all()  # the next ticket is now at the head
        try:
            yield
        finally:
            with self._cond:
                self._busy = False
                self._cond.notify_all()

    def pause(self) -> None:
        """Called by the holder: let the oldest waiting caller have the model once, if the time
        share allows, and return when that turn is over."""
        with self._cond:
            start = self._clock()
            if not self._waiting or start < self._next_turn:
                return
            self._paused, self._invited, self._busy = True, self._waiting[0], False
            self.turns += 1
            self._cond.notify_all()
            self._cond.wait_for(lambda: self._invited is None and not self._busy)
            self._paused, self._busy = False, True
            end = self._clock()
            self._next_turn = end + (end - start) * (1 - self.share) / self.share
            self._cond.notify_all()

    def waiting(self) -> int:
        """Callers waiting for the model."""
        with self._cond:
            return len(self._waiting)


@dataclass(frozen=True)
class BatchLimits:
    """How big a batch may grow; 1 row means one request at a time."""

    max_batch: int = 16
    max_batch_tokens: int = 16384  # rows x longest prompt of a batch
    # After a batch, the next one waits this long for more requests unless it is full: the users of
    # the batch that just ended ask again within milliseconds (BENCHMARKS.md: at 16 users the mean
    # batch went from 9 to 16 rows). A request that finds the model idle starts at once.
    gather_s: float = 0.005
    # KV-cache positions a batch may hold: rows x (longest prompt + longest answer allowed), since
    # a padded batch keeps every row as long as its longest. None: unbounded (CPU, unless set);
    # on CUDA the engine sets it from the free memory (Engine.kv_token_budget).
    max_kv_tokens: int | None = None

    def __post_init__(self):
        if self.max_batch < 1 or self.max_batch_tokens < 1 or (self.max_kv_tokens is not None and self.max_kv_tokens < 1):
            raise ValueError(f"batch limits must be positive, got {self.max_batch} rows, {self.max_batch_tokens} tokens, "
                             f"{self.max_kv_tokens} KV-cache tokens")

    def kv_fits(self, rows: int, length: int) -> bool:
        """Whether `rows` rows, each `length` positions long, fit the KV-cache budget."""
        return self.max_kv_tokens is None or rows * length <= self.max_kv_tokens

    @classmethod
    def from_env(cls) -> "BatchLimits":
        """METIS_MAX_BATCH, METIS_MAX_BATCH_TOKENS, METIS_BATCH_GATHER_S and METIS_MAX_KV_TOKENS
        (server settings; `--max-batch` sets the first)."""
        env = os.environ.get
        kv = env("METIS_MAX_KV_TOKENS")
        return cls(int(env("METIS_MAX_BATCH", cls.max_batch)), int(env("METIS_MAX_BATCH_TOKENS", cls.max_batch_tokens)),
                   float(env("METIS_BATCH_GATHER_S", cls.gather_s)), int(kv) if kv else None)


class Scheduler:
    """Forms batches from waiting rows and runs them one after another with `run_batch`, holding
    `slot`. A batch is formed when the slot is free, so everyone who arrived meanwhile joins it.

    The worker thread exists only while there is work, so an idle engine holds no thread."""

    def __init__(self, run_batch: Callable[[list[Row]], None], limits: BatchLimits, slot: ModelSlot):
        self.run_batch, self.limits, self.slot = run_batch, limits, slot
        self._waiting: deque[Row] = deque()
        self._cond = threading.Condition()
        self._working = False
        self.batches = 0  # batches run so far
        self._sizes: deque[int] = deque(maxlen=10_000)  # the latest batches' row counts, bounded

    def sizes_since(self, mark: int) -> list[int]:
        """Row counts of the batches run since `batches` was `mark` (tests and benchmarks)."""
        return list(self._sizes)[max(0, len(self._sizes) - (self.batches - mark)):]

    def submit(self, row: Row) -> None:
        with self._cond:
            self._waiting.append(row)
            self._cond.notify_all()
            if not self._working:
                self._working = True
                # not a daemon: at exit Python waits for the batch (its rows end within a step once
                # their consumers are gone) instead of killing it inside torch, which aborts
                threading.Thread(target=self._work, name="metis-batch").start()

    def waiting(self) -> int:
        with self._cond:
            return len(self._waiting)

    def idle(self, timeout: float | None = None) -> bool:
        """Wait until no request is waiting or running; False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._working, timeout)

    def _work(self) -> None:
        ran = False
        while True:
            if ran:
                with self._cond:
                    self._cond.wait_for(lambda: len(self._waiting) >= self.limits.max_batch, self.limits.gather_s)
            with self.slot.hold():
                with self._cond:
                    if not self._waiting:
                        self._working = False
                        self._cond.notify_all()
                        return
                    batch = self._take()
                if not batch:
                    continue
                self._sizes.append(len(batch))
                self.batches += 1
                ran = True
                try:
                    self.run_batch(batch)
                except BaseException as exc:  # never lose a consumer: every row gets its end
                    for row in batch:
                        row.end(RowEnd("error", exc.with_traceback(None)))

    def _take(self) -> list[Row]:
        for row in [r for r in self._waiting if r.cancel.is_set()]:  # stopped before it started
            self._waiting.remove(row)
            row.end(RowEnd("cancelled"))
        if not self._waiting:
            return []
        first = self._waiting.popleft()
        key, batch = first.key(), [first]
        longest, answer = first.prompt_tokens, first.settings.max_new_tokens
        for row in list(self._waiting):
            if len(batch) == self.limits.max_batch:
                break
            wider, longer = max(longest, row.prompt_tokens), max(answer, row.settings.max_new_tokens)
            if (row.key() == key and (len(batch) + 1) * wider <= self.limits.max_batch_tokens
                    and self.limits.kv_fits(len(batch) + 1, wider + longer)):
                batch.append(row)
                longest, answer = wider, longer
                self._waiting.remove(row)
        return batch
