"""A newcomer's wait beside a running batch: time to first token of a short question that arrives
while 8 thinking answers of 256 tokens decode, against the same question alone (`ttft_ratio`),
whether every answer equals its solo one (`identical`), the batch's tokens/s before the newcomer
arrives and from its arrival to its last token (its prefill included), and how the wait grows
with the running batch (1, 4, 8 rows).

Uses only `Engine.stream`, so the same file measures an engine that joins running batches and
one that does not (a newcomer then waits for the whole batch)."""

from __future__ import annotations

import statistics
import threading
import time

from metis.prompting import Message
from metis.serving.engine import Engine, GenerationSettings
from metis.serving.interface import collect
from metis.streaming import Routed
from metis.tiny import world

from .common import Row, fixed_length, verdict

TTFT_TARGET = 3.0


def _questions(n: int) -> list[list[Message]]:
    return [[Message("user", s.question, [s.image])] for s in world.generate("test", n, family="reasoning")]


class _Timed:
    """One answer streamed in its own thread: when each token event arrived."""

    def __init__(self, engine: Engine, messages, settings: GenerationSettings):
        self.events, self.times, self.start = [], [], 0.0
        self.thread = threading.Thread(target=self._consume, args=(engine, messages, settings))

    def _consume(self, engine, messages, settings):
        self.start = time.perf_counter()
        for event in engine.stream(messages, settings):
            self.events.append(event)
            if not isinstance(event, Routed):
                self.times.append(time.perf_counter())

    def ttft(self) -> float:
        return self.times[0] - self.start


def _rate(runners: list[_Timed], start: float, end: float) -> float:
    """Tokens/s the running answers produced between `start` and `end` (events: one per token,
    or a text delta per token; the count of events is the count of tokens here)."""
    return sum(start <= t < end for r in runners for t in r.times) / max(end - start, 1e-9)


def newcomer_wait(engine: Engine, rows: int, new_tokens: int, after: int) -> dict:
    """`rows` thinking answers of `new_tokens` tokens run; once they have `after` tokens each, a
    direct question arrives."""
    long = GenerationSettings(mode="think", max_new_tokens=new_tokens)
    short = GenerationSettings(mode="direct", max_new_tokens=8)
    questions = _questions(rows + 1)
    running = [_Timed(engine, q, long) for q in questions[:rows]]
    for r in running:
        r.thread.start()
    while running and min(len(r.times) for r in running) < after:
        time.sleep(0.001)
    joined = time.perf_counter()
    newcomer = _Timed(engine, questions[rows], short)
    newcomer.thread.start()
    newcomer.thread.join()
    for r in running:
        r.thread.join()
    steady = max((r.times[0] for r in running), default=joined)  # every running row past its prefill
    return {"ttft_s": newcomer.ttft(), "answers": [collect(r.events) for r in running] + [collect(newcomer.events)],
            "before_tokens_per_s": _rate(running, steady, joined),
            "during_tokens_per_s": _rate(running, joined, newcomer.times[-1])}


def run(engine: Engine, quick: bool) -> dict:
    new_tokens, after = 256, 32
    questions = _questions(9)
    with fixed_length(engine.model, new_tokens):
        long = GenerationSettings(mode="think", max_new_tokens=new_tokens)
        alone = [collect(engine.stream(q, long)) for q in questions[:8]]
        short = GenerationSettings(mode="direct", max_new_tokens=8)
        solo_ttft = statistics.median(_ttft_alone(engine, questions[8], short) for _ in range(3))
        alone.append(collect(engine.stream(questions[8], short)))
        main = newcomer_wait(engine, 8, new_tokens, after)
        growth = {str(rows): round(newcomer_wait(engine, rows, new_tokens, after)["ttft_s"] * 1e3, 1)
                  for rows in ((1, 8) if quick else (1, 4, 8))}
    identical = all((a.reasoning, a.answer) == (b.reasoning, b.answer) for a, b in zip(alone, main["answers"]))
    return {"ttft_alone_ms": round(solo_ttft * 1e3, 1), "ttft_joined_ms": round(main["ttft_s"] * 1e3, 1),
            "ttft_ratio": round(main["ttft_s"] / solo_ttft, 2), "identical": identical,
            "batch_tokens_per_s_before": round(main["before_tokens_per_s"], 1),
            "batch_tokens_per_s_during": round(main["during_tokens_per_s"], 1),
            "newcomer_ttft_ms_by_running_rows": growth}


def _ttft_alone(engine: Engine, messages, settings) -> float:
    timed = _Timed(engine, messages, settings)
    timed.thread.start()
    timed.thread.join()
    return timed.ttft()


def rows(j: dict) -> list[Row]:
    growth = " / ".join(f"{rows}: {ms:.0f}" for rows, ms in j["newcomer_ttft_ms_by_running_rows"].items())
    return [("Join: a newcomer's first token beside 8 running answers, vs alone (ms)",
             f"{j['ttft_joined_ms']:.0f} vs {j['ttft_alone_ms']:.0f} (ratio {j['ttft_ratio']:.2f}), identical "
             f"{str(j['identical']).lower()}; batch tokens/s {j['batch_tokens_per_s_before']:.0f} before, "
             f"{j['batch_tokens_per_s_during']:.0f} during; by running rows {growth}",
             f"≤ {TTFT_TARGET:g}, identical", verdict(j["ttft_ratio"] <= TTFT_TARGET and j["identical"]))]


if __name__ == "__main__":
    import json
    import sys

    print(json.dumps(run(Engine.load(None, device="cpu"), quick="--quick" in sys.argv), indent=1))
