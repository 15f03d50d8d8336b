"""Batched serving: several users in one `generate` call, each with the answer they get alone.

Batches are made deterministic by holding the model slot while requests queue up: the scheduler
forms its batch from everyone waiting when the slot comes free.
"""

import threading
import time

import pytest
import torch
from PIL import Image
from test_generation import CancelAfterChecks

from metis.prompting import Message, left_pad
from metis.serving.engine import Engine, GenerationSettings
from metis.serving.interface import collect
from metis.serving.requests import Row, RowEnd
from metis.serving.scheduler import BatchLimits, ModelSlot, Scheduler
from metis.streaming import Done, Routed
from metis.tiny import world

MIXED = [  # different prompt lengths, images of different sizes or none, every mode
    ("auto", "How many circles are there?", (112, 112)),
    ("think", "How many shapes are there in all, counting the circles and the squares twice over?", None),
    ("direct", "What colour is the square?", (224, 112)),
    ("think", "Count them.", (56, 84)),
    ("direct", "Is there a triangle in the picture here, or not?", None),
    ("auto", "Which shape is the biggest one?", (168, 168)),
]


def _messages(text, size):
    return [Message("user", text, [Image.new("RGB", size, (200, 40, 40))] if size else [])]


def _wait_for(condition, timeout=60.0):
    """Wait for a state of the engine (never asserts on how long it took)."""
    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, "the engine never reached the expected state"
        time.sleep(0.005)


def _together(engine, requests):
    """Run every (messages, settings, kwargs) as one batch, in this row order: the slot is held
    until all are queued, one after another."""
    results = [None] * len(requests)

    def consume(i, messages, settings, kwargs):
        results[i] = list(engine.stream(messages, settings, **kwargs))

    threads = [threading.Thread(target=consume, args=(i, *r)) for i, r in enumerate(requests)]
    before = engine.scheduler.batches
    with engine.slot.hold():
        for queued, t in enumerate(threads, 1):
            t.start()
            _wait_for(lambda queued=queued: engine.scheduler.waiting() == queued)
    for t in threads:
        t.join()
    return results, engine.scheduler.sizes_since(before)


@pytest.fixture(scope="module")
def shipped():
    return Engine.load(None)


@pytest.mark.parametrize("which", ["random", "shipped", "rehearsal"])
def test_mixed_batch_gives_every_row_its_serial_answer(engine, shipped, rehearsal, which):
    """Also on the rehearsal checkpoint: the real Qwen2.5 vocabulary, multi-token tags and stop
    strings, the published config's rope sections and Qwen2.5-VL's image sizes."""
    engine = {"random": engine, "shipped": shipped, "rehearsal": rehearsal}[which]
    requests = [(_messages(text, size), GenerationSettings(mode=mode, max_new_tokens=24 + 4 * i), {})
                for i, (mode, text, size) in enumerate(MIXED)]
    serial = [list(engine.stream(m, s)) for m, s, _ in requests]
    batched, sizes = _together(engine, requests)
    assert sizes == [len(MIXED)]
    for alone, together in zip(serial, batched):
        a, b = collect(alone), collect(together)
        assert (b.reasoning, b.answer) == (a.reasoning, a.answer)
        assert b.trace.decision == a.trace.decision and b.trace.p_think == pytest.approx(a.trace.p_think, abs=1e-5)
        assert [c["token"] for c in b.trace.contributions] == [c["token"] for c in a.trace.contributions]
        assert (b.stats.tokens, b.stats.stop_reason) == (a.stats.tokens, a.stats.stop_reason)
    decisions = {collect(r).trace.decision for r in batched}
    assert decisions == {"think", "direct"}


def test_forward_hooks_see_each_row_on_its_own_expert(engine):
    block = engine.model.moe_blocks()[0]
    think = engine.model.config.thinking_expert
    seen = {0: [], 1: []}
    inputs = []
    hooks = [block.register_forward_pre_hook(lambda m, args: inputs.append(args[0].detach().clone()))]
    hooks += [expert.register_forward_pre_hook(lambda m, args, e=e: seen[e].append(args[0].detach().clone()))
              for e, expert in enumerate(block.experts)]
    modes = ["think", "direct", "think", "direct"]
    requests = [(_messages(MIXED[i][1], MIXED[i][2]), GenerationSettings(mode=m, max_new_tokens=6), {})
                for i, m in enumerate(modes)]
    try:
        _, sizes = _together(engine, requests)
    finally:
        for h in hooks:
            h.remove()
    assert sizes == [4]
    rows = {think: [0, 2], 1 - think: [1, 3]}
    for step, x in enumerate(inputs):  # the prefill, then one call per decoding step
        for expert, chosen in rows.items():
            assert torch.equal(seen[expert][step], x[chosen]), f"step {step}: expert {expert} got other rows"


