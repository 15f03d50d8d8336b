"""Typed events of one answer, and the incremental parser that produces them from model text.

The UI, the CLI and the tests all consume the same events: `Routed` once the prefill has chosen
an expert, then `ReasoningDelta`/`AnswerDelta` pieces as tokens arrive (`Progress` when tokens
arrive that show no text), then `Done` (or `Failed`, which keeps whatever was already streamed).
"""

from __future__ import annotations

from dataclasses import dataclass

from tokenizers.decoders import DecodeStream

from .routing import RoutingTrace


@dataclass(frozen=True)
class Routed:
    trace: RoutingTrace


@dataclass(frozen=True)
class ReasoningDelta:
    text: str


@dataclass(frozen=True)
class AnswerDelta:
    text: str


@dataclass(frozen=True)
class Notice:
    """Something the person should know about this answer, e.g. that old turns were left out."""

    text: str


@dataclass(frozen=True)
class Progress:
    """Token number `tokens` shows no text (a control token, a tag or half a character held
    back, text after `</answer>`). Sent so a consumer still gets control while a model writes
    nothing visible, e.g. to Stop."""

    tokens: int


@dataclass(frozen=True)
class GenerationStats:
    ttft_s: float  # request start -> first generated token (includes prefill and image encoding)
    total_s: float
    tokens: int
    thinking_tokens: int
    stop_reason: str  # "eos", "end_of_answer" (</answer>), "max_new_tokens", "deadline", "cancelled" or "error"

    @property
    def tokens_per_s(self) -> float:
        decode_s = self.total_s - self.ttft_s
        return (self.tokens - 1) / decode_s if self.tokens > 1 and decode_s > 0 else 0.0


@dataclass(frozen=True)
class Done:
    stats: GenerationStats


@dataclass(frozen=True)
class Failed:
    message: str
    stats: GenerationStats


Event = Notice | Routed | ReasoningDelta | AnswerDelta | Progress | Done | Failed

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"


class OutputParser:
    """Splits `<think>…</think><answer>…</answer>` (or the direct forms, with or without
    `<answer>`) into reasoning and answer text while it streams.

    The four tags are the format, never content: wherever one appears, it moves the state on if
    it means something there and is absorbed otherwise (a model out of its depth writes stray
    `</answer>` or `<think>` mid-answer). Text that could be the start of a tag is held back until
    the next piece decides it, so a tag split across tokens (`</th` + `ink>`) never leaks either.
    """

    TAGS = (THINK_OPEN, THINK_CLOSE, ANSWER_OPEN, ANSWER_CLOSE)
    # state -> the tags that move it on, and where; every other tag is dropped where it stands
    _NEXT = {
        "start": {THINK_OPEN: "think", THINK_CLOSE: "between", ANSWER_OPEN: "answer"},
        "think": {THINK_CLOSE: "between", ANSWER_OPEN: "answer"},  # an answer opened unclosed reasoning
        "between": {THINK_OPEN: "think", ANSWER_OPEN: "answer"},
        "answer": {ANSWER_CLOSE: "end"},
        "end": {},
    }

    def __init__(self):
        self.state = "start"
        self._pending = ""

    def feed(self, text: str) -> list[ReasoningDelta | AnswerDelta]:
        self._pending += text
        out: list[ReasoningDelta | AnswerDelta] = []
        while self._pending:
            hits = [(pos, tag) for tag in self.TAGS if (pos := self._pending.find(tag)) >= 0]
            if hits:
                pos, tag = min(hits)
                before, after = self._pending[:pos], self._pending[pos + len(tag) :]
                if self.state in ("start", "between") and before.strip():
                    self.state = "answer"  # text before any tag: the direct form without <answer>
                if tag not in self._NEXT[self.state]:
                    self._pending = before + after  # dropped; look again, its neighbours may form a tag
                    continue
                self._emit(before, out)
                self._pending, self.state = after, self._NEXT[self.state][tag]
                continue
            keep = max(self._partial(tag) for tag in self.TAGS)
            cut = len(self._pending) - keep
            if self.state in ("start", "between") and not self._pending[:cut].strip() and keep:
                break  # only whitespace before a possible tag: wait
            self._emit(self._pending[:cut], out)
            self._pending = self._pending[cut:]
            break
        return out

    def finish(self) -> list[ReasoningDelta | AnswerDelta]:
        """The held-back rest, less a tag cut off at the very end (by the token limit, or Stop)."""
        out: list[ReasoningDelta | AnswerDelta] = []
        partial = max(self._partial(tag) for tag in self.TAGS)
        self._emit(self._pending[: -partial] if partial > 1 else self._pending, out)
        self._pending = ""
        return out

    @property
    def in_reasoning(self) -> bool:
        return self.state == "think"

    @property
    def closed(self) -> bool:
        """`</answer>` was written: the answer is complete."""
        return self.state == "end"

    def _partial(self, tag: str) -> int:
        """Length of the longest suffix of the pending text that is a proper prefix of `tag`."""
        for n in range(min(len(tag) - 1, len(self._pending)), 0, -1):
            if self._pending.endswith(tag[:n]):
                return n
        return 0

    def _emit(self, text: str, out: list) -> None:
        if not text:
            return
        if self.state == "think":
            out.append(ReasoningDelta(text))
        elif self.state == "end":
            return  # anything after </answer> is not part of the answer
        else:
            if self.state in ("start", "between"):
                text = text.lstrip()  # whitespace around the tags is not part of the answer
                if not text:
                    return
                self.state = "answer"  # no tags: the direct form without <answer>
            out.append(AnswerDelta(text))


def parse_output(text: str) -> tuple[str, str, bool]:
    """A whole output at once: (reasoning, answer, whether `</answer>` closed it)."""
    parser = OutputParser()
    events = parser.feed(text) + parser.finish()
    reasoning = "".join(e.text for e in events if isinstance(e, ReasoningDelta))
    return reasoning, "".join(e.text for e in events if isinstance(e, AnswerDelta)), parser.closed


class IncrementalDecoder:
    """Token ids -> the new text of each token, never half of a multi-byte character
    (`tokenizers`' DecodeStream: nothing is re-decoded). Control tokens show nothing."""

    def __init__(self, tokenizer, hidden_ids: set[int]):
        self.backend = tokenizer.backend_tokenizer
        self.hidden = hidden_ids
        self.stream = DecodeStream(skip_special_tokens=False)

    def push(self, token_id: int) -> str:
        if token_id in self.hidden:
            return ""
        return self.stream.step(self.backend, token_id) or ""
