"""Natural questions outside the shapes world, labelled think or direct, for the router.

Modelled on what the paper's benchmarks hold: MathVista/MathVerse/WeMath-style word problems,
geometry, chart and table arithmetic, logic and science calculations go to the thinking expert;
MMBench/OCRBench-style captions, recognition, reading text, colours, small counts, yes/no and
document look-ups go to the direct expert. Each kind has templates in three disjoint pools (as in
`phrasing.py`) and fillers drawn per question, so the router learns what a question asks for, not
its exact words. The tiny model cannot answer any of them; it learns to say so in one sentence.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from metis.tiny import phrasing
from metis.tiny.natural_kinds import KINDS, F  # noqa: F401  (re-exported)

REFUSAL = "I can only answer questions about the coloured shapes I was trained on."
OFF_WORLD_CHAIN = "not about the shapes."


@dataclass(frozen=True)
class Question:
    text: str
    label: str  # "think" or "direct"
    kind: str


def _fill(rng: random.Random, template: str) -> str:
    slots = {}
    for key in F:
        for suffix in ("", "2", "3", "4"):
            slot = key + suffix
            if "{" + slot + "}" in template:
                slots[slot] = rng.choice(F[key])
    return template.format(**slots)


def question(rng: random.Random, pool: str, label: str | None = None) -> Question:
    """One natural question from `pool`; `label=None` draws think and direct equally often."""
    label = label or rng.choice(("think", "direct"))
    kind = rng.choice([k for k, (lab, _) in KINDS.items() if lab == label])
    text = _fill(rng, rng.choice(KINDS[kind][1][pool]))
    return Question(phrasing.surface(rng, text, pool, typo_rate=0.05), label, kind)


def generate(pool: str, n: int, seed: int = 0) -> list[Question]:
    """A label-balanced list; the same (pool, n, seed) always gives the same questions."""
    rng = random.Random(f"corpus-{pool}-{seed}")
    return [question(rng, pool, ("think", "direct")[i % 2]) for i in range(n)]


def target(thinking: bool) -> str:
    """The model's honest reply: a thinking expert notes why, then both give the same sentence."""
    return f"<think>{OFF_WORLD_CHAIN if thinking else ''}</think><answer>{REFUSAL}</answer>"