def test_cancelling_one_row_leaves_the_others_unchanged(engine):
    requests = [(_messages(text, size), GenerationSettings(mode=mode, max_new_tokens=20), {})
                for mode, text, size in MIXED[:4]]
    serial = [collect(engine.stream(m, s)) for m, s, _ in requests]
    requests[1] = (*requests[1][:2], {"cancel": CancelAfterChecks(4)})
    batched, sizes = _together(engine, requests)
    assert sizes == [4]
    stopped = batched[1][-1].stats
    assert stopped.stop_reason == "cancelled" and stopped.tokens == 3
    for i in (0, 2, 3):
        assert (collect(batched[i]).answer, collect(batched[i]).reasoning) == (serial[i].answer, serial[i].reasoning)


def test_per_row_limits_and_thinking_budget(shipped):
    sample = world.generate("test", 1, family="reasoning")[0]
    question = [Message("user", sample.question, [sample.image])]
    settings = [GenerationSettings(mode="think", max_new_tokens=5), GenerationSettings(mode="think", thinking_budget=3),
                GenerationSettings(mode="think", max_new_tokens=64)]
    serial = [collect(shipped.stream(question, s)) for s in settings]
    batched, sizes = _together(shipped, [(question, s, {}) for s in settings])
    assert sizes == [3]
    got = [collect(b) for b in batched]
    assert got[0].stats.tokens == 5 and got[0].stats.stop_reason == "max_new_tokens"
    assert got[1].stats.thinking_tokens <= 3
    for a, b in zip(serial, got):
        assert (a.reasoning, a.answer, a.stats.tokens) == (b.reasoning, b.answer, b.stats.tokens)


def test_only_per_token_routing_runs_in_a_batch_of_its_own(engine):
    """Greedy and sampled rows, seeded or not, share the running batch; a seeded row draws from its
    own generator, so it gets its solo answer in any company. Token mode routes at every step."""
    question = _messages("How many circles?", None)
    seeded = GenerationSettings(max_new_tokens=6, temperature=0.7, seed=1)
    alone = collect(engine.stream(question, seeded)).answer
    requests = [(question, GenerationSettings(max_new_tokens=3), {}), (question, seeded, {}),
                (question, GenerationSettings(max_new_tokens=3, temperature=0.9), {}), (question, seeded, {}),
                (question, GenerationSettings(max_new_tokens=3, mode="token"), {})]
    results, sizes = _together(engine, requests)
    assert sizes == [4, 1]  # the token-mode row waits for the batch to empty
    assert all(isinstance(r[-1], Done) for r in results)
    assert collect(results[1]).answer == collect(results[3]).answer == alone


class _Running:
    """A stand-in running batch whose rows each end after `steps` decode steps; it records the
    scheduler's step count and the prompt lengths at every join."""

    def __init__(self, scheduler_steps, joins, first_step=lambda: None, steps=20):
        self.now, self.joins, self.steps, self.live = scheduler_steps, joins, steps, {}
        self.first_step = first_step  # runs before the first step: the test lines up its turn
        self.key, self.length = None, 0

    def __len__(self):
        return len(self.live)

    def remaining(self):
        return 0

    def join(self, rows):
        self.joins.append((self.now(), [r.prompt_tokens for r in rows]))
        self.live.update({row: self.steps for row in rows})

    def step(self):
        self.first_step()
        self.first_step = lambda: None
        self.live = {row: left - 1 for row, left in self.live.items()}
        for row in [r for r, left in self.live.items() if left == 0]:
            row.end(RowEnd("max_new_tokens"))
            del self.live[row]


def test_batch_limits_bound_rows_and_padded_tokens():
    slot = ModelSlot()
    joined = []
    scheduler = Scheduler(lambda: _Running(lambda: 0, joined, steps=1), BatchLimits(3, 100), slot)

    def row(n):
        return Row({"input_ids": torch.zeros(1, n, dtype=torch.long)}, GenerationSettings())

    with slot.hold():
        for n in (10, 20, 10, 10, 60, 10):
            scheduler.submit(row(n))
    assert scheduler.idle(timeout=30)
    # 3 rows at most; rows x longest prompt <= 100, so the 60-token prompt joins on its own
    assert [lengths for _, lengths in joined] == [[10, 20, 10], [10, 10], [60]]


def test_routing_runs_between_the_steps_of_a_running_batch(engine):
    """A routing call returns while a (practically endless) answer is still being decoded, and
    the answer's own tokens do not change because of it."""
    cancel = threading.Event()
    first_token = threading.Event()
    events = []

    def long_answer():
        for event in engine.stream(_messages("Count the circles.", (112, 112)),
                                   GenerationSettings(mode="think", max_new_tokens=16384), cancel=cancel):
            events.append(event)
            if not isinstance(event, Routed):
                first_token.set()

    from bench.common import fixed_length

    with fixed_length(engine.model, 16384):
        worker = threading.Thread(target=long_answer)
        worker.start()
        assert first_token.wait(60)
        traces = [engine.route(_messages(text, size)) for _, text, size in MIXED]
        still_running = worker.is_alive()
        cancel.set()
        worker.join()
    assert still_running and events[-1].stats.stop_reason == "cancelled"
    assert traces == [engine.route(_messages(text, size)) for _, text, size in MIXED]


