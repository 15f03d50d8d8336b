"""One question, both experts: what thinking buys (or costs) on this question, side by side."""

from __future__ import annotations

from dataclasses import dataclass

import gradio as gr

from ..streaming import GenerationStats
from .events import LATEX_DELIMITERS, readable_math, to_messages, user_bubbles
from .runtime import USER_ERRORS, Runner, settings
from . import values
from .session import Session

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
    return f"The direct expert used **{tokens}** and was **{think.total_s / direct.total_s:.1f}× faster** on this question."


@dataclass(frozen=True)
class ExpertColumn:
    """One expert's side of the comparison."""

    answer: gr.Markdown
    reasoning: gr.Markdown
    stats: gr.Markdown

    def show(self, turn) -> dict:
        """This column's updates for a `ChatTurn` so far."""
        shown = readable_math(turn.answer) + ("\n\n*(stopped)*" if turn.stopped else "")
        return {self.answer: shown, self.reasoning: readable_math(turn.reasoning) or "*(none)*",
                self.stats: turn.error or stats_line(turn.stats)}

    def blank(self) -> dict:
        return {self.answer: "", self.reasoning: "", self.stats: ""}


def build(runner: Runner, session: gr.State, router: gr.State) -> None:
    gr.Markdown("Ask once; the question goes to the thinking expert, then to the direct expert.")
    textbox = gr.MultimodalTextbox(file_types=["image"], file_count="multiple", show_label=False,
                                   placeholder="A question for both experts (with images)")
    with gr.Row():
        max_new_tokens = values.slider("max_new_tokens", "Max new tokens", 1)
        stop = gr.Button("⏹ Stop", variant="stop", scale=0)
    columns: dict[str, ExpertColumn] = {}
    with gr.Row():
        for mode, title in EXPERTS:
            with gr.Column():
                gr.Markdown(f"### {title}")
                answer = gr.Markdown(latex_delimiters=LATEX_DELIMITERS, min_height=60)
                with gr.Accordion("Reasoning", open=False):
                    reasoning = gr.Markdown(latex_delimiters=LATEX_DELIMITERS)
                columns[mode] = ExpertColumn(answer, reasoning, gr.Markdown())
    verdict = gr.Markdown()

    def compare(message: dict, max_tokens: float, state: Session, router_value):
        cancel = state.new_turn()
        shown = {k: v for column in columns.values() for k, v in column.blank().items()}
        try:
            messages = to_messages(user_bubbles(message.get("text", ""), message.get("files", [])))
            finished = []
            for mode, column in columns.items():
                request = settings(mode=mode, threshold=None, thinking_budget=None, max_new_tokens=max_tokens,
                                   temperature=0.0, top_p=1.0)
                for turn in runner.answer(messages, request, router_value, cancel):
                    shown |= column.show(turn)
                    yield {**shown, verdict: ""}
                if turn.stopped or turn.stats is None:
                    return
                finished.append(turn.stats)
            yield {**shown, verdict: summary(*finished)}
        except USER_ERRORS as exc:
            yield {**shown, verdict: f"⚠️ {exc}"}

    outputs = [c for column in columns.values() for c in column.blank()]
    textbox.submit(compare, [textbox, max_new_tokens, session, router], [*outputs, verdict],
                   concurrency_id="model", api_visibility="private", show_progress="minimal")
    stop.click(lambda state: state.cancel.set(), session, None, queue=False, api_visibility="private")
