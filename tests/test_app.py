"""The app: handlers with the fixture engine, and a launched server driven through gradio_client."""

import re
import socket
import threading
from pathlib import Path

import plotly.graph_objects as go
import pytest
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError

from metis.tiny import world
from metis.ui import build_demo
from metis.ui.chat import STOPPED_STATS, add_turn, respond, stop_answer
from metis.ui.compare import compare
from metis.ui.events import STOPPED_NOTE, to_messages, user_bubbles
from metis.ui.runtime import Runner
from metis.ui.session import Session
from metis.ui.values import settings
from metis.ui.wiring import KEEP

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(demo):
    demo.queue(default_concurrency_limit=1)
    demo.launch(server_name="127.0.0.1", server_port=free_port(), prevent_thread_lock=True, quiet=True)
    return demo


def greedy(mode: str, max_new_tokens: int):
    """The UI's settings for a greedy answer of at most `max_new_tokens`, no thinking budget."""
    return settings(mode=mode, threshold=None, thinking_budget=0, max_new_tokens=max_new_tokens,
                    temperature=0, top_p=1)


@pytest.fixture(scope="module")
def long_question(engine, tmp_path_factory):
    """A shapes question that the fixture's random weights answer without ever writing the end
    token (greedy decoding loops), so "long generation" tests really are long."""
    for seed in range(50):
        sample = world.sample(seed)
        path = tmp_path_factory.mktemp("img") / "shapes.png"
        sample.image.save(path)
        messages = to_messages(user_bubbles(sample.question, [str(path)]))
        if all(engine.run(messages, greedy(mode, 300)).stats.stop_reason == "max_new_tokens"
               for mode in ("think", "direct")):
            return sample.question, str(path), messages
    pytest.fail("no shapes question keeps the random model talking")


@pytest.fixture(scope="module")
def client(engine):
    demo = launch(build_demo(engine))
    yield Client(demo.local_url, verbose=False)
    demo.close()


@pytest.fixture(scope="module")
def question(long_question):
    """The API's `message` parameter for the long question (a fresh upload each call)."""
    text, image, _ = long_question
    return lambda: {"text": text, "files": [handle_file(image)]}


# -- handlers, called directly ------------------------------------------------------------------

def test_forced_think_streams_a_thinking_note_then_finishes(engine, long_question):
    stream = Runner(engine).answer(long_question[2], greedy("think", 16))
    shown = [(turn.messages(), turn) for turn in stream]  # one turn object, updated as events come
    (first, _), (last, turn) = shown[0], shown[-1]
    assert first[0]["metadata"]["status"] == "pending"
    assert last[0]["metadata"]["status"] == "done" and last[0]["metadata"]["title"].startswith("💭 Thought ·")
    assert turn.stats.stop_reason == "max_new_tokens"


def test_stop_event_ends_a_long_answer_and_frees_the_engine(engine, long_question, stream_log):
    cancel = threading.Event()
    stream = Runner(engine).answer(long_question[2],
                                   greedy("think", 16384), cancel=cancel)
    next(stream)
    cancel.set()
    *_, last = stream
    (call,) = stream_log.calls
    assert last.stopped and not call.finished  # closed early, not run to 16384 tokens
    assert engine.scheduler.idle(timeout=30)  # the batch is over, the engine is free


def test_chat_handler_streams_into_history_and_records_the_session(engine, long_question):
    text, image, _ = long_question
    state = Session()
    history = add_turn({"text": text, "files": [image]}, [], state).chatbot
    updates = list(respond(Runner(engine), history, "think", 0.5, 0, 8, 0, 1, state, None))
    chat, stats = updates[-2].chatbot, updates[-1].stats  # the last yield only adds the stats and figure
    assert chat[:1] == history and chat[1]["metadata"]["status"] == "done"
    assert "thinking" in stats and state.records[0].mode == "think" and updates[-1].chatbot is KEEP
    # the router figure came with the first tokens
    assert any(isinstance(u.routing_plot, go.Figure) for u in updates)


def test_chat_handler_shows_bad_settings_and_bad_images_as_messages(engine, tmp_path):
    state = Session()
    history = add_turn({"text": "hi", "files": []}, [], state).chatbot
    (update,) = respond(Runner(engine), history, "auto", 2.0, 0, 8, 0, 1, state, None)
    shown = update.chatbot[-1]
    assert shown["metadata"]["title"] == "⚠️ Error" and "threshold" in shown["content"]
    bad = tmp_path / "x.png"
    bad.write_text("no")
    history = add_turn({"text": "hi", "files": [str(bad)]}, [], state).chatbot
    (update,) = respond(Runner(engine), history, "auto", 0.5, 0, 8, 0, 1, state, None)
    assert "x.png" in update.chatbot[-1]["content"]


def test_stop_handler_stops_only_its_session(engine, long_question):
    text, image, _ = long_question
    mine, other = Session(), Session()
    history = add_turn({"text": text, "files": [image]}, [], mine).chatbot
    add_turn({"text": text, "files": [image]}, [], other)
    updates = respond(Runner(engine), history, "think", 0.5, 0, 16384, 0, 1, mine, None)
    next(updates)
    stop_answer(mine)
    *_, answer, last = updates
    assert last.stats == STOPPED_STATS and not other.cancel.is_set()
    assert answer.chatbot[-1]["content"].endswith(STOPPED_NOTE)


class Broken:
    """A runner whose model fails in an unexpected way (not a user error)."""

    def answer(self, *args, **kwargs):
        raise RuntimeError("GPU on fire")