def test_a_batch_with_routing_calls_in_between_matches_serial(engine):
    requests = [(_messages(text, size), GenerationSettings(mode=mode, max_new_tokens=40), {})
                for mode, text, size in MIXED[:3]]
    serial = [collect(engine.stream(m, s)) for m, s, _ in requests]
    done = threading.Event()

    def keep_routing():
        while not done.is_set():
            engine.route(_messages("What colour is the circle?", (224, 224)), router=None)

    router = threading.Thread(target=keep_routing)
    router.start()
    try:
        batched, _ = _together(engine, requests)
    finally:
        done.set()
        router.join()
    for a, b in zip(serial, batched):
        assert (collect(b).reasoning, collect(b).answer) == (a.reasoning, a.answer)


def test_left_pad_keeps_each_prompt_at_the_right_edge(engine):
    prompts = [engine.prompts.build(_messages(text, size)) for _, text, size in MIXED[:3]]
    batch = left_pad(prompts, pad_id=engine.tokenizer.pad_token_id)
    width = batch["input_ids"].shape[1]
    for row, p in enumerate(prompts):
        n = p["input_ids"].shape[1]
        assert torch.equal(batch["input_ids"][row, width - n:], p["input_ids"][0])
        assert batch["attention_mask"][row].sum() == n
    assert batch["image_grid_thw"].shape[0] == 2  # rows 0 and 2 have an image, in row order


def test_failed_batch_reports_to_every_row(engine, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("injected fault")

    monkeypatch.setattr(engine.model, "forward", broken)
    question = _messages("How many circles?", None)
    results, sizes = _together(engine, [(question, GenerationSettings(max_new_tokens=3), {})] * 3)
    assert sizes == [3] and all("injected fault" in r[-1].message for r in results)
    monkeypatch.undo()
    assert isinstance(list(engine.stream(question, GenerationSettings(max_new_tokens=3)))[-1], Done)


def test_max_batch_one_answers_one_at_a_time(tiny_checkpoint):
    single = Engine.load(str(tiny_checkpoint), batch=BatchLimits(max_batch=1))
    question = _messages("How many circles?", None)
    results, sizes = _together(single, [(question, GenerationSettings(max_new_tokens=3), {})] * 3)
    assert sizes == [1, 1, 1] and all(isinstance(r[-1], Done) for r in results)


def test_app_takes_max_batch_from_its_flag_and_the_other_limits_from_the_environment():
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ, METIS_MAX_BATCH_TOKENS="999", HF_HUB_OFFLINE="1")
    code = ("import sys; sys.argv = ['app.py', '--max-batch', '3']; import app, json, dataclasses; "
            "print(json.dumps(dataclasses.asdict(app.engine.batch)))")
    out = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    limits = json.loads(out.stdout.strip().splitlines()[-1])
    assert limits == {"max_batch": 3, "max_batch_tokens": 999, "max_kv_tokens": None, "join_ratio": 1.0,
                      "join_wait_steps": 4}



def test_stop_reason_takes_the_first_that_holds():
    from metis.serving.batch import StopRules, stop_reason

    rules = StopRules(eos_ids=[2], close_ids=[9], stop_strings=None)
    limit = GenerationSettings(max_new_tokens=5)

    def reason(last, generated=1, **kw):
        return stop_reason(last, generated, limit, rules, **{"closed_by_string": False, "cancelled": False,
                                                               "late": False, **kw})

    assert reason(2, generated=5, cancelled=True) == "eos"
    assert reason(9) == reason(4, closed_by_string=True) == "end_of_answer"
    assert reason(4, generated=5, cancelled=True) == "max_new_tokens"
    assert reason(4, cancelled=True, late=True) == "cancelled"
    assert reason(4, late=True) == "deadline"
    assert reason(4) is None


def test_a_routing_call_inside_a_batch_with_a_session_router_sees_the_shipped_gates(engine):
    """A batch that answers with a session's fine-tuned gates pauses for a routing call: the call
    routes with the shipped gates, and the batch gets its own back."""
    shipped = {k: v.clone() for k, v in engine.model.router_state_dict().items()}
    neutral = {k: torch.zeros_like(v) for k, v in shipped.items()}
    question = _messages("How many circles are there?", (112, 112))
    expected = engine.route(question).p_think
    cancel = threading.Event()
    first = threading.Event()
    traces = []

    def answer():
        for event in engine.stream(question, GenerationSettings(max_new_tokens=16384), cancel=cancel, router=neutral):
            if isinstance(event, Routed):
                traces.append(event.trace)
            else:
                first.set()

    from bench.common import fixed_length

    with fixed_length(engine.model, 16384):
        worker = threading.Thread(target=answer)
        worker.start()
        assert first.wait(60)
        inside = engine.route(question).p_think
        cancel.set()
        worker.join()
    assert traces[0].p_think == pytest.approx(0.5)  # the batch routed with the neutral session gates
    assert inside == pytest.approx(expected)
    assert engine.scheduler.idle(timeout=30)  # the batch has put the shipped gates back
    after = engine.model.router_state_dict()
    assert all(torch.equal(after[k], shipped[k]) for k in shipped)
