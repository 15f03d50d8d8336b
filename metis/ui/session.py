"""What one browser session remembers: its routing decisions and answer sizes, the Event its
Stop button sets, and its fine-tuning or evaluation run (`Job`). Lives in `gr.State`, so users
never see each other's numbers or stop each other's answers."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass

from ..routing import RoutingTrace
from ..streaming import GenerationStats


@dataclass(frozen=True)
class Record:
    p_think: float
    decision: str
    mode: str
    threshold: float
    tokens: int
    thinking_tokens: int


class Session:
    def __init__(self):
        self.cancel = threading.Event()
        self.records: list[Record] = []

    def __deepcopy__(self, memo):
        """Gradio gives each browser session a deep copy of the state's initial value; the copy
        of a session is a new, empty one (an Event cannot be copied anyway)."""
        return Session()

    def new_turn(self) -> threading.Event:
        """A fresh Event per answer, so a Stop pressed earlier cannot stop the next one."""
        self.cancel = threading.Event()
        return self.cancel

    def record(self, trace: RoutingTrace, stats: GenerationStats) -> None:
        self.records.append(
            Record(trace.p_think, trace.decision, trace.mode, trace.threshold, stats.tokens, stats.thinking_tokens)
        )

    @property
    def routed(self) -> list[Record]:
        """Answers the router decided (mode auto): the ones the thinking ratio describes."""
        return [r for r in self.records if r.mode == "auto"]

    def thinking_ratio(self) -> float | None:
        routed = self.routed
        return sum(r.decision == "think" for r in routed) / len(routed) if routed else None

    def mean_thinking_answer_tokens(self) -> float | None:
        """Mean length of this session's forced-think answers: what always thinking costs here."""
        forced = [r.tokens for r in self.records if r.mode == "think"]
        return sum(forced) / len(forced) if forced else None


class Job:
    """One browser session's run in a one-run-at-a-time tab (fine-tuning, evaluation), kept in
    `gr.State`. Queued at click time, ahead of the queue, so Cancel reaches a run that still waits
    for its slot; a run started without being queued (a direct call) gets its own event."""

    def __init__(self):
        self.cancel: threading.Event | None = None

    def __deepcopy__(self, memo):
        return Job()

    def queue(self) -> None:
        self.cancel = threading.Event()

    @contextlib.contextmanager
    def running(self) -> Iterator[threading.Event]:
        """This run's cancel event for as long as it runs; afterwards there is nothing to cancel."""
        cancel = self.cancel = self.cancel or threading.Event()
        try:
            yield cancel
        finally:
            if self.cancel is cancel:  # not a newer run's, queued meanwhile
                self.cancel = None

    def stop(self) -> bool:
        """Cancel the queued or running run; False when there is none."""
        if self.cancel is None:
            return False
        self.cancel.set()
        return True


def stats_markdown(trace: RoutingTrace | None, stats: GenerationStats | None, session: Session) -> str:
    """The numbers beside the chat for the latest answer and for the session."""
    if stats is None:
        return "*Ask a question to see the routing decision and timings.*"
    lines = [
        "| Latest answer | |",
        "|---|---|",
        f"| Expert | **{'thinking' if trace and trace.decision == 'think' else 'direct'}**"
        f"{' (forced)' if trace and trace.mode in ('think', 'direct') else ''} |",
        f"| Time to first token | {stats.ttft_s:.2f} s |",
        f"| Speed | {stats.tokens_per_s:.0f} tokens/s |",
        f"| Tokens | {stats.tokens} ({stats.thinking_tokens} thinking) |",
        f"| Tokens saved vs always thinking | {_saved(trace, stats, session)} |",
        f"| Stop reason | {stats.stop_reason} |",
    ]
    ratio = session.thinking_ratio()
    routed = len(session.routed)
    share = f"{ratio:.0%} of {routed} routed question{'s' * (routed != 1)}" if ratio is not None else "—"
    lines.append(f"| Session thinking ratio | {share} |")
    return "\n".join(lines)


def _saved(trace: RoutingTrace | None, stats: GenerationStats, session: Session) -> str:
    if trace is not None and trace.decision == "think":
        return "0 (it thought)"
    mean = session.mean_thinking_answer_tokens()
    if mean is None:
        return "unknown (ask with mode *Think* once to measure)"
    return f"≈ {mean - stats.tokens:.0f} (vs {mean:.0f}-token thinking answers this session)"