def test_compare_handler_answers_with_both_experts_then_the_verdict(engine, long_question):
    text, image, _ = long_question
    updates = list(compare(Runner(engine), {"text": text, "files": [image]}, 8, Session(), None))
    first, last = updates[0], updates[-1]
    assert first.direct_answer == first.verdict == ""  # the direct expert waits for the thinking one
    assert "8 tokens" in last.think_stats and "8 tokens" in last.direct_stats
    assert last.verdict.startswith("The direct expert used")


def test_compare_handler_fails_like_the_chat(engine, long_question):
    """A bad setting and an internal error read as in the chat (runtime.failure_text), never a traceback."""
    state = Session()
    (update,) = compare(Runner(engine), {"text": "hi", "files": []}, -3, state, None)
    assert update.verdict.startswith("⚠️") and "max_new_tokens" in update.verdict and update.think_answer == ""
    (update,) = compare(Broken(), {"text": "hi", "files": []}, 8, state, None)
    assert update.verdict == "⚠️ Internal error: RuntimeError: GPU on fire"
    (update,) = respond(Broken(), add_turn({"text": "hi", "files": []}, [], state).chatbot,
                        "auto", 0.5, 0, 8, 0, 1, state, None)
    assert update.chatbot[-1]["content"] == "Internal error: RuntimeError: GPU on fire"


def test_compare_handler_stops_with_the_chats_note(engine, long_question):
    text, image, _ = long_question
    state = Session()
    updates = compare(Runner(engine), {"text": text, "files": [image]}, 16384, state, None)
    next(updates)
    stop_answer(state)
    *_, last = updates
    assert last.think_answer.endswith(STOPPED_NOTE) and last.direct_answer == "" and last.verdict == ""


# -- through the API ------------------------------------------------------------------------------

def test_chat_api_streams_thinking_then_answer(client, question):
    job = client.submit(question(), "think", api_name="/chat")
    updates = list(job)
    assert len(updates) >= 1
    final = job.result()
    assert final[0]["metadata"]["title"].startswith("💭 Thought ·")
    assert final[0]["metadata"]["status"] == "done"
    assert final[-1]["role"] == "assistant"
    direct = client.predict(question(), "direct", api_name="/chat")
    assert direct[0]["metadata"]["title"].startswith("⚡ Answered directly")


def test_route_api_returns_the_trace(client, question):
    trace = client.predict(question(), api_name="/route")
    assert {"p_think", "decision", "per_layer", "threshold", "mode"} <= trace.keys()
    assert trace["mode"] == "auto" and 0 <= trace["p_think"] <= 1


@pytest.mark.parametrize("kwargs, message", [
    ({"threshold": 2}, "threshold|maximum"),
    ({"max_new_tokens": -3}, "max_new_tokens|minimum"),
    ({"thinking_budget": -1}, "thinking_budget"),
])
def test_bad_settings_give_a_message_and_the_app_keeps_serving(client, question, kwargs, message):
    with pytest.raises(AppError, match=message):
        client.predict(question(), api_name="/chat", **kwargs)
    assert client.predict(question(), "direct", max_new_tokens=4, api_name="/chat")


def test_empty_question_and_bad_image_are_refused_clearly(client, tmp_path):
    with pytest.raises(AppError, match="Type a question"):
        client.predict({"text": " ", "files": []}, api_name="/route")
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(AppError, match="bad.png"):
        client.predict({"text": "hi", "files": [handle_file(str(bad))]}, api_name="/chat")


def test_cancelling_a_long_api_answer_frees_the_model(client, question, stream_log):
    job = client.submit(question(), "think", max_new_tokens=16384, api_name="/chat")
    assert stream_log.first_text.wait(timeout=60)  # the answer is streaming
    job.cancel()
    client.predict(question(), api_name="/route")  # needs the engine: the long answer let go of it
    (call,) = stream_log.calls
    assert not call.finished and len(call.events) < 16384  # closed early, not run to its end


def test_app_starts_without_a_model_and_says_why():
    demo = launch(build_demo(FileNotFoundError("the embedded model is missing")))
    try:
        with pytest.raises(AppError, match="model is not loaded.*embedded model is missing"):
            Client(demo.local_url, verbose=False).predict({"text": "hi", "files": []}, api_name="/chat")
    finally:
        demo.close()


def test_every_backend_offers_the_whole_interface(engine):
    """The UI reads a backend through serving/interface.py only; a missing model answers every
    member, the fine-tuning operations included, with its load error."""
    from metis.serving.interface import Backend
    from metis.serving.remote import RemoteEngine
    from metis.ui.runtime import ModelUnavailable, UnavailableEngine

    members = [name for name in vars(Backend) if not name.startswith("_")] + list(Backend.__annotations__)
    missing = UnavailableEngine(FileNotFoundError("gone"))
    for backend in (engine, missing, RemoteEngine):
        assert all(hasattr(backend, name) for name in members), backend
    assert engine.available and engine.error is None and engine.describe().limits is engine.limits
    assert not missing.available and missing.describe() is None and "gone" in missing.error
    for operation in (missing.features, missing.check_router, missing.save_model):
        with pytest.raises(ModelUnavailable, match="gone"):
            operation([], "x")


def test_spacefile_runs_the_app_entry_point():
    run = re.search(r"^\s*run:\s*python (\S+)", (ROOT / "Spacefile").read_text(), re.M).group(1)
    assert (ROOT / run).is_file() and "demo.launch(" in (ROOT / run).read_text()
    assert run == "app.py"  # the README front matter's app_file
