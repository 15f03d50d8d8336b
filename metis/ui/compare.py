"""One question, both experts: what thinking buys (or costs) on this question, side by side.
The handler returns `CompareUpdate` records (wiring.py) and fails like the chat (runtime.failure_text)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial

import gradio as gr

from ..streaming import GenerationStats
from . import values
from .chat import stop_answer
from .events import LATEX_DELIMITERS, ChatTurn, readable_math, to_messages, user_bubbles
from .runtime import Runner, failure_text
from .session import Session
from .wiring import PRIVATE, Outputs

EXPERTS = (("think", "💭 Thinking expert"), ("direct", "⚡ Direct expert"))


def stats_line(stats: GenerationStats | None) -> str:
    if stats is None:
        return ""
    return (f"⏱ {stats.total_s:.2f} s total · first token {stats.ttft_s:.2f} s · "
            f"{stats.tokens} tokens ({stats.thinking_tokens} thinking) · {stats.tokens_per_s:.0f} tokens/s")


def summary(think: GenerationStats, direct: GenerationStats) -> str:
    saved = think.tokens - direct.tokens
    tokens = f"{abs(saved)} {'fewer' if saved >= 0 else 'more'} tokens"
    if direct.total_s >= think.total_s:
        return f"The direct expert used **{tokens}** and was not faster on this question."
    return (f"The direct expert used **{tokens}** and was **{think.total_s / direct.total_s:.1f}× faster** "
            "on this question.")


@dataclass(frozen=True)
class CompareUpdate:
    """Both experts' columns (answer, reasoning, stats) and the verdict under them."""

    think_answer: str
    think_reasoning: str
    think_stats: str
    direct_answer: str
    direct_reasoning: str
    direct_stats: str
    verdict: str


def column(turn: ChatTurn | None) -> tuple[str, str, str]:
    """One expert's answer, reasoning and stats so far; blank before it starts."""
    if turn is None:
        return "", "", ""
    return turn.shown_answer(), readable_math(turn.reasoning) or "*(none)*", turn.error or stats_line(turn.stats)


def compare(runner: Runner, message: dict, max_new_tokens, state: Session, router_weights) -> Iterator[CompareUpdate]:
    """The question answered greedily by the thinking expert, then by the direct expert, then
    the verdict; a Stop ends the comparison where it is."""
    cancel = state.new_turn()
    turns: dict[str, ChatTurn | None] = {mode: None for mode, _ in EXPERTS}

    def shown(verdict: str = "") -> CompareUpdate:
        return CompareUpdate(*column(turns["think"]), *column(turns["direct"]), verdict)

    try:
        messages = to_messages(user_bubbles(message.get("text", ""), message.get("files", [])))
        for mode in turns:
            settings = values.settings(mode=mode, threshold=None, thinking_budget=None,
                                       max_new_tokens=max_new_tokens, temperature=0.0, top_p=1.0)
            for turn in runner.answer(messages, settings, router_weights, cancel):
                turns[mode] = turn
                yield shown()
            if turn.stopped or turn.stats is None:
                return
        yield shown(summary(turns["think"].stats, turns["direct"].stats))
    except Exception as exc:
        yield shown(f"⚠️ {failure_text(exc, 'comparison')}")


def build(runner: Runner, session: gr.State, router_weights: gr.State) -> None:
    gr.Markdown("Ask once; the question goes to the thinking expert, then to the direct expert.")
    textbox = gr.MultimodalTextbox(file_types=["image"], file_count="multiple", show_label=False,
                                   placeholder="A question for both experts (with images)")
    with gr.Row():
        max_new_tokens = values.slider("max_new_tokens", "Max new tokens", 1)
        stop = gr.Button("⏹ Stop", variant="stop", scale=0)
    columns = {}
    with gr.Row():
        for mode, title in EXPERTS:
            with gr.Column():
                gr.Markdown(f"### {title}")
                columns[f"{mode}_answer"] = gr.Markdown(latex_delimiters=LATEX_DELIMITERS, min_height=60)
                with gr.Accordion("Reasoning", open=False):
                    columns[f"{mode}_reasoning"] = gr.Markdown(latex_delimiters=LATEX_DELIMITERS)
                columns[f"{mode}_stats"] = gr.Markdown()
    out = Outputs(CompareUpdate, **columns, verdict=gr.Markdown())
    textbox.submit(**out.event(partial(compare, runner), *out.components), inputs=[textbox, max_new_tokens, session,
                   router_weights], concurrency_id="model", show_progress="minimal", **PRIVATE)
    stop.click(stop_answer, session, None, queue=False, **PRIVATE)
