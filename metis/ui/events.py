"""Library events -> chat messages, and chat history -> library messages.

Pure functions and plain dicts (no Gradio import), so what the chat shows can be unit-tested
without a server. A chat message is the dict Gradio's Chatbot accepts:
`{"role", "content", "metadata"}`; a message with `metadata["title"]` renders as a collapsible
note, which is how the reasoning (and the "answered directly" note) is shown.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable

from ..images import load_images
from ..prompting import Message
from ..routing import RoutingTrace
from ..streaming import AnswerDelta, Done, Event, Failed, GenerationStats, Notice, Progress, ReasoningDelta, Routed

LATEX_DELIMITERS = [
    {"left": "$$", "right": "$$", "display": True},
    {"left": "\\[", "right": "\\]", "display": True},
    {"left": "\\(", "right": "\\)", "display": False},
    {"left": "$", "right": "$", "display": False},
]
_MATH = re.compile(r"\$\$.*?\$\$|\\\[.*?\\\]|\\\(.*?\\\)|\$[^$]+\$", re.S)
ERROR_TITLE = "⚠️ Error"
NOTICE_TITLE = "ℹ️ Note"
STOPPED_NOTE = "*(stopped)*"


def readable_math(text: str) -> str:
    """Wrap `\\boxed{…}` found outside math delimiters in `$…$` so KaTeX draws the box; models
    write it bare, and bare it would show as backslash soup. An unclosed box (still streaming)
    is left alone until its brace closes."""
    out, last = [], 0
    for m in _MATH.finditer(text):
        out += [_box_bare(text[last : m.start()]), m.group(0)]
        last = m.end()
    return "".join(out + [_box_bare(text[last:])])


def _box_bare(text: str) -> str:
    out, i = [], 0
    while (start := text.find("\\boxed{", i)) >= 0:
        depth, end = 0, None
        for j in range(start + 6, len(text)):
            depth += {"{": 1, "}": -1}.get(text[j], 0)
            if depth == 0:
                end = j + 1
                break
        if end is None:
            break
        out += [text[i:start], f"${text[start:end]}$"]
        i = end
    return "".join(out + [text[i:]])


def direct_note(trace: RoutingTrace) -> str:
    forced = " (forced)" if trace.mode == "direct" else ""
    return f"⚡ Answered directly{forced} · p(think)={trace.p_think:.2f}"


def thinking_title(tokens: int) -> str:
    """Gradio appends the metadata's duration, "(1.2s)", to the title itself."""
    return f"💭 Thought · {tokens} tokens"


def error_message(text: str) -> dict:
    """Shown open (no status) so the reason is readable at once; never fed back to the model."""
    return {"role": "assistant", "content": text, "metadata": {"title": ERROR_TITLE}}


