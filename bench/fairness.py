"""What one heavy request costs everyone else (issue 16): refusals, long prefills, routing calls.

- refuse: a 16-turn, 256 KB conversation is counted and refused before any prefill; a short
  answer is timed alone and when such a request arrives with it.
- stall: a batch of short answers is decoding; the longest gap between two of its tokens is
  compared with its median step, first undisturbed, then while the longest prompt the server
  allows arrives as a chat request (it waits for the next batch, it never joins this one) and as
  routing calls (each runs between two decode steps: the stall is one prefill, bounded by the
  prompt limit).
"""

from __future__ import annotations

import statistics
import threading
import time

from metis.budget import count_tokens
from metis.prompting import Message, PromptError
from metis.serving.batch import RunningBatch
from metis.serving.engine import Engine, GenerationSettings
from metis.streaming import Done, Routed

from .common import Row, fixed_length, sample_messages, start_in_one_batch, timed, verdict


def long_conversation(turns: int = 16, chars: int = 8000) -> list[Message]:
    """16 turns of 8,000 characters: the 256 KB request that once held the model for 78 s."""
    out = []
    for i in range(turns):
        question = (f"question {i} " + "words " * (chars // 6))[:chars]
        out += [Message("user", question), Message("assistant", "ok " * 400)]
    return out + [Message("user", "and now?")]


def longest_prompt(engine: Engine) -> list[Message]:
    """A question padded to just under the server's prompt limit, with its image."""
    limit = engine.prompt_limit()
    base = sample_messages()[0]
    text = base.text
    while count_tokens(engine.prompts, [Message("user", text + " count" * 8, base.images)]) <= limit:
        text += " count" * 8
    return [Message("user", text, base.images)]


def _refused_s(engine: Engine) -> float:
    start = time.perf_counter()
    try:
        list(engine.stream(long_conversation(), GenerationSettings(max_new_tokens=4)))
    except PromptError:
        return time.perf_counter() - start
    raise RuntimeError("the long conversation was not refused")


def _gaps(engine: Engine, messages, settings, rows: int, disturb=None) -> list[float]:
    """Gaps between the token arrivals of one row of a `rows`-row batch, with `disturb()` run
    from another thread once that batch has produced its first token."""
    started = threading.Event()
    times: list[float] = []

    def consume(record: bool):
        for event in engine.stream(messages, settings):
            if isinstance(event, Routed):
                started.set()
            elif record and not isinstance(event, Done):
                times.append(time.perf_counter())

    threads = [threading.Thread(target=consume, args=(i == 0,)) for i in range(rows)]
    start_in_one_batch(engine, threads, rows)
    started.wait()
    helper = threading.Thread(target=disturb) if disturb else None
    if helper:
        helper.start()
    for t in threads:
        t.join()
    if helper:
        helper.join()
    return [b - a for a, b in zip(times, times[1:])]


def run(engine: Engine, quick: bool) -> dict:
    short = sample_messages()
    settings = GenerationSettings(max_new_tokens=16)
    refuse = statistics.median(_refused_s(engine) for _ in range(5))
    answer = lambda: list(engine.stream(short, settings))  # noqa: E731
    alone = statistics.median(timed(answer) for _ in range(5))

    def during_refusal() -> float:  # the heavy request arrives together with the short one
        heavy = threading.Thread(target=_refused_s, args=(engine,))
        heavy.start()
        seconds = timed(answer)
        heavy.join()
        return seconds

    during = statistics.median(during_refusal() for _ in range(7))

    new_tokens = 96 if quick else 192
    long = longest_prompt(engine)
    steps = GenerationSettings(max_new_tokens=new_tokens)
    saved = RunningBatch.FLUSH_S
    RunningBatch.FLUSH_S = 0.0  # every token handed over at once: the gaps are the steps
    try:
        with fixed_length(engine.model, new_tokens):
            calm = _gaps(engine, short, steps, rows=4)
            chat = _gaps(engine, short, steps, rows=4,
                         disturb=lambda: list(engine.stream(long, GenerationSettings(max_new_tokens=4))))
            routed = _gaps(engine, short, steps, rows=4, disturb=lambda: [engine.route(long) for _ in range(3)])
    finally:
        RunningBatch.FLUSH_S = saved
    prefill = statistics.median(timed(lambda: engine.route(long)) for _ in range(3))
    step = statistics.median(calm)
    return dict(
        refuse_256kb_s=round(refuse, 4),
        short_answer_s=dict(alone=round(alone, 4), during_refusals=round(during, 4)),
        short_answer_ratio=round(during / alone, 3),
        longest_prompt_tokens=engine.prompts.build(long)["input_ids"].shape[1],
        longest_prefill_ms=round(prefill * 1e3, 1),
        decode_step_ms=round(step * 1e3, 2),
        max_gap_ms=dict(calm=round(max(calm) * 1e3, 1), long_chat_request=round(max(chat) * 1e3, 1),
                        long_routing_calls=round(max(routed) * 1e3, 1)),
    )


def rows(f: dict) -> list[Row]:
    return [
        ("Fairness: a 256 KB conversation refused in; another user's short answer meanwhile / alone",
         f"{f['refuse_256kb_s'] * 1e3:.0f} ms; {f['short_answer_ratio']:.2f}×", "≤ 1 s; < 2×",
         verdict(f["refuse_256kb_s"] <= 1 and f["short_answer_ratio"] < 2)),
        ("Fairness: longest gap between a batch's tokens, calm / longest prompt as chat / as routing calls",
         " / ".join(f"{v:.0f} ms" for v in f["max_gap_ms"].values())
         + f" (step {f['decode_step_ms']:.1f} ms; one {f['longest_prompt_tokens']}-token "
         f"prefill {f['longest_prefill_ms']:.0f} ms)", "≤ one prefill", ""),
    ]
