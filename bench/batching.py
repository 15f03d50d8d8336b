"""Serving a crowd: aggregate tokens/s with 1, 4, 8 and 16 users asking at once, same run.

Each level sends the same requests (held-out tiny-world questions with their images, greedy, a
fixed number of tokens so every level does the same work) from that many client threads, each
asking its next question as soon as its answer ends, the way chat users do. The clock starts
once every client's first request is waiting, so N users are really at once from the start; then
each new request joins the running batch between two steps. `mean_batch` is the mean number of
rows per decode step; `session_routers_mean_batch` the same at 16 users when every other one
chats with a fine-tuned router. `identical` compares every answer with the one the same request
gets alone.
"""

from __future__ import annotations

import queue
import threading
import time

from metis.prompting import Message
from metis.serving.engine import Engine, GenerationSettings
from metis.serving.interface import collect
from metis.tiny import world

from .common import Row, fixed_length, start_in_one_batch, verdict

LEVELS = (1, 4, 8, 16)
TARGET = 3.0  # speedup_16 on this CPU (issue 12)
NATURAL_TOKENS = 48  # the load test's max_new_tokens (tests/loadtest.py)


def _occupied(engine: Engine, requests: list, clients: int) -> tuple[float, list, float]:
    """`_serve`, and the mean number of rows per decode step while it ran."""
    steps, rows = engine.scheduler.steps, engine.scheduler.step_rows
    seconds, answers = _serve(engine, requests, clients)
    return seconds, answers, round((engine.scheduler.step_rows - rows) / max(engine.scheduler.steps - steps, 1), 2)


def _serve(engine: Engine, requests: list, clients: int) -> tuple[float, list]:
    """Wall seconds for all requests (messages, settings[, router]) from `clients` threads, and
    the answers in request order."""
    todo: queue.SimpleQueue = queue.SimpleQueue()
    for item in enumerate(requests):
        todo.put(item)
    answers = [None] * len(requests)

    def client():
        while True:
            try:
                i, (messages, settings, *router) = todo.get_nowait()
            except queue.Empty:
                return
            answers[i] = collect(engine.stream(messages, settings, router=router[0] if router else None))

    threads = [threading.Thread(target=client) for _ in range(clients)]
    start_in_one_batch(engine, threads, clients)
    start = time.perf_counter()
    for t in threads:
        t.join()
    return time.perf_counter() - start, answers


def natural_lengths(engine: Engine, requests: list) -> dict:
    """The same questions answered at their own lengths, as the load test asks them: one at a time,
    then all in one batch. A batch runs until its longest answer ends and each row's prefill is
    work of its own, so `ratio` (batched over serial time per answer) is the floor under the load
    test's wall ratio on this machine, whatever the app around the engine costs."""
    settings = GenerationSettings(max_new_tokens=NATURAL_TOKENS)
    natural = [(messages, settings) for messages, _ in requests[:16]]
    seconds = {}
    for rows in (1, 16):
        _serve(engine, natural, rows)  # warm-up
        seconds[rows] = _serve(engine, natural, rows)[0] / len(natural)
    return dict(ms_per_answer_1=round(seconds[1] * 1e3, 1), ms_per_answer_16=round(seconds[16] * 1e3, 1),
                ratio=round(seconds[16] / seconds[1], 3))


def run(engine: Engine, quick: bool) -> dict:
    new_tokens = 32 if quick else 64
    settings = GenerationSettings(max_new_tokens=new_tokens)
    samples = world.generate("test", 32 if quick else 64)
    requests = [([Message("user", s.question, [s.image])], settings) for s in samples]
    with fixed_length(engine.model, new_tokens):
        serial = [collect(engine.stream(m, s)) for m, s in requests[:16]]  # also warms up
        rates, identical, batches = {}, True, {}
        for clients in LEVELS:
            seconds, answers, batches[clients] = _occupied(engine, requests, clients)
            rates[clients] = round(sum(a.stats.tokens for a in answers) / seconds, 1)
            identical &= all((a.reasoning, a.answer) == (b.reasoning, b.answer) for a, b in zip(serial, answers))
        # half the users chat with a fine-tuned router (the shipped gates re-scaled): they share the batch
        router = {k: v * 1.01 for k, v in engine.model.router_state_dict().items()}
        mixed = [(m, s, router if i % 2 else None) for i, (m, s) in enumerate(requests)]
        session_routers = _occupied(engine, mixed, 16)[2]
    return dict(
        new_tokens=new_tokens,
        requests=len(requests),
        max_batch=engine.batch.max_batch,
        tokens_per_s={str(k): v for k, v in rates.items()},
        mean_batch={str(k): v for k, v in batches.items()},
        session_routers_mean_batch=session_routers,
        speedup_16=round(rates[16] / rates[1], 2),
        identical=identical,
        target=TARGET,
        natural_16=natural_lengths(engine, requests),
    )


def rows(b: dict) -> list[Row]:
    natural = b["natural_16"]
    return [
        ("Batching: tokens/s with 1 / 4 / 8 / 16 users at once (mean batch)",
         " / ".join(f"{v:.0f}" for v in b["tokens_per_s"].values())
         + f" ({' / '.join(str(v) for v in b['mean_batch'].values())}); speedup_16 "
         f"{b['speedup_16']:.2f}, identical {str(b['identical']).lower()}",
         "≥ 3, identical", verdict(b["speedup_16"] >= TARGET and b["identical"])),
        ("Batching: rows per step at 16 users when 8 use a fine-tuned router / when none do",
         f"{b['session_routers_mean_batch']:.2f} / {b['mean_batch']['16']:.2f}", "≥ 0.8 x",
         verdict(b["session_routers_mean_batch"] >= 0.8 * b["mean_batch"]["16"])),
        ("Batching at natural lengths (load test's questions): ms per answer alone / 16 in one batch",
         f"{natural['ms_per_answer_1']:.1f} / {natural['ms_per_answer_16']:.1f}"
         f" (ratio {natural['ratio']:.3f}: the floor under the load test's wall ratio)",
         "", ""),
    ]