class ChatTurn:
    """Folds the events of one answer into the assistant messages of that turn.

    The thinking message appears as soon as the router picks the thinking expert (status
    "pending", streaming the reasoning) and is closed with its duration and token count when
    the answer starts; a direct answer gets a one-line note with the router's probability
    instead. `clock` is injectable so tests can check durations.
    """

    def __init__(self, clock: Callable[[], float] = time.perf_counter):
        self.clock = clock
        self.trace: RoutingTrace | None = None
        self.stats: GenerationStats | None = None
        self.error: str | None = None
        self.notice: str | None = None
        self.stopped = False
        self.reasoning = ""
        self.answer = ""
        self._note: dict | None = None  # the thinking message or the direct note
        self._think_start: float | None = None
        self._reasoning_pieces = 0

    def feed(self, event: Event) -> None:
        match event:
            case Notice(text):
                self.notice = text
            case Routed(trace):
                self.trace = trace
                if trace.decision == "direct":
                    self._note = {"title": direct_note(trace), "status": "done"}
                else:
                    self._open_thinking()
            case ReasoningDelta(text):
                self._open_thinking()
                self.reasoning += text
                self._reasoning_pieces += 1
            case AnswerDelta(text):
                self._close_thinking()
                self.answer += text
            case Progress():
                pass  # nothing new to show
            case Done(stats):
                self.stats = stats
                self._close_thinking(stats.thinking_tokens)
            case Failed(message, stats):
                self.stats, self.error = stats, message
                self._close_thinking(stats.thinking_tokens)

    def stop(self) -> None:
        """The user stopped this answer: close the thinking note and say so."""
        self.stopped = True
        self._close_thinking()

    @property
    def thinking(self) -> bool:
        return self._think_start is not None

    def shown_answer(self) -> str:
        """The answer as shown (math made drawable), with the stopped note if it was stopped:
        the chat and the compare tab show it alike."""
        answer = readable_math(self.answer.strip())
        return f"{answer}\n\n{STOPPED_NOTE}".strip() if self.stopped else answer

    def messages(self) -> list[dict]:
        out = []
        if self.notice:
            out.append({"role": "assistant", "content": self.notice, "metadata": {"title": NOTICE_TITLE}})
        if self._note is not None:
            body = self.reasoning if self.thinking else "The router sent this question to the non-thinking expert."
            if self.thinking and self._note.get("status") == "done" and not self.reasoning.strip():
                body = "*(the thinking expert wrote no reasoning)*"
            out.append({"role": "assistant", "content": body, "metadata": dict(self._note)})
        answer = self.shown_answer()
        if answer:
            out.append({"role": "assistant", "content": answer})
        if self.error:
            out.append(error_message(self.error))
        return out

    def _open_thinking(self) -> None:
        if self._think_start is None:
            self._think_start = self.clock()
            self._note = {"title": "💭 Thinking…", "status": "pending"}

    def _close_thinking(self, tokens: int | None = None) -> None:
        """Mark the thought done; `tokens` (exact, from the final stats) replaces the count of
        streamed pieces, which can undercount when a piece spans tokens."""
        if self._think_start is None:
            return
        if self._note["status"] == "pending":
            self._note["duration"] = round(self.clock() - self._think_start, 2)
            self._note["status"] = "done"
        count = self._reasoning_pieces if tokens is None else tokens
        self._note["title"] = thinking_title(count)


# -- Gradio history -> library messages ---------------------------------------------------------


def _file_path(block) -> str | None:
    if isinstance(block, str):
        return block
    if isinstance(block, dict):
        file = block.get("file", block)
        return file.get("path") if isinstance(file, dict) else None
    return None


def to_messages(history: list[dict]) -> list[Message]:
    """Chatbot history (Gradio 6: content is a list of text/file blocks) -> library messages.

    Consecutive user messages merge into one turn (Gradio shows each upload as its own bubble);
    assistant notes with a title (reasoning, routing notes, errors) are left out, as the model
    was trained on answers without their reasoning. The images of the whole conversation are one
    request's: all their headers are checked against its pixel budget before any is decoded.
    """
    out: list[Message] = []
    paths: list[list[str]] = []  # per message
    for item in history:
        role = item["role"]
        if role == "assistant" and (item.get("metadata") or {}).get("title"):
            continue
        content = item["content"] if isinstance(item["content"], list) else [item["content"]]
        texts = [b if isinstance(b, str) else b.get("text", "") for b in content if _is_text(b)]
        files = [p for b in content if not _is_text(b) and (p := _file_path(b))] if role == "user" else []
        text = "\n".join(t for t in texts if t)
        if role == "assistant":
            text = text.replace(STOPPED_NOTE, "").strip()
        if out and out[-1].role == role:
            out[-1].text = "\n".join(t for t in (out[-1].text, text) if t)
            paths[-1] += files
        elif role in ("user", "assistant"):
            out.append(Message(role, text))
            paths.append(files)
    images = iter(load_images([p for ps in paths for p in ps]))
    for message, ps in zip(out, paths):
        message.images = [next(images) for _ in ps]
    return out


def _is_text(block) -> bool:
    return isinstance(block, str) or (isinstance(block, dict) and block.get("type") == "text")


def user_bubbles(text: str, files: list) -> list[dict]:
    """The chat messages showing what the user sent: images first, then the question."""
    content = [{"path": p} for f in files or [] if (p := _file_path(f))]
    if text:
        content.append(text)
    return [{"role": "user", "content": content}] if content else []
