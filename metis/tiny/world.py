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


def _question(rng: random.Random, qtype: str, cells: Cells, pool: str, params: dict) -> tuple[str, str, str] | None:
    """Returns (question, chain tail, answer), or None if this scene cannot support the qtype
    unambiguously (the caller then draws another scene). `params` receives what was asked about."""
    items = [c for c in cells if c]
    shapes = [s for _, s in items]
    colours = [c for c, _ in items]
    wording_rng = random.Random(rng.getrandbits(64))  # the scene never depends on the wording pool

    def ask(**slots: str) -> str:
        params.update(slots)
        return phrasing.phrase(wording_rng, qtype, pool, **slots)

    if qtype == "count_shape":
        s = rng.choice(SHAPES)
        n = shapes.count(s)
        return ask(p=PLURAL[s]), f"{_check(cells, s, lambda c: c[1] == s)} count {n}.", str(n)
    if qtype == "count_all":
        return ask(), f"{_check(cells, 'shape', lambda c: True)} count {len(items)}.", str(len(items))
    if qtype == "colour":
        unique = [s for s in SHAPES if shapes.count(s) == 1]
        if not unique:
            return None
        s = rng.choice(unique)
        c = colours[shapes.index(s)]
        return ask(s=s), f"{_check(cells, s, lambda i: i[1] == s)} count 1. colour {c}.", c
    if qtype == "shape":
        unique = [c for c in COLOURS if colours.count(c) == 1]
        if not unique:
            return None
        c = rng.choice(unique)
        s = shapes[colours.index(c)]
        return ask(c=c), f"{_check(cells, c, lambda i: i[0] == c)} count 1. shape {s}.", s
    if qtype in ("cell", "colour_at"):
        cell = params["cell"] = rng.randrange(4)
        item = cells[cell]
        if qtype == "colour_at" and item is None:
            return None
        where = f"{POSITION_NAMES[cell]}: {_name(item) if item else 'none'}."
        if qtype == "cell":
            return ask(pos=phrasing.pick_position(rng, cell)), where, _name(item) if item else "nothing"
        return ask(pos=phrasing.pick_position(rng, cell)), f"{where} colour {item[0]}.", item[0]
    if qtype == "present":
        s = rng.choice(SHAPES)
        n = shapes.count(s)
        return ask(s=s, p=PLURAL[s]), f"{_check(cells, s, lambda i: i[1] == s)} count {n}.", "yes" if n else "no"
    if qtype == "count_diff":
        a, b = rng.sample(SHAPES, 2)
        if shapes.count(a) < shapes.count(b):
            a, b = b, a  # "how many more a than b" stays sensible; "difference" reads either way
        na, nb = shapes.count(a), shapes.count(b)
        if na == 0:
            return None
        tail = f"{PLURAL[a]} {na}, {PLURAL[b]} {nb}. {na} - {nb} = {na - nb}."
        return ask(a=PLURAL[a], b=PLURAL[b]), tail, str(na - nb)
    if qtype == "total_sides":
        sides = [SIDES[s] for s in shapes]
        return ask(), f"sides {' + '.join(map(str, sides))} = {sum(sides)}.", str(sum(sides))
    if qtype == "more_colour":
        a, b = rng.sample(list(COLOURS), 2)
        na, nb = colours.count(a), colours.count(b)
        if na == nb:
            return None
        winner = a if na > nb else b
        tail = f"{a} {na}, {b} {nb}. {na} {'>' if na > nb else '<'} {nb}, {winner}."
        return ask(ca=a, cb=b), tail, winner
    if qtype == "remain":
        s = rng.choice(SHAPES)
        n = shapes.count(s)
        k = params["removed"] = rng.choice([k for k in phrasing.REMOVALS if k <= n] or [0])
        if not k:
            return None
        tail = f"shapes {len(items)}, {PLURAL[s]} {n}. remove {k}. {len(items)} - {k} = {len(items) - k}."
        return ask(k=rng.choice(phrasing.REMOVALS[k]), p=PLURAL[s], s=s), tail, str(len(items) - k)
    if qtype == "not_colour":
        c = rng.choice(list(COLOURS))
        n = colours.count(c)
        tail = f"shapes {len(items)}, {c} {n}. {len(items)} - {n} = {len(items) - n}."
        return ask(c=c), tail, str(len(items) - n)
    if qtype == "kind_sides":
        s = rng.choice(("square", "triangle"))
        n = shapes.count(s)
        if not n:
            return None
        tail = f"{PLURAL[s]} {n}. {n} x {SIDES[s]} = {n * SIDES[s]}."
        return ask(p=PLURAL[s], s=s), tail, str(n * SIDES[s])
    if qtype == "compare_two":
        c, s = rng.choice(list(COLOURS)), rng.choice(SHAPES)
        nc, ns = colours.count(c), shapes.count(s)
        if nc == ns:
            return None
        winner = c if nc > ns else PLURAL[s]
        tail = f"{c} {nc}, {PLURAL[s]} {ns}. {nc} {'>' if nc > ns else '<'} {ns}, {winner}."
        return ask(c=c, p=PLURAL[s]), tail, winner
    raise ValueError(f"unknown qtype {qtype!r}")


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
        cells, params = _scene(rng), {}
        drawn = _question(rng, qtype, cells, wording, params)
        if drawn:
            break
    question, tail, answer = drawn
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
