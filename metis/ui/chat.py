"""The chat tab (multi-turn, images, streamed reasoning and answer) with the router view beside
it, and the `/chat` and `/route` API endpoints."""

from __future__ import annotations

import logging
from dataclasses import dataclass, fields
from functools import partial

import gradio as gr
from gradio.components.multimodal_textbox import MultimodalData
from pydantic import ValidationError, model_validator
from pydantic.json_schema import SkipJsonSchema

from .events import LATEX_DELIMITERS, error_message, to_messages, user_bubbles
from .examples import EXAMPLES
from .explanation import last_image_heatmap, question_scores
from .plots import history_figure, routing_figure
from .runtime import USER_ERRORS, Runner, settings
from .session import Session, stats_markdown
from . import values
from .values import ValueProblem, message_parts

log = logging.getLogger(__name__)
MODES = [("Auto (router decides)", "auto"), ("Think", "think"), ("Direct", "direct")]


def settings_controls(threshold: float) -> list[gr.components.Component]:
    """Mode, threshold, thinking budget, max new tokens, temperature, top-p; their initial values
    are also the API's defaults. Ranges are the library's, so it is the library that refuses."""
    return [
        gr.Radio(MODES, value="auto", label="Routing mode"),
        gr.Slider(0, 1, value=threshold, step=0.01, label="Threshold",
                  info="auto mode thinks when p(think) ≥ threshold"),
        gr.Number(0, label="Thinking budget (tokens, 0 = none)", precision=0,
                  info="closes the reasoning after this many tokens"),
        values.slider("max_new_tokens", "Max new tokens", 1),
        values.slider("temperature", "Temperature", 0.05, info="0 = greedy"),
        values.slider("top_p", "Top-p", 0.01),
    ]


class _ApiMessageData(MultimodalData):
    """The API's `message`, still checked by Gradio (files must be its own uploads), but a malformed
    one is carried to the handler as `problem` instead of failing as an anonymous validation error
    (Gradio reports only its own errors raised in handlers)."""

    problem: SkipJsonSchema[str | None] = None

    @model_validator(mode="wrap")
    @classmethod
    def _named(cls, value, handler):
        try:
            message_parts(value)
            return handler(value)
        except ValueProblem as exc:
            return cls(text="", problem=str(exc))
        except ValidationError:
            return cls(text="", problem="message.files: each file must be uploaded with gradio_client's handle_file()")


def api_messages(message) -> list:
    """The API's raw `message` -> library messages, or a ValueProblem naming what is wrong."""
    if isinstance(message, dict) and message.get("problem"):
        raise ValueProblem(message["problem"])
    return to_messages(user_bubbles(*message_parts(message)))


# -- chat tab handlers (module level so tests can call them with an engine) --------------------


def add_turn(message: dict, history: list, state: Session):
    """Show the question at once and lock the textbox until the answer is done; the new
    Event is made here, so a Stop pressed while queued already applies."""
    state.new_turn()
    return history + user_bubbles(message.get("text", ""), message.get("files", [])), \
        gr.MultimodalTextbox(value=None, interactive=False)


@dataclass(frozen=True)
class ChatOutputs:
    """What `respond` updates, made unrendered: handlers key their updates by these components
    (a Gradio dict update leaves the others as they are) and `build` places them in the layout."""

    chatbot: gr.Chatbot
    routing_plot: gr.Plot
    stats: gr.Markdown
    history_plot: gr.Plot
    why: gr.HighlightedText
    why_image: gr.Image

    @classmethod
    def create(cls) -> "ChatOutputs":
        return cls(
            chatbot=gr.Chatbot(
                label="Chat", height=540, latex_delimiters=LATEX_DELIMITERS, buttons=["copy", "copy_all"],
                placeholder="**Ask about an image.** The router picks the thinking or the direct expert.",
                elem_id="chat", render=False,
            ),
            routing_plot=gr.Plot(routing_figure(None), show_label=False, elem_id="routing-plot", render=False),
            stats=gr.Markdown(stats_markdown(None, None, Session()), render=False),
            history_plot=gr.Plot(history_figure([]), show_label=False, render=False),
            why=gr.HighlightedText(label="Why: each word's push toward think (+) or direct (−)",
                                   show_legend=True, elem_id="why-words", render=False),
            why_image=gr.Image(label="Why: the image's push (purple think, teal direct)", type="pil",
                               interactive=False, height=180, elem_id="why-image", render=False),
        )

    def components(self) -> list[gr.components.Component]:
        return [getattr(self, f.name) for f in fields(self)]


