"""Does hybrid thinking pay? `auto` versus forced `think` on the tiny world's held-out split.

The claim under test: the router sends perception questions to the direct expert, so `auto`
spends far fewer tokens and seconds than always thinking, at (nearly) the same accuracy. The two
modes alternate per question so that machine load affects both alike.
"""

from __future__ import annotations

import time

from metis.prompting import Message
from metis.serving.engine import Engine, GenerationSettings
from metis.tiny import world

from .common import Row

MODES = ("auto", "think")


def run(engine: Engine, quick: bool, trained: bool) -> dict:
    samples = world.generate("test", 40 if quick else 200)
    totals = {m: {"tokens": 0, "seconds": 0.0} for m in MODES}
    correct = {m: {f: 0 for f in world.QTYPES} for m in MODES}  # per question family
    routed_think = 0
    for i, sample in enumerate(samples):
        messages = [Message("user", sample.question, [sample.image])]
        for mode in MODES if i % 2 == 0 else reversed(MODES):
            start = time.perf_counter()
            answer = engine.run(messages, GenerationSettings(mode=mode, max_new_tokens=96))
            totals[mode]["seconds"] += time.perf_counter() - start
            totals[mode]["tokens"] += answer.stats.tokens
            correct[mode][sample.family] += world.answers_match(answer.answer, sample.answer)
            routed_think += mode == "auto" and answer.trace.decision == "think"
    n = len(samples)
    family_n = {f: sum(s.family == f for s in samples) for f in world.QTYPES}
    per_mode = {
        m: {"tokens": round(t["tokens"] / n, 1), "seconds": round(t["seconds"] / n, 4),
            "accuracy": round(sum(correct[m].values()) / n, 3),
            "accuracy_by_family": {f: round(c / max(family_n[f], 1), 3) for f, c in correct[m].items()}}
        for m, t in totals.items()
    }
    return dict(
        samples=n,
        per_query=per_mode,
        auto_share_routed_to_think=round(routed_think / n, 3),
        token_saving=round(1 - totals["auto"]["tokens"] / max(totals["think"]["tokens"], 1), 3),
        time_saving=round(1 - totals["auto"]["seconds"] / totals["think"]["seconds"], 3),
        meaningful=trained,  # random weights: every answer is noise and no question stops early
    )


def rows(h: dict) -> list[Row]:
    auto, think = h["per_query"]["auto"], h["per_query"]["think"]
    return [(f"Hybrid: auto vs think, {h['samples']} held-out questions (tokens, s, accuracy)",
             f"{auto['tokens']:.1f} vs {think['tokens']:.1f} tok, {auto['seconds'] * 1e3:.0f} vs "
             f"{think['seconds'] * 1e3:.0f} ms, {auto['accuracy']:.1%} vs {think['accuracy']:.1%}"
             + ("" if h["meaningful"] else " (random weights: not meaningful)"), "fewer tokens, same accuracy", "")]
