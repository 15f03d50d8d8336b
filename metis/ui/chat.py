"""The chat tab (multi-turn, images, streamed reasoning and answer) with the router view beside
it, and the `/chat` and `/route` API endpoints. Handlers return `ChatUpdate` records (wiring.py)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial

import gradio as gr
import plotly.graph_objects as go
from gradio.components.multimodal_textbox import MultimodalData
from PIL import Image
from pydantic import ValidationError, model_validator
from pydantic.json_schema import SkipJsonSchema

from ..routing import QUERY_MODES
from . import values
from .events import LATEX_DELIMITERS, error_message, to_messages, user_bubbles
from .examples import EXAMPLES
from .explanation import last_image_heatmap, question_scores
from .plots import history_figure, routing_figure
from .runtime import USER_ERRORS, Runner, failure_text
from .session import Session, stats_markdown
from .values import ValueProblem, message_parts
from .wiring import KEEP, PRIVATE, Keep, Outputs

LABELS = {"auto": "Auto (router decides)", "think": "Think", "direct": "Direct"}
MODES = [(LABELS[mode], mode) for mode in QUERY_MODES]  # the routing radio's (label, value) choices
STOPPED_STATS = "*Stopped: this answer's timings were not recorded.*"


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


# -- chat tab handlers: plain values in, ChatUpdate records out ----------------------------------


@dataclass(frozen=True)
class ChatUpdate:
    """New values of the tab's outputs; a field left KEEP leaves its component as it is."""

    chatbot: list[dict] | Keep = KEEP
    textbox: gr.MultimodalTextbox | Keep = KEEP  # locked while an answer runs
    routing_plot: go.Figure | Keep = KEEP
    stats: str | Keep = KEEP
    history_plot: go.Figure | Keep = KEEP
    why: list | None | Keep = KEEP
    why_image: Image.Image | None | Keep = KEEP


def add_turn(message: dict, history: list, state: Session) -> ChatUpdate:
    """Show the question at once and lock the textbox until the answer is done; the new
    Event is made here, so a Stop pressed while queued already applies."""
    state.new_turn()
    return ChatUpdate(chatbot=history + user_bubbles(message.get("text", ""), message.get("files", [])),
                      textbox=gr.MultimodalTextbox(value=None, interactive=False))


def respond(runner: Runner, history: list, mode, threshold, budget, max_new_tokens, temperature, top_p,
            state: Session, router_weights) -> Iterator[ChatUpdate]:
    """Stream the answer to the last user message into the chat, then the router view's
    stats and session figure. Errors become an error message in the chat."""
    if not history or history[-1]["role"] != "user":
        yield ChatUpdate(chatbot=history)
        return
    try:
        settings = values.settings(mode=mode, threshold=threshold, thinking_budget=budget,
                                   max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p)
        messages = to_messages(history)
        plotted = False
        for turn in runner.answer(messages, settings, router_weights, state.cancel):
            if turn.trace is None or plotted:
                yield ChatUpdate(chatbot=history + turn.messages())
                continue
            plotted = True  # the router's view comes with the first tokens
            images = [image for m in messages for image in m.images]
            yield ChatUpdate(chatbot=history + turn.messages(), routing_plot=routing_figure(turn.trace),
                             why=question_scores(turn.trace), why_image=last_image_heatmap(turn.trace, images))
    except Exception as exc:
        yield ChatUpdate(chatbot=history + [error_message(failure_text(exc, "chat request"))])
        return
    if turn.stopped:
        yield ChatUpdate(stats=STOPPED_STATS)
        return
    if turn.error is None:
        state.record(turn.trace, turn.stats)
    yield ChatUpdate(stats=stats_markdown(turn.trace, turn.stats, state), history_plot=history_figure(state.records))


def retry_turn(history: list, state: Session) -> ChatUpdate:
    """Drop the last answer (everything after the last user message) to answer it again."""
    state.new_turn()
    last_user = max((i for i, m in enumerate(history) if m["role"] == "user"), default=-1)
    return ChatUpdate(chatbot=history[: last_user + 1], textbox=gr.MultimodalTextbox(interactive=False))


def unlock() -> ChatUpdate:
    return ChatUpdate(textbox=gr.MultimodalTextbox(interactive=True))


def stop_answer(state: Session) -> None:
    state.cancel.set()


def clear_chat(state: Session) -> ChatUpdate:
    state.cancel.set()
    return ChatUpdate(chatbot=[], textbox=gr.MultimodalTextbox(value=None, interactive=True),
                      routing_plot=routing_figure(None), why=None, why_image=None)


# -- the API endpoints: raw values in (values.py checks them), the API's own outputs out ----------


