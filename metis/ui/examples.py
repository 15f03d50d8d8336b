"""Example questions with their images (assets/examples/, drawn by `python -m metis.ui.examples`).

The embedded tiny model only knows the shapes world it was trained on, so its examples come from
that world's held-out split, worded from the held-out pool (phrasings it never trained on, without
the filler words of training wordings); the chart, geometry and receipt images are meant for the real
Metis-HOME and are labelled as such.
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from ..tiny import world

FOLDER = Path(__file__).resolve().parents[2] / "assets" / "examples"
TINY_SEEDS = {"direct": (3, 7), "reasoning": (2, 5)}  # offsets into the held-out test split


def _tiny() -> list[tuple[str, str, Image.Image]]:
    out = []
    for family, offsets in TINY_SEEDS.items():
        for offset in offsets:
            s = world.sample(world.SPLIT_BASE["test"] + offset, family, wording="test")
            out.append((f"shapes-{family}-{offset}.png", s.question, s.image))
    return out


def _font(size: int):
    return ImageFont.load_default(size=size)


def _chart() -> Image.Image:
    image = Image.new("RGB", (480, 320), "white")
    d = ImageDraw.Draw(image)
    d.text((140, 10), "Quarterly sales (k$)", fill="black", font=_font(20))
    d.line((50, 280, 460, 280), fill="black", width=2)
    d.line((50, 280, 50, 50), fill="black", width=2)
    for i, (label, value) in enumerate([("Q1", 42), ("Q2", 58), ("Q3", 35), ("Q4", 71)]):
        x = 80 + i * 95
        d.rectangle((x, 280 - value * 3, x + 55, 280), fill=(59, 130, 246))
        d.text((x + 15, 286), label, fill="black", font=_font(16))
        d.text((x + 12, 280 - value * 3 - 22), str(value), fill="black", font=_font(16))
    return image


def _geometry() -> Image.Image:
    image = Image.new("RGB", (420, 320), "white")
    d = ImageDraw.Draw(image)
    a, b, c = (60, 270), (360, 270), (150, 60)
    d.polygon([a, b, c], outline="black", width=3)
    d.text((a[0] + 22, a[1] - 30), "50°", fill="black", font=_font(20))
    d.text((b[0] - 62, b[1] - 30), "60°", fill="black", font=_font(20))
    d.text((c[0] - 6, c[1] + 28), "x", fill="crimson", font=_font(24))
    for label, p, off in (("A", a, (-22, 2)), ("B", b, (8, 2)), ("C", c, (-6, -28))):
        d.text((p[0] + off[0], p[1] + off[1]), label, fill="black", font=_font(20))
    return image


def _receipt() -> Image.Image:
    image = Image.new("RGB", (300, 360), (252, 250, 240))
    d = ImageDraw.Draw(image)
    lines = ["CORNER CAFE", "------------------", "Latte         4.50", "Croissant     3.20",
             "Orange juice  3.80", "Muffin        2.90", "------------------", "TOTAL        14.40"]
    for i, line in enumerate(lines):
        d.text((30, 24 + i * 38), line, fill="black", font=_font(20))
    return image


REAL = [
    ("chart.png", "Which quarter had the highest sales, and by how much did it exceed the lowest?", _chart),
    ("geometry.png", "In triangle ABC, angle A is 50° and angle B is 60°. Find x, the angle at C.", _geometry),
    ("receipt.png", "What is the total on this receipt?", _receipt),
]


def _example(name: str, text: str) -> dict:
    return {"text": text, "files": [str(FOLDER / name)]}


EXAMPLES = {
    "Examples for the embedded tiny model (shapes world)": [_example(n, q) for n, q, _ in _tiny()],
    "Examples for the real model (mmthinking/Metis-HOME; the tiny model cannot read these)": [
        _example(n, q) for n, q, _ in REAL
    ],
}


def draw() -> None:
    FOLDER.mkdir(parents=True, exist_ok=True)
    for name, _, image in _tiny():
        image.save(FOLDER / name)
    for name, _, paint in REAL:
        paint().save(FOLDER / name)


if __name__ == "__main__":
    draw()
