"""Joining a running batch: a newcomer is prefilled between two decode steps and decodes beside
the rows already running; every answer, the newcomer's and the running ones', equals its solo one.

Joins are made deterministic with the model slot: the batch hands the model to a waiting caller
between two steps (`ModelSlot.pause`), so a test that takes that turn queues the newcomers while
the batch stands still, and they join at the very next step.
"""

import threading

import pytest
import torch
from test_batching import MIXED, _messages, _Running, _wait_for

from bench.common import fixed_length
from metis.serving.engine import GenerationSettings
from metis.serving.interface import collect
from metis.serving.requests import BatchLimits, Row
from metis.serving.scheduler import ModelSlot, Scheduler
from metis.streaming import Done

LONG = 48  # tokens of the running answer: it is still running when the newcomers join


def join_mid_batch(engine, first, joiners):
    """`first` (messages, settings) runs alone; between its first steps the `joiners` arrive."""
    results = {}

    def consume(key, messages, settings):
        results[key] = list(engine.stream(messages, settings))

    runner = threading.Thread(target=consume, args=("first", *first))
    assert engine.scheduler.idle(timeout=60)  # no earlier batch's worker left to pass the model to
    before = engine.scheduler.batches
    with engine.slot.hold():  # the batch's worker queues for the model behind this caller
        runner.start()
        _wait_for(lambda: engine.scheduler.waiting() == 1 and engine.slot.waiting() == 1)
    with engine.slot.hold():  # granted between two steps of the running batch
        threads = [threading.Thread(target=consume, args=(i, *j)) for i, j in enumerate(joiners)]
        for t in threads:
            t.start()
        _wait_for(lambda: engine.scheduler.waiting() == len(joiners))
    for t in [runner, *threads]:
        t.join()
    return results, engine.scheduler.sizes_since(before)


@pytest.fixture(scope="module")
def shipped():
    from metis.serving.engine import Engine

    return Engine.load(None)


@pytest.mark.parametrize("which", ["random", "shipped", "rehearsal"])
def test_newcomers_join_between_steps_and_get_their_solo_answers(engine, shipped, rehearsal, which):
    """Different prompt lengths and images (or none), every mode, on the embedded model, a random
    one and the rehearsal checkpoint (the real Qwen2.5 vocabulary, multi-token tags)."""
    engine = {"random": engine, "shipped": shipped, "rehearsal": rehearsal}[which]
    first = (_messages(MIXED[1][1], MIXED[1][2]), GenerationSettings(mode="think", max_new_tokens=LONG))
    joiners = [(_messages(text, size), GenerationSettings(mode=mode, max_new_tokens=8 + 4 * i))
               for i, (mode, text, size) in enumerate(MIXED[2:])]
    with fixed_length(engine.model, LONG):  # every answer runs to its own token limit
        alone = {"first": collect(engine.stream(*first))}
        alone |= {i: collect(engine.stream(*j)) for i, j in enumerate(joiners)}
        results, sizes = join_mid_batch(engine, first, joiners)
    assert sizes == [1, len(joiners)]  # the running answer, then the newcomers in one prefill
    for key, solo in alone.items():
        got = collect(results[key])
        assert isinstance(results[key][-1], Done)
        assert (got.reasoning, got.answer, got.stats.tokens) == (solo.reasoning, solo.answer, solo.stats.tokens)
        assert got.trace.decision == solo.trace.decision
        assert got.trace.p_think == pytest.approx(solo.trace.p_think, abs=1e-5)
    assert collect(results["first"]).stats.tokens == LONG  # it kept decoding beside the newcomers


def test_a_row_that_ends_leaves_and_the_rest_go_on(engine):
    """Rows with different limits end at different steps; each leaves the cache at once and the
    others' answers do not change (their solo answers)."""
    requests = [(_messages(text, size), GenerationSettings(mode=mode, max_new_tokens=3 + 9 * i))
                for i, (mode, text, size) in enumerate(MIXED[:4])]
    with fixed_length(engine.model, 64):
        alone = [collect(engine.stream(*r)) for r in requests]
        results, sizes = join_mid_batch(engine, requests[0], requests[1:])
    assert sizes == [1, 3]
    got = [collect(results["first"])] + [collect(results[i]) for i in range(3)]
    assert [g.stats.tokens for g in got] == [3, 12, 21, 30]
    assert [(g.reasoning, g.answer) for g in got] == [(a.reasoning, a.answer) for a in alone]


@pytest.mark.parametrize("newcomers, joins_at_step", [(1, 1 + 4), (4, 1)])
def test_newcomers_join_in_groups_or_after_a_few_steps(newcomers, joins_at_step):
    """Beside 4 running rows, 4 newcomers join at the next step, while a lone one waits
    `join_wait_steps` (4) steps for company: each joining prefill stops every running row."""
    slot, joins = ModelSlot(), []
    in_turn = lambda: _wait_for(lambda: slot.waiting() == 1)  # noqa: E731  (the test queues for its turn)
    scheduler = Scheduler(lambda: _Running(lambda: scheduler.steps, joins, in_turn), BatchLimits(), slot)

    def row():
        return Row({"input_ids": torch.zeros(1, 5, dtype=torch.long)}, GenerationSettings())

    with slot.hold():
        for _ in range(4):
            scheduler.submit(row())
        _wait_for(lambda: slot.waiting() == 1)  # the worker queues behind this caller
    with slot.hold():  # the batch's first pause, after its first step: the newcomers arrive now
        for _ in range(newcomers):
            scheduler.submit(row())
    assert scheduler.idle(timeout=30)
    assert joins == [(0, [5] * 4), (joins_at_step, [5] * newcomers)]