def chat_endpoint(runner: Runner, message: dict, mode, threshold, thinking_budget, max_new_tokens, temperature,
                  top_p, router_weights):
    """Answer one question (text + images). Streams the chat messages: a thinking message
    (metadata title/status/duration) or a "answered directly" note, then the answer."""
    try:
        settings = values.settings(mode=mode, threshold=threshold, thinking_budget=thinking_budget,
                                   max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p)
        messages = api_messages(message)
        for turn in runner.answer(messages, settings, router_weights):
            yield turn.messages()
    except USER_ERRORS as exc:
        raise gr.Error(str(exc)) from None
    if turn.error:
        raise gr.Error(turn.error)


def route_endpoint(runner: Runner, message: dict, mode, threshold, router_weights) -> dict:
    """The router's decision for a question, without generating: p_think, decision,
    per_layer, threshold, mode, `contributions` (each prompt token's push toward think) and the
    attention implementation that ran."""
    try:
        messages = api_messages(message)
        threshold = values.number("threshold", threshold, optional=True)
        trace = runner.route(messages, values.mode(mode), threshold, router_weights).to_dict()
        # a remote backend's attention runs on its servers: null here
        return {**trace, "attn_implementation": runner.backend.describe().attn_implementation}
    except USER_ERRORS as exc:
        raise gr.Error(str(exc)) from None


# -- layout and wiring ----------------------------------------------------------------------------


def build(runner: Runner, session: gr.State, router_weights: gr.State, threshold: float) -> None:
    with gr.Row(equal_height=False):
        with gr.Column(scale=3):
            chatbot = gr.Chatbot(
                label="Chat", height=540, latex_delimiters=LATEX_DELIMITERS, buttons=["copy", "copy_all"],
                placeholder="**Ask about an image.** The router picks the thinking or the direct expert.",
                elem_id="chat",
            )
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
            out = Outputs(ChatUpdate, chatbot=chatbot, textbox=textbox, **router_view())

    answer = out.event(partial(respond, runner), "chatbot", "routing_plot", "stats", "history_plot", "why",
                       "why_image")
    unlocking = out.event(unlock, "textbox")  # one function: one concurrency group, as before
    answering = []
    for trigger, first, first_inputs in ((textbox.submit, add_turn, [textbox, chatbot, session]),
                                         (retry.click, retry_turn, [chatbot, session])):
        event = trigger(**out.event(first, "chatbot", "textbox"), inputs=first_inputs, queue=False, **PRIVATE).then(
            **answer, inputs=[chatbot, *controls, session, router_weights], concurrency_id="model",
            show_progress="hidden", **PRIVATE)
        answering.append(event)
        event.then(**unlocking, **PRIVATE)
    stop.click(stop_answer, session, None, queue=False, **PRIVATE)
    clear.click(**out.event(clear_chat, "chatbot", "textbox", "routing_plot", "why", "why_image"), inputs=session,
                queue=False, cancels=answering, **PRIVATE)
    build_api(runner, controls, router_weights)


def router_view() -> dict[str, gr.components.Component]:
    """The column beside the chat: what the router saw and chose, and the session so far."""
    return {
        "routing_plot": gr.Plot(routing_figure(None), show_label=False, elem_id="routing-plot"),
        "why": gr.HighlightedText(label="Why: each word's push toward think (+) or direct (−)",
                                  show_legend=True, elem_id="why-words"),
        "why_image": gr.Image(label="Why: the image's push (purple think, teal direct)", type="pil",
                              interactive=False, height=180, elem_id="why-image"),
        "stats": gr.Markdown(stats_markdown(None, None, Session())),
        "history_plot": gr.Plot(history_figure([]), show_label=False),
    }


def build_api(runner: Runner, controls: list[gr.components.Component], router_weights: gr.State) -> None:
    """`/chat` and `/route`: no trigger in the page; the chat's controls give their parameter
    types and defaults (the parameter names are the endpoints' own; raw values, preprocess=False,
    so `values.settings` and `message_parts` name the parameter a bad one is for)."""
    message = gr.MultimodalTextbox(visible=False, label="message")
    message.data_model = _ApiMessageData  # on the instance: a subclass would make Gradio write a .pyi here
    gr.on([], _bound(chat_endpoint, runner), [message, *controls, router_weights],
          gr.Chatbot(visible=False, label="messages"), api_name="chat", concurrency_id="model", preprocess=False)
    gr.on([], _bound(route_endpoint, runner), [message, controls[0], controls[1], router_weights],
          gr.JSON(visible=False, label="trace"),
          api_name="route", concurrency_id="route", preprocess=False)  # one prefill, between decode steps


def _bound(endpoint, runner: Runner) -> partial:
    """The endpoint with its runner given; its docstring stays the API page's description."""
    bound = partial(endpoint, runner)
    bound.__doc__ = endpoint.__doc__
    return bound
