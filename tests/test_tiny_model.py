"""The shipped embedded model: loads offline, routes each family to its expert, answers right.

The questions are the first twelve of the held-out split (six per family): a handful, quick.
"""

import os

import pytest

from metis.generation import Engine, GenerationSettings
from metis.loading import EMBEDDED
from metis.prompting import Message
from metis.tiny import world

HELD_OUT = world.generate("test", 12)


@pytest.fixture(scope="module")
def shipped():
    os.environ["HF_HUB_OFFLINE"] = "1"  # nothing may be downloaded
    return Engine.load(None)


def test_embedded_checkpoint_is_small_and_complete():
    files = {p.name for p in EMBEDDED.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "preprocessor_config.json", "README.md"} <= files
    assert sum(p.stat().st_size for p in EMBEDDED.iterdir()) < 40 * 2**20


@pytest.mark.parametrize("sample", HELD_OUT, ids=[f"{s.family}-{s.qtype}-{i}" for i, s in enumerate(HELD_OUT)])
def test_held_out_question_routed_and_answered(shipped, sample):
    result = shipped.run([Message("user", sample.question, [sample.image])], GenerationSettings(max_new_tokens=64))
    expected = "think" if sample.family == "reasoning" else "direct"
    assert result.trace.decision == expected
    assert world.answers_match(result.answer, sample.answer), (result.reasoning, result.answer, sample.answer)
    if expected == "think":
        assert result.reasoning.strip() and result.stats.thinking_tokens > 5
    else:
        assert result.reasoning == "" and result.stats.thinking_tokens <= 1


def test_forcing_direct_on_reasoning_loses_the_chain(shipped):
    sample = next(s for s in HELD_OUT if s.family == "reasoning")
    result = shipped.run([Message("user", sample.question, [sample.image])], GenerationSettings(mode="direct"))
    assert result.trace.decision == "direct" and result.reasoning == ""


def test_generation_ends_at_the_close_of_the_answer(shipped):
    """Nothing after `</answer>` is shown, so nothing after it is generated."""
    sample = HELD_OUT[0]
    result = shipped.run([Message("user", sample.question, [sample.image])], GenerationSettings(max_new_tokens=64))
    assert result.stats.stop_reason == "end_of_answer"


def test_tokens_that_show_nothing_still_give_control(shipped):
    """Forced past its answer, the model writes text nobody sees: `Progress` events keep coming,
    so a consumer can stop it (the UI's Stop, a client's cancel) long before it ends."""
    from bench.common import fixed_length
    from metis.streaming import AnswerDelta, Progress

    sample = HELD_OUT[0]
    with fixed_length(shipped.model, 2000):
        events = shipped.stream([Message("user", sample.question, [sample.image])],
                                GenerationSettings(max_new_tokens=2000))
        seen, after_answer = [], 0
        for event in events:
            seen.append(event)
            after_answer += isinstance(event, Progress) and any(isinstance(e, AnswerDelta) for e in seen)
            if after_answer == 3:
                events.close()  # what Stop does
                break
    assert after_answer == 3 and seen[-1].tokens < 2000
