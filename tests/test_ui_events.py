"""Pure pieces of the UI: events -> chat messages, history -> messages, stats and figures."""

from copy import deepcopy

import pytest
from PIL import Image

from metis.prompting import PromptError
from metis.routing import RoutingTrace
from metis.streaming import AnswerDelta, Done, Failed, GenerationStats, ReasoningDelta, Routed
from metis.ui.events import ChatTurn, readable_math, to_messages, user_bubbles
from metis.ui.plots import history_figure, routing_figure
from metis.ui.session import Session, stats_markdown
from metis.ui.values import settings


def trace(decision="think", p=0.8, mode="auto"):
    return RoutingTrace(p, decision, [p, 0.4, 0.3], mode, 0.5)


def stats(tokens=10, thinking=4, reason="eos"):
    return GenerationStats(0.1, 1.0, tokens, thinking, reason)


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_thinking_message_goes_pending_then_done_with_duration_and_tokens():
    clock = Clock()
    turn = ChatTurn(clock)
    turn.feed(Routed(trace()))
    (note,) = turn.messages()
    assert note["metadata"] == {"title": "💭 Thinking…", "status": "pending"}
    for piece in ("two ", "plus ", "two"):
        turn.feed(ReasoningDelta(piece))
    assert turn.messages()[0]["content"] == "two plus two"
    clock.now = 1.25
    turn.feed(AnswerDelta("4"))
    note, answer = turn.messages()
    assert note["metadata"]["status"] == "done"
    assert note["metadata"]["duration"] == 1.25
    assert note["metadata"]["title"] == "💭 Thought · 3 tokens"
    assert answer == {"role": "assistant", "content": "4"}
    clock.now = 9.0  # the final stats correct the token count but not the thinking time
    turn.feed(Done(stats(thinking=5)))
    assert turn.messages()[0]["metadata"] == {"title": "💭 Thought · 5 tokens", "status": "done", "duration": 1.25}


def test_direct_answer_carries_a_note_with_the_router_probability():
    turn = ChatTurn()
    turn.feed(Routed(trace("direct", 0.12)))
    turn.feed(AnswerDelta("blue"))
    note, answer = turn.messages()
    assert note["metadata"]["title"] == "⚡ Answered directly · p(think)=0.12"
    assert answer["content"] == "blue"
    forced = ChatTurn()
    forced.feed(Routed(trace("direct", 0.9, mode="direct")))
    assert "(forced)" in forced.messages()[0]["metadata"]["title"]


def test_failure_and_stop_are_shown_and_close_the_thought():
    turn = ChatTurn()
    turn.feed(Routed(trace()))
    turn.feed(Failed("Generation failed: RuntimeError: boom", stats(reason="error")))
    assert turn.messages()[0]["metadata"]["status"] == "done"
    assert turn.messages()[-1]["metadata"]["title"] == "⚠️ Error"
    assert "boom" in turn.messages()[-1]["content"]
    stopped = ChatTurn()
    stopped.feed(Routed(trace()))
    stopped.feed(ReasoningDelta("hmm"))
    stopped.stop()
    assert stopped.messages()[0]["metadata"]["status"] == "done"
    assert "stopped" in stopped.messages()[-1]["content"]


@pytest.mark.parametrize("text, shown", [
    (r"so \boxed{42}.", r"so $\boxed{42}$."),
    (r"$x = \boxed{3}$ and \boxed{\frac{1}{2}}", r"$x = \boxed{3}$ and $\boxed{\frac{1}{2}}$"),
    (r"\[ \boxed{7} \]", r"\[ \boxed{7} \]"),
    (r"streaming \boxed{4", r"streaming \boxed{4"),
])
def test_boxed_answers_render_as_math(text, shown):
    assert readable_math(text) == shown


def test_history_blocks_become_messages_without_reasoning(tmp_path):
    Image.new("RGB", (32, 32), "red").save(tmp_path / "a.png")
    history = [
        {"role": "user", "content": [{"type": "file", "file": {"path": str(tmp_path / "a.png")}}]},
        {"role": "user", "content": [{"type": "text", "text": "What colour?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "thinking..."}],
         "metadata": {"title": "💭 Thought · 3 tokens", "duration": 1.0}},
        {"role": "assistant", "content": [{"type": "text", "text": "red"}], "metadata": None},
        {"role": "user", "content": [{"type": "text", "text": "Sure?"}]},
    ]
    user, assistant, again = to_messages(history)
    assert (user.role, user.text, len(user.images)) == ("user", "What colour?", 1)
    assert (assistant.role, assistant.text) == ("assistant", "red")
    assert again.text == "Sure?"
    assert to_messages(user_bubbles("hi", [str(tmp_path / "a.png")]))[0].images[0].size == (32, 32)


def test_unreadable_image_is_a_clear_request_error(tmp_path):
    bad = tmp_path / "notes.png"
    bad.write_text("not an image")
    with pytest.raises(PromptError, match="notes.png"):
        to_messages(user_bubbles("what is this?", [str(bad)]))


def test_settings_refuse_instead_of_clamping():
    def request(mode, threshold, max_new_tokens):
        return settings(mode=mode, threshold=threshold, thinking_budget=0, max_new_tokens=max_new_tokens,
                        temperature=0, top_p=1)

    assert request("Think", 0.3, 64).mode == "think"
    assert request("auto", None, 64).thinking_budget is None
    with pytest.raises(ValueError, match="threshold"):
        request("auto", 2, 64)
    with pytest.raises(ValueError, match="max_new_tokens"):
        request("auto", 0.5, -5)
    with pytest.raises(ValueError, match="whole number"):
        request("auto", 0.5, 12.5)


def test_each_browser_session_gets_its_own_state():
    shared = Session()
    shared.records.append("x")
    copy = deepcopy(shared)  # what gr.State does per browser session
    assert copy is not shared and copy.records == [] and copy.cancel is not shared.cancel


def test_session_stats_and_tokens_saved():
    session = Session()
    assert "unknown" in stats_markdown(trace("direct", 0.2), stats(8, 0), session)
    session.record(trace("think", 0.9, mode="think"), stats(100, 80))
    session.record(trace("direct", 0.2), stats(8, 0))
    session.record(trace("think", 0.7), stats(50, 30))
    assert session.thinking_ratio() == 0.5  # forced answers do not count
    text = stats_markdown(trace("direct", 0.2), stats(8, 0), session)
    assert "≈ 92" in text and "50% of 2 routed questions" in text


def test_figures_show_layers_threshold_and_history():
    fig = routing_figure(trace("direct", 0.3))
    assert list(fig.data[0].y) == [0.3, 0.4, 0.3]
    assert fig.layout.shapes[0].y0 == 0.5  # the threshold line
    assert "direct expert" in fig.layout.title.text
    assert routing_figure(None).layout.annotations
    session = Session()
    session.record(trace("think", 0.9), stats())
    session.record(trace("direct", 0.1, mode="direct"), stats())
    hist = history_figure(session.records)
    assert list(hist.data[0].y) == [0.9, 0.1] and list(hist.data[1].y) == [1.0, 1.0]
