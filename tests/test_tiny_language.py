"""The tiny world's wordings and natural questions: held-out pools that really are held out."""

import random

import pytest
import torch

from metis.calibration import expected_calibration_error, fit_temperature
from metis.tiny import corpus, phrasing, world


def test_frames_and_prefixes_are_disjoint_between_pools():
    for qtype, pools in phrasing.FRAMES.items():
        assert set(pools) == set(phrasing.POOLS), qtype
        for a in phrasing.POOLS:
            for b in phrasing.POOLS:
                if a < b:
                    assert not set(pools[a]) & set(pools[b]), (qtype, a, b)
    trained = {p for p in phrasing.PREFIXES["train"] if p}
    assert not trained & set(phrasing.PREFIXES["test"]) and not trained & set(phrasing.PREFIXES["val"])


def test_every_task_is_worded_from_every_pool():
    qtypes = {q for family in world.QTYPES.values() for q in family}
    assert qtypes == set(phrasing.FRAMES)
    assert len(world.QTYPES["direct"]) == len(world.QTYPES["reasoning"]) == 7
    for pool in phrasing.POOLS:
        seen = {s.qtype for s in world.generate("test", 300, wording=pool)}
        assert seen == qtypes, pool


def test_unseen_wordings_never_occur_in_training():
    train = {s.question.lower().rstrip("?.") for s in world.generate("train", 3000)}
    unseen = [s.question.lower().rstrip("?.") for s in world.generate("test", 300, wording="test")]
    assert sum(q in train for q in unseen) == 0


def test_same_image_and_answer_whatever_the_wording():
    for i in range(50):
        a, b = world.sample(1000 + i, wording="train"), world.sample(1000 + i, wording="test")
        assert a.image.tobytes() == b.image.tobytes() and a.cells == b.cells and a.qtype == b.qtype


def test_surface_variants_keep_the_question_readable():
    rng = random.Random(0)
    texts = [phrasing.surface(rng, "How many circles are there?", "train") for _ in range(400)]
    assert len(set(texts)) > 20
    assert any(t.islower() for t in texts) and any(not t.endswith("?") for t in texts)


def test_corpus_has_thirty_kinds_of_both_labels_and_disjoint_templates():
    assert len(corpus.KINDS) >= 30
    labels = {label for label, _ in corpus.KINDS.values()}
    assert labels == {"think", "direct"}
    for kind, (_, pools) in corpus.KINDS.items():
        assert not set(pools["train"]) & set(pools["test"]), kind
        assert not set(pools["train"]) & set(pools["val"]), kind


def test_corpus_is_balanced_deterministic_and_filled():
    qs = corpus.generate("test", 200)
    assert qs == corpus.generate("test", 200)
    assert sum(q.label == "think" for q in qs) == 100
    assert not any("{" in q.text for q in qs)
    assert corpus.target(False) == f"<think></think><answer>{corpus.REFUSAL}</answer>"


def test_temperature_scaling_recovers_a_known_temperature():
    g = torch.Generator().manual_seed(0)
    true_logit = torch.randn(4000, generator=g) * 2
    labels = torch.bernoulli(torch.sigmoid(true_logit), generator=g)
    overconfident = true_logit * 5  # an uncalibrated router: margins five times too large
    t = fit_temperature(overconfident, labels)
    assert t == pytest.approx(5.0, rel=0.15)
    before = expected_calibration_error(torch.sigmoid(overconfident), labels)
    after = expected_calibration_error(torch.sigmoid(overconfident / t), labels)
    assert after < 0.03 < before
