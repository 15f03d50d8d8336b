"""Procedurally drawn shapes world with perception ("direct") and multi-step ("reasoning") questions.

Each 112x112 image is a 2x2 grid of 56 px cells holding 1-4 large, saturated shapes. Items are
40-48 px so each covers about four merged image tokens: earlier runs showed that small items on a
white canvas leave a tiny vision tower at chance, and that reading rendered digits is not learnable
at this scale, so no task needs glyphs.

Every sample is a pure function of its seed (``random.Random(seed)``), and the splits use disjoint
seed ranges, so the test split is held out.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

from PIL import Image, ImageDraw

from metis.tiny import phrasing

IMAGE_SIZE = 112
CELL = IMAGE_SIZE // 2
SYSTEM_PROMPT = "Answer the question about the image."

COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "yellow": (240, 200, 20),
}
SHAPES = ("circle", "square", "triangle")
PLURAL = {"circle": "circles", "square": "squares", "triangle": "triangles"}
SIDES = {"circle": 0, "square": 4, "triangle": 3}

SPLIT_BASE = {"train": 0, "val": 10_000_000, "test": 20_000_000}

Item = tuple[str, str]  # (colour, shape)
Cells = tuple[Item | None, Item | None, Item | None, Item | None]  # reading order: TL, TR, BL, BR

QTYPES = {
    "direct": ("count_shape", "count_all", "colour", "shape", "cell", "present", "colour_at"),
    "reasoning": ("count_diff", "total_sides", "more_colour", "remain", "not_colour", "kind_sides", "compare_two"),
}
POSITION_NAMES = ("top left", "top right", "bottom left", "bottom right")


@dataclass(frozen=True)
class Sample:
    image: Image.Image
    question: str
    family: str
    qtype: str
    reasoning: str
    answer: str
    cells: Cells  # ground truth, kept so tests and analyses can check answers against the drawing
    params: dict  # what the question asks about (slot values, cell index, number removed)


def _name(item: Item) -> str:
    return f"{item[0]} {item[1]}"


def _listing(cells: Cells) -> str:
    """Fixed four-slot scene listing in reading order; fixed slots let the model tie each entry
    to the same image tokens, and make every chain start the same way."""
    return ", ".join(_name(c) if c else "none" for c in cells) + "."


def _check(cells: Cells, label: str, hit) -> str:
    """Per-slot yes/no scan used by direct-family chains. Forced thinking on a perception question
    thus "overthinks" with a scan as long as a reasoning step, which is the waste that routing
    such questions to the direct expert saves."""
    return f"{label}? " + ", ".join("yes" if c and hit(c) else "no" for c in cells) + "."


@dataclass(frozen=True)
class _Draw:
    """What a question type reads: the scene, the scene's generator (the sample's own, so that
    drawing stays one sequence per seed) and `ask`, which words the question from the pool and
    records its slots in `params`."""

    rng: random.Random
    cells: Cells
    ask: Callable[..., str]
    params: dict

    @property
    def items(self) -> list[Item]:
        return [c for c in self.cells if c]

    @property
    def shapes(self) -> list[str]:
        return [s for _, s in self.items]

    @property
    def colours(self) -> list[str]:
        return [c for c, _ in self.items]


Drawn = tuple[str, str, str] | None  # (question, chain tail, answer), None: the scene cannot support it


def _count_shape(d: _Draw) -> Drawn:
    s = d.rng.choice(SHAPES)
    n = d.shapes.count(s)
    return d.ask(p=PLURAL[s]), f"{_check(d.cells, s, lambda c: c[1] == s)} count {n}.", str(n)


def _count_all(d: _Draw) -> Drawn:
    n = len(d.items)
    return d.ask(), f"{_check(d.cells, 'shape', lambda c: True)} count {n}.", str(n)


def _colour(d: _Draw) -> Drawn:
    unique = [s for s in SHAPES if d.shapes.count(s) == 1]
    if not unique:
        return None
    s = d.rng.choice(unique)
    c = d.colours[d.shapes.index(s)]
    return d.ask(s=s), f"{_check(d.cells, s, lambda i: i[1] == s)} count 1. colour {c}.", c


def _shape(d: _Draw) -> Drawn:
    unique = [c for c in COLOURS if d.colours.count(c) == 1]
    if not unique:
        return None
    c = d.rng.choice(unique)
    s = d.shapes[d.colours.index(c)]
    return d.ask(c=c), f"{_check(d.cells, c, lambda i: i[0] == c)} count 1. shape {s}.", s


def _cell(d: _Draw) -> Drawn:
    cell = d.params["cell"] = d.rng.randrange(4)
    item = d.cells[cell]
    where = f"{POSITION_NAMES[cell]}: {_name(item) if item else 'none'}."
    return d.ask(pos=phrasing.pick_position(d.rng, cell)), where, _name(item) if item else "nothing"


def _colour_at(d: _Draw) -> Drawn:
    cell = d.params["cell"] = d.rng.randrange(4)
    item = d.cells[cell]
    if item is None:
        return None
    where = f"{POSITION_NAMES[cell]}: {_name(item)}."
    return d.ask(pos=phrasing.pick_position(d.rng, cell)), f"{where} colour {item[0]}.", item[0]


def _present(d: _Draw) -> Drawn:
    s = d.rng.choice(SHAPES)
    n = d.shapes.count(s)
    return d.ask(s=s, p=PLURAL[s]), f"{_check(d.cells, s, lambda i: i[1] == s)} count {n}.", "yes" if n else "no"


def _count_diff(d: _Draw) -> Drawn:
    a, b = d.rng.sample(SHAPES, 2)
    if d.shapes.count(a) < d.shapes.count(b):
        a, b = b, a  # "how many more a than b" stays sensible; "difference" reads either way
    na, nb = d.shapes.count(a), d.shapes.count(b)
    if na == 0:
        return None
    tail = f"{PLURAL[a]} {na}, {PLURAL[b]} {nb}. {na} - {nb} = {na - nb}."
    return d.ask(a=PLURAL[a], b=PLURAL[b]), tail, str(na - nb)


def _total_sides(d: _Draw) -> Drawn:
    sides = [SIDES[s] for s in d.shapes]
    return d.ask(), f"sides {' + '.join(map(str, sides))} = {sum(sides)}.", str(sum(sides))


def _more_colour(d: _Draw) -> Drawn:
    a, b = d.rng.sample(list(COLOURS), 2)
    na, nb = d.colours.count(a), d.colours.count(b)
    if na == nb:
        return None
    winner = a if na > nb else b
    tail = f"{a} {na}, {b} {nb}. {na} {'>' if na > nb else '<'} {nb}, {winner}."
    return d.ask(ca=a, cb=b), tail, winner


def _remain(d: _Draw) -> Drawn:
    s = d.rng.choice(SHAPES)
    n, total = d.shapes.count(s), len(d.items)
    k = d.params["removed"] = d.rng.choice([k for k in phrasing.REMOVALS if k <= n] or [0])
    if not k:
        return None
    tail = f"shapes {total}, {PLURAL[s]} {n}. remove {k}. {total} - {k} = {total - k}."
    return d.ask(k=d.rng.choice(phrasing.REMOVALS[k]), p=PLURAL[s], s=s), tail, str(total - k)


def _not_colour(d: _Draw) -> Drawn:
    c = d.rng.choice(list(COLOURS))
    n, total = d.colours.count(c), len(d.items)
    return d.ask(c=c), f"shapes {total}, {c} {n}. {total} - {n} = {total - n}.", str(total - n)


def _kind_sides(d: _Draw) -> Drawn:
    s = d.rng.choice(("square", "triangle"))
    n = d.shapes.count(s)
    if not n:
        return None
    return d.ask(p=PLURAL[s], s=s), f"{PLURAL[s]} {n}. {n} x {SIDES[s]} = {n * SIDES[s]}.", str(n * SIDES[s])


def _compare_two(d: _Draw) -> Drawn:
    c, s = d.rng.choice(list(COLOURS)), d.rng.choice(SHAPES)
    nc, ns = d.colours.count(c), d.shapes.count(s)
    if nc == ns:
        return None
    winner = c if nc > ns else PLURAL[s]
    tail = f"{c} {nc}, {PLURAL[s]} {ns}. {nc} {'>' if nc > ns else '<'} {ns}, {winner}."
    return d.ask(c=c, p=PLURAL[s]), tail, winner


QUESTIONS: dict[str, Callable[[_Draw], Drawn]] = {
    "count_shape": _count_shape, "count_all": _count_all, "colour": _colour, "shape": _shape, "cell": _cell,
    "present": _present, "colour_at": _colour_at,
    "count_diff": _count_diff, "total_sides": _total_sides, "more_colour": _more_colour, "remain": _remain,
    "not_colour": _not_colour, "kind_sides": _kind_sides, "compare_two": _compare_two,
}


def _question(rng: random.Random, qtype: str, cells: Cells, pool: str) -> tuple[str, str, str, dict] | None:
    """Returns (question, chain tail, answer, what was asked about), or None if this scene cannot
    support the qtype unambiguously (the caller then draws another scene)."""
    if qtype not in QUESTIONS:
        raise ValueError(f"unknown qtype {qtype!r}")
    wording_rng = random.Random(rng.getrandbits(64))  # the scene never depends on the wording pool
    params: dict = {}

    def ask(**slots: str) -> str:
        params.update(slots)
        return phrasing.phrase(wording_rng, qtype, pool, **slots)

    drawn = QUESTIONS[qtype](_Draw(rng, cells, ask, params))
    return None if drawn is None else (*drawn, params)


def _scene(rng: random.Random) -> Cells:
    n = rng.randint(1, 4)
    slots = rng.sample(range(4), n)
    return tuple(
        (rng.choice(list(COLOURS)), rng.choice(SHAPES)) if i in slots else None for i in range(4)
    )


def _render(rng: random.Random, cells: Cells) -> Image.Image:
    bg = tuple(rng.randint(235, 255) for _ in range(3))
    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), bg)
    draw = ImageDraw.Draw(image)
    for i, item in enumerate(cells):
        if item is None:
            continue
        size = rng.randint(40, 48)
        x0 = (i % 2) * CELL + rng.randint(2, CELL - size - 2)
        y0 = (i // 2) * CELL + rng.randint(2, CELL - size - 2)
        x1, y1 = x0 + size - 1, y0 + size - 1
        colour, shape = item
        fill = tuple(min(255, max(0, v + rng.randint(-10, 10))) for v in COLOURS[colour])
        if shape == "circle":
            draw.ellipse((x0, y0, x1, y1), fill=fill)
        elif shape == "square":
            draw.rectangle((x0 + 2, y0 + 2, x1 - 2, y1 - 2), fill=fill)
        else:
            draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)
    return image


def sample(seed: int, family: str | None = None, wording: str = "train") -> Sample:
    """Draws one sample; ``family=None`` picks direct/reasoning with equal probability, and
    `wording` names the phrasing pool the question is worded from."""
    rng = random.Random(seed)
    family = family or rng.choice(("direct", "reasoning"))
    qtype = rng.choice(QTYPES[family])
    while True:
        cells = _scene(rng)
        drawn = _question(rng, qtype, cells, wording)
        if drawn:
            break
    question, tail, answer, params = drawn
    return Sample(
        image=_render(rng, cells),
        question=question,
        family=family,
        qtype=qtype,
        reasoning=f"{_listing(cells)} {tail}",
        answer=answer,
        cells=cells,
        params=params,
    )


def generate(split: str, n: int, family: str | None = None, wording: str = "train") -> list[Sample]:
    """``family=None`` alternates direct/reasoning so any prefix is family-balanced. `split` picks
    the images (disjoint seed ranges), `wording` the phrasing pool (disjoint frames)."""
    base = SPLIT_BASE[split]
    families = (family,) if family else ("direct", "reasoning")
    return [sample(base + i, families[i % len(families)], wording) for i in range(n)]


def format_target(sample: Sample, thinking: bool) -> str:
    chain = sample.reasoning if thinking else ""
    return f"<think>{chain}</think><answer>{sample.answer}</answer>"


def answers_match(pred: str, gold: str) -> bool:
    def norm(s: str) -> str:
        return s.strip().lower().rstrip(".").strip()

    return norm(pred) == norm(gold)