def respond(runner: Runner, out: ChatOutputs, history: list, mode, threshold, budget, max_new_tokens, temperature,
            top_p, state: Session, router_value):
    """Stream the answer to the last user message into the chat, then the router view's
    stats and session figure. Errors become an error message in the chat."""
    if not history or history[-1]["role"] != "user":
        yield {out.chatbot: history}
        return
    try:
        request = settings(mode=mode, threshold=threshold, thinking_budget=budget, max_new_tokens=max_new_tokens,
                           temperature=temperature, top_p=top_p)
        messages = to_messages(history)
        plotted = False
        for turn in runner.answer(messages, request, router_value, state.cancel):
            update = {out.chatbot: history + turn.messages()}
            if turn.trace is not None and not plotted:  # the router's view comes with the first tokens
                plotted = True
                images = [image for m in messages for image in m.images]
                update |= {out.routing_plot: routing_figure(turn.trace), out.why: question_scores(turn.trace),
                           out.why_image: last_image_heatmap(turn.trace, images)}
            yield update
    except USER_ERRORS as exc:
        yield {out.chatbot: history + [error_message(str(exc))]}
        return
    except Exception as exc:  # the app keeps serving; the log has the traceback
        log.exception("chat request failed")
        yield {out.chatbot: history + [error_message(f"Internal error: {type(exc).__name__}: {exc}")]}
        return
    if turn.stopped:
        yield {out.stats: "*Stopped: this answer's timings were not recorded.*"}
        return
    if turn.error is None:
        state.record(turn.trace, turn.stats)
    yield {out.stats: stats_markdown(turn.trace, turn.stats, state), out.history_plot: history_figure(state.records)}


def retry_turn(history: list, state: Session):
    """Drop the last answer (everything after the last user message) to answer it again."""
    state.new_turn()
    last_user = max((i for i, m in enumerate(history) if m["role"] == "user"), default=-1)
    return history[: last_user + 1], gr.MultimodalTextbox(interactive=False)


def stop_answer(state: Session):
    state.cancel.set()


def clear_chat(state: Session):
    state.cancel.set()
    return [], gr.MultimodalTextbox(value=None, interactive=True), routing_figure(None), None, None


def build(runner: Runner, session: gr.State, router: gr.State, threshold: float) -> None:
    out = ChatOutputs.create()
    with gr.Row(equal_height=False):
        with gr.Column(scale=3):
            chatbot = out.chatbot.render()
            textbox = gr.MultimodalTextbox(
                file_types=["image"], file_count="multiple", show_label=False, elem_id="ask",
                placeholder="Type a question, attach one or more images, press Enter",
            )
            with gr.Row():
                stop = gr.Button("⏹ Stop", variant="stop", size="sm", elem_id="stop")
                retry = gr.Button("🔄 Retry", size="sm")
                clear = gr.Button("🗑 Clear", size="sm")
            with gr.Accordion("Settings", open=False):
                controls = settings_controls(threshold)
            for label, examples in EXAMPLES.items():
                gr.Examples(examples=[[e] for e in examples], inputs=[textbox], label=label)
        with gr.Column(scale=2, elem_id="router-view"):
            for component in (out.routing_plot, out.why, out.why_image, out.stats, out.history_plot):
                component.render()

    answer_inputs = [chatbot, *controls, session, router]
    unlock = dict(fn=lambda: gr.MultimodalTextbox(interactive=True), outputs=textbox, api_visibility="private")
    answering = []
    for trigger, first, first_inputs in ((textbox.submit, add_turn, [textbox, chatbot, session]),
                                         (retry.click, retry_turn, [chatbot, session])):
        event = trigger(first, first_inputs, [chatbot, textbox], queue=False, api_visibility="private").then(
            partial(respond, runner, out), answer_inputs, out.components(), concurrency_id="model",
            api_visibility="private", show_progress="hidden",
        )
        answering.append(event)
        event.then(**unlock)
    stop.click(stop_answer, session, None, queue=False, api_visibility="private")
    clear.click(clear_chat, session, [chatbot, textbox, out.routing_plot, out.why, out.why_image], queue=False,
                cancels=answering,
                api_visibility="private")

    # -- API: no trigger in the page; the same components give parameter types and defaults --
    # (the parameter names are the API's; its defaults are the controls' initial values)
    def chat(message: dict, mode, threshold, thinking_budget, max_new_tokens, temperature, top_p, router_value):
        """Answer one question (text + images). Streams the chat messages: a thinking message
        (metadata title/status/duration) or a "answered directly" note, then the answer."""
        try:
            request = settings(mode=mode, threshold=threshold, thinking_budget=thinking_budget,
                               max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p)
            messages = api_messages(message)
            for turn in runner.answer(messages, request, router_value):
                yield turn.messages()
        except USER_ERRORS as exc:
            raise gr.Error(str(exc)) from None
        if turn.error:
            raise gr.Error(turn.error)

    def route(message: dict, mode, threshold, router_value) -> dict:
        """The router's decision for a question, without generating: p_think, decision,
        per_layer, threshold, mode, `contributions` (each prompt token's push toward think) and the
        attention implementation that ran."""
        try:
            messages = api_messages(message)
            threshold = values.number("threshold", threshold, optional=True)
            trace = runner.route(messages, values.mode(mode), threshold, router_value).to_dict()
            # a remote backend's attention runs on its servers: null here
            return {**trace, "attn_implementation": runner.backend.describe().attn_implementation}
        except USER_ERRORS as exc:
            raise gr.Error(str(exc)) from None

    # raw values (preprocess=False): `settings` and `message_parts` name the parameter a bad one is for
    message = gr.MultimodalTextbox(visible=False, label="message")
    message.data_model = _ApiMessageData  # on the instance: a subclass would make Gradio write a .pyi here
    api_chat = gr.Chatbot(visible=False, label="messages")
    gr.on([], chat, [message, *controls, router], api_chat, api_name="chat", concurrency_id="model",
          preprocess=False)
    gr.on([], route, [message, controls[0], controls[1], router], gr.JSON(visible=False, label="trace"),
          api_name="route", concurrency_id="route", preprocess=False)  # one prefill, between decode steps
