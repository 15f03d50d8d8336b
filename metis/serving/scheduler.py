"""Who uses the one model when: the running batch, who joins it, and routing calls between its steps.

Requests wait in arrival order. Between two decode steps, the waiting rows that can share the
running batch (`Row.key`) join it, oldest first: up to `max_batch` rows in all, `max_batch_tokens`
padded prompt tokens in one joining prefill (so one long conversation is not padded into
everyone's prefill), and, where a KV-cache budget is set, only while rows x (cache length +
longest answer still allowed) fits it. A newcomer's first token therefore comes within a step of
the running batch, not after its longest answer (batch.py does the joining).

Routing-only calls (`/route`, fine-tuning features: one prefill each) do not wait for the batch to
finish: it hands the model over between two decode steps (`ModelSlot.pause`).
"""

from __future__ import annotations

import contextlib
import gc
import threading
import time
from collections import deque
from collections.abc import Callable

import torch

from .requests import BatchLimits, Row, RowEnd

__all__ = ["BatchLimits", "ModelSlot", "Scheduler"]


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


class Scheduler:
    """Runs the batch `new_batch()` makes (batch.RunningBatch) while there are rows, holding
    `slot`: between two steps, waiting rows join and routing calls take their turn. An
    out-of-memory error sends the batch's rows back to the front of the queue, and until the
    batch empties at most half as many rows run again, down to one; a row that fails alone ends.

    The worker thread exists only while there is work, so an idle engine holds no thread."""

    def __init__(self, new_batch: Callable[[], object], limits: BatchLimits, slot: ModelSlot):
        self.new_batch, self.limits, self.slot = new_batch, limits, slot
        self._waiting: deque[Row] = deque()
        self._cond = threading.Condition()
        self._working = False
        self.batches = 0  # prefills run so far (each adds the rows that joined together)
        self._sizes: deque[int] = deque(maxlen=10_000)  # the latest prefills' row counts, bounded
        self.steps = self.step_rows = 0  # decode steps run, and rows summed over them (occupancy)
        self._since: dict[Row, int] = {}  # each waiting row: the step count when it came

    def sizes_since(self, mark: int) -> list[int]:
        """Row counts of the prefills run since `batches` was `mark` (tests and benchmarks)."""
        return list(self._sizes)[max(0, len(self._sizes) - (self.batches - mark)):]

    def submit(self, row: Row) -> None:
        with self._cond:
            self._waiting.append(row)
            self._since[row] = self.steps
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
        batch, cap = self.new_batch(), self.limits.max_batch
        with self.slot.hold():
            while True:
                with self._cond:
                    joining = self._take(batch, cap)
                    if not joining and not len(batch):
                        self._working = False
                        self._cond.notify_all()
                        return
                if joining:
                    self._sizes.append(len(joining))
                    self.batches += 1
                retry = self._run(batch, joining)
                if retry is not None:
                    cap = self._requeue(retry)
                elif not len(batch):
                    cap = self.limits.max_batch
                self.slot.pause()

    def _run(self, batch, joining: list[Row]) -> list[Row] | None:
        """One join and/or step; the rows to run again after an out-of-memory error."""
        try:
            if joining:
                batch.join(joining)
            if len(batch):
                self.steps, self.step_rows = self.steps + 1, self.step_rows + len(batch)
                batch.step()
        except torch.OutOfMemoryError:  # leaving this block drops its frames and their tensors
            released = batch.release()
            return released + [r for r in joining if r not in released]  # those whose prefill failed
        except BaseException as exc:  # never lose a consumer: every row gets its end
            for row in joining:
                row.end(RowEnd("error", exc.with_traceback(None)))
            batch.fail(exc)
        return None

    def _requeue(self, rows: list[Row]) -> int:
        """Back to the front of the queue; the batch then takes at most half of them again."""
        free_accelerator_memory()
        rows = [r for r in rows if not r.ended]
        if len(rows) == 1:
            rows[0].end(RowEnd("out_of_memory"))
            return self.limits.max_batch
        with self._cond:
            self._waiting.extendleft(reversed(rows))
        return max(1, len(rows) // 2)

    def _take(self, batch, cap: int) -> list[Row]:
        """The waiting rows that join `batch` now, oldest first (see the module docstring)."""
        for row in [r for r in self._waiting if r.cancel.is_set()]:  # stopped before it started
            self._waiting.remove(row)
            self._since.pop(row, None)
            row.end(RowEnd("cancelled"))
        if len(batch) and self._waiting:  # newcomers join in groups (BatchLimits.join_ratio)
            waited = self.steps - self._since.get(self._waiting[0], self.steps)
            if len(self._waiting) < self.limits.join_ratio * len(batch) and waited < self.limits.join_wait_steps:
                return []
        key, room = batch.key, min(cap, self.limits.max_batch) - len(batch)
        length, answer = batch.length, batch.remaining()
        joining, longest = [], 0
        for row in list(self._waiting):
            if len(joining) == room:
                break
            key = key or row.key()
            wider = max(longest, row.prompt_tokens)
            total = len(batch) + len(joining) + 1
            if (row.key() == key and (len(joining) + 1) * wider <= self.limits.max_batch_tokens
                    and self.limits.kv_fits(total, max(length, wider) + max(answer, row.settings.max_new_tokens))):
                joining.append(row)
                longest, answer = wider, max(answer, row.settings.max_new_tokens)
                self._waiting.remove(row)
                self._since.pop(row, None)
        return joining


def free_accelerator_memory() -> None:
    """After an out-of-memory error: collect what its frames held, and hand the cached blocks
    back to CUDA so that the retry starts from a clean allocator."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
