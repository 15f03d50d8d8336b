"""The serving data model: what a user asks for, how big a batch may grow, and one request's row
in the running batch with the messages its consumer reads. A leaf module, so the interface, the
scheduler, the batch and the engine all import it and none imports another for its records.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass, field
from typing import Literal

import torch

from ..routing import MODES, Routing

MAX_TOKENS = 16384  # the most tokens a user may ask for, as an answer or as a thinking budget

# Why an answer ended: its end token, the end of its answer, its token limit, its time limit,
# its Stop, a GPU that could not hold it even alone, or an error.
StopReason = Literal["eos", "end_of_answer", "max_new_tokens", "deadline", "cancelled", "out_of_memory", "error"]


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


@dataclass(frozen=True)
class BatchLimits:
    """How big the running batch may grow; 1 row means one request at a time."""

    max_batch: int = 16
    max_batch_tokens: int = 16384  # rows x longest prompt of the rows that join in one prefill
    # KV-cache positions the batch may hold: rows x (cache length + longest answer still allowed),
    # since a padded batch keeps every row as long as its longest. None: unbounded (CPU, unless
    # set); on CUDA the engine sets it from the free memory (engine.kv_token_budget).
    max_kv_tokens: int | None = None
    # While answers decode, newcomers join once they are at least `join_ratio` x the running rows,
    # or the oldest has waited `join_wait_steps` steps (TGI's waiting_served_ratio and
    # max_waiting_tokens): each joining prefill stops every running row, and on a CPU one row's
    # image prefill costs ~2.3x its share of a shared one, so one newcomer at a time made the load
    # test's slowest answers later (BENCHMARKS.md). An idle model starts a request at once.
    join_ratio: float = 1.0
    join_wait_steps: int = 4

    def __post_init__(self):
        if min(self.max_batch, self.max_batch_tokens, self.max_kv_tokens or 1) < 1:
            raise ValueError(f"batch limits must be positive, got {self.max_batch} rows, {self.max_batch_tokens} "
                             f"tokens, {self.max_kv_tokens} KV-cache tokens")

    def kv_fits(self, rows: int, length: int) -> bool:
        """Whether `rows` rows, each `length` positions long, fit the KV-cache budget."""
        return self.max_kv_tokens is None or rows * length <= self.max_kv_tokens


@dataclass(frozen=True)
class Prefilled:
    """Sent to a row once the prefill has routed it: row `sample` of its prefill's `routing`."""

    routing: Routing
    sample: int
    input_ids: torch.Tensor  # the prefill's padded prompt ids; routing.prompt_mask picks this row's


@dataclass(frozen=True)
class RowEnd:
    """The last message of a row: why it stopped, and the error if its batch failed."""

    reason: StopReason
    error: BaseException | None = None  # without its traceback, whose frames would keep the batch's tensors


@dataclass(eq=False)
class Row:
    """One request in the running batch. Its consumer reads `out`: a `Prefilled`, lists of token
    ids, then one `RowEnd`."""

    inputs: dict[str, torch.Tensor]  # one built prompt (PromptBuilder.build)
    settings: GenerationSettings
    cancel: threading.Event = field(default_factory=threading.Event)
    gates: tuple[torch.Tensor, ...] | None = None  # a session's router, one gate per MoE layer; None: the model's
    out: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)
    # what its consumer already has, kept when an out-of-memory error sends the row back to wait
    sent: list[int] = field(default_factory=list)  # token ids delivered
    routed: bool = False  # its `Prefilled` was delivered
    ended: bool = False  # its `RowEnd` was delivered
    deadline: float | None = None  # perf_counter time; set when it first runs

    @property
    def prompt_tokens(self) -> int:
        return self.inputs["input_ids"].shape[1]

    def key(self) -> str:
        """Rows with equal keys can share the running batch: per-token routing (`token` mode) runs
        every MoE layer's gate at every step, the other modes only in the prefill."""
        return "token" if self.settings.mode == "token" else "query"

    def route(self, prefilled: Prefilled) -> None:
        if not self.routed:
            self.routed = True
            self.out.put(prefilled)

    def deliver(self, tokens: list[int]) -> None:
        if tokens:
            self.sent += tokens
            self.out.put(tokens)

    def end(self, end: RowEnd) -> None:
        if not self.ended:
            self.ended = True
            self.out.put(end)
