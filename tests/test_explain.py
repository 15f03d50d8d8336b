"""Why the router chose: exact per-token shares of the decision, through engine, CLI, app handler."""

import json
import math

import pytest
from PIL import Image

from metis.__main__ import main
from metis.explain import strongest
from metis.prompting import Message
from metis.tiny import world
from metis.ui.chat import add_turn, respond
from metis.ui.explanation import heatmap, question_scores
from metis.ui.runtime import Runner
from metis.ui.session import Session


def _logit(p: float) -> float:
    return math.log(p / (1 - p))


@pytest.mark.parametrize("with_image", [False, True])
def test_contributions_add_up_to_the_decision(engine, with_image):
    sample = world.sample(3)
    trace = engine.route([Message("user", sample.question, [sample.image] if with_image else [])])
    scores = [c["score"] for c in trace.contributions]
    assert sum(scores) == pytest.approx(_logit(trace.p_think), abs=1e-4)
    assert {c["kind"] for c in trace.contributions} == ({"text", "image"} if with_image else {"text"})
    start, end = trace.question
    assert "".join(c["token"] for c in trace.contributions[start:end]) == sample.question
    if with_image:  # 112x112 -> 8x8 patches -> a 4x4 grid of merged patches, in token order
        images = [c["score"] for c in trace.contributions if c["kind"] == "image"]
        assert [len(row) for row in trace.image_grids[0]] == [4] * 4
        assert [v for row in trace.image_grids[0] for v in row] == images


def test_contributions_follow_the_calibration_temperature(engine):
    messages = [Message("user", "How many circles?")]
    engine.model.config.router_temperature = 4.0
    try:
        hot = engine.route(messages)
    finally:
        engine.model.config.router_temperature = 1.0
    cold = engine.route(messages)
    assert sum(c["score"] for c in hot.contributions) == pytest.approx(_logit(hot.p_think), abs=1e-4)
    assert _logit(hot.p_think) == pytest.approx(_logit(cold.p_think) / 4, abs=1e-4)
    assert hot.decision == cold.decision  # at threshold 0.5 the temperature never changes a decision


def test_strongest_lists_each_side_in_order(engine):
    trace = engine.route([Message("user", "Count the squares and then add the circles, please.")])
    top = strongest(trace, k=5)
    assert len(top["think"]) <= 5 and len(top["direct"]) <= 5
    assert all(c["score"] > 0 for c in top["think"]) and all(c["score"] < 0 for c in top["direct"])
    assert [c["score"] for c in top["think"]] == sorted((c["score"] for c in top["think"]), reverse=True)
    assert [c["score"] for c in top["direct"]] == sorted(c["score"] for c in top["direct"])


def test_cli_route_prints_contributions_and_the_strongest_tokens(tiny_checkpoint, tmp_path, capsys):
    image = tmp_path / "a.png"
    Image.new("RGB", (112, 112), "red").save(image)
    assert main(["route", "--model", str(tiny_checkpoint), "--prompt", "How many squares?", "--image", str(image)]) == 0
    out = capsys.readouterr()
    trace = json.loads(out.out)
    assert {"token", "kind", "score"} == set(trace["contributions"][0])
    assert set(trace["strongest"]) == {"think", "direct"}
    assert "pushed hardest toward think" in out.err and "pushed hardest toward direct" in out.err


def test_chat_shows_the_question_coloured_and_the_image_heat_map(engine, tmp_path):
    path = tmp_path / "shapes.png"
    world.sample(4).image.save(path)
    state = Session()
    history = add_turn({"text": "How many circles?", "files": [str(path)]}, [], state).chatbot
    updates = list(respond(Runner(engine), history, "auto", 0.5, 0, 4, 0, 1, state, None))
    words, picture = next((u.why, u.why_image) for u in updates if isinstance(u.why, list))
    assert "".join(w for w, _ in words) == "How many circles?"
    assert max(abs(s) for _, s in words) == pytest.approx(1.0)
    assert isinstance(picture, Image.Image) and picture.size == (112, 112)


def test_heatmap_tints_toward_the_expert_colour():
    base = Image.new("RGB", (40, 20), "white")
    tinted = heatmap(base, [[1.0, -1.0]])
    left, right = tinted.getpixel((5, 10)), tinted.getpixel((35, 10))
    assert left[0] > left[1] and right[2] > right[0]  # purple-ish toward think, teal toward direct
    assert question_scores(None) is None
