"""One question, both experts: what thinking buys (or costs) on this question, side by side."""

from __future__ import annotations

import gradio as gr

from ..streaming import GenerationStats
from .events import LATEX_DELIMITERS, readable_math, to_messages, user_bubbles
from .runtime import USER_ERRORS, Runner, settings
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


def build(runner: Runner, session: gr.State, router: gr.State) -> None:
    gr.Markdown("Ask once; the question goes to the thinking expert, then to the direct expert.")
    textbox = gr.MultimodalTextbox(file_types=["image"], file_count="multiple", show_label=False,
                                   placeholder="A question for both experts (with images)")
    with gr.Row():
        max_new_tokens = gr.Slider(1, 16384, value=1024, step=1, label="Max new tokens")
        stop = gr.Button("⏹ Stop", variant="stop", scale=0)
    outputs = []
    with gr.Row():
        for _, title in EXPERTS:
            with gr.Column():
                gr.Markdown(f"### {title}")
                answer = gr.Markdown(latex_delimiters=LATEX_DELIMITERS, min_height=60)
                with gr.Accordion("Reasoning", open=False):
                    reasoning = gr.Markdown(latex_delimiters=LATEX_DELIMITERS)
                outputs += [answer, reasoning, gr.Markdown()]
    verdict = gr.Markdown()

    def compare(message: dict, max_tokens: float, state: Session, router_value):
        cancel = state.new_turn()
        blank = [""] * len(outputs)
        try:
            messages = to_messages(user_bubbles(message.get("text", ""), message.get("files", [])))
            finished = []
            for i, (mode, _) in enumerate(EXPERTS):
                request = settings(mode=mode, threshold=None, thinking_budget=None, max_new_tokens=max_tokens,
                                   temperature=0.0, top_p=1.0)
                for turn in runner.answer(messages, request, router_value, cancel):
                    shown = readable_math(turn.answer) + ("\n\n*(stopped)*" if turn.stopped else "")
                    blank[3 * i : 3 * i + 3] = [shown, readable_math(turn.reasoning) or "*(none)*",
                                                 turn.error or stats_line(turn.stats)]
                    yield *blank, ""
                if turn.stopped or turn.stats is None:
                    return
                finished.append(turn.stats)
            yield *blank, summary(*finished)
        except USER_ERRORS as exc:
            yield *blank, f"⚠️ {exc}"

    textbox.submit(compare, [textbox, max_new_tokens, session, router], [*outputs, verdict],
                   concurrency_id="model", api_visibility="private", show_progress="minimal")
    stop.click(lambda state: state.cancel.set(), session, None, queue=False, api_visibility="private")
