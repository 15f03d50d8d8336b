"""The shipped embedded model: loads offline, routes and answers held-out questions.

Small samples of each held-out set, with thresholds a few points under what `python -m metis eval`
measures on the full sets (see the model card), so a change that breaks generalisation fails CI:
- the template split (test images, training wordings);
- the unseen-wording split (test images, frames and prefixes never trained on);
- natural questions outside the world (held-out templates), text only and with an image.
"""

import os

import pytest

from metis.loading import EMBEDDED
from metis.prompting import Message
from metis.serving.engine import Engine, GenerationSettings
from metis.tiny import corpus, world

HELD_OUT = world.generate("test", 12)
SAMPLE = 40
# full-set figures (model card): template 100% routed / 100% right, unseen 95.3% / 90.3%,
# natural 91.8% text only / 92.5% with an image; these 40-question samples: unseen 92.5% / 85%,
# natural 90% both ways (40 questions move several points either way: these catch a model that
# has lost generalisation, not a one-point change)
TEMPLATE_ROUTED, TEMPLATE_CORRECT = 0.95, 0.92
UNSEEN_ROUTED, UNSEEN_CORRECT = 0.85, 0.78
NATURAL_AGREEMENT = 0.82


@pytest.fixture(scope="module")
def shipped():
    os.environ["HF_HUB_OFFLINE"] = "1"  # nothing may be downloaded
    return Engine.load(None)


def test_embedded_checkpoint_is_small_and_complete():
    files = {p.name for p in EMBEDDED.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "preprocessor_config.json", "README.md"} <= files
    assert sum(p.stat().st_size for p in EMBEDDED.iterdir()) < 40 * 2**20


def _shapes_scores(engine, samples):
    routed = correct = 0
    for sample in samples:
        result = engine.run([Message("user", sample.question, [sample.image])], GenerationSettings(max_new_tokens=64))
        routed += result.trace.decision == ("think" if sample.family == "reasoning" else "direct")
        correct += world.answers_match(result.answer, sample.answer)
    return routed / len(samples), correct / len(samples)


def test_template_split_is_routed_and_answered(shipped):
    routed, correct = _shapes_scores(shipped, world.generate("test", SAMPLE, wording="train"))
    assert routed >= TEMPLATE_ROUTED and correct >= TEMPLATE_CORRECT, (routed, correct)


def test_unseen_wordings_are_routed_and_answered(shipped):
    """Generalisation: sentence structures and prefixes the model never read."""
    routed, correct = _shapes_scores(shipped, world.generate("test", SAMPLE, wording="test"))
    assert routed >= UNSEEN_ROUTED and correct >= UNSEEN_CORRECT, (routed, correct)


@pytest.mark.parametrize("with_image", [False, True])
def test_natural_questions_are_routed_by_their_label(shipped, with_image):
    images = world.generate("test", SAMPLE)
    agree = sum(
        shipped.route([Message("user", q.text, [images[i].image] if with_image else [])]).decision == q.label
        for i, q in enumerate(corpus.generate("test", SAMPLE))
    )
    assert agree / SAMPLE >= NATURAL_AGREEMENT, agree


def test_a_question_outside_the_world_gets_the_honest_sentence(shipped):
    result = shipped.run([Message("user", "A train travels 120 km in 2 hours. What is its average speed?")])
    assert result.answer == corpus.REFUSAL


def test_thinking_answers_show_their_chain(shipped):
    sample = next(s for s in HELD_OUT if s.family == "reasoning")
    result = shipped.run([Message("user", sample.question, [sample.image])], GenerationSettings(mode="think"))
    assert result.reasoning.strip() and result.stats.thinking_tokens > 5
    direct = shipped.run([Message("user", sample.question, [sample.image])], GenerationSettings(mode="direct"))
    assert direct.reasoning == "" and direct.stats.thinking_tokens <= 1


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
