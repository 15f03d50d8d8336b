"""The sample router dataset for the tiny model: the same question types as its training world,
in wordings it never saw, so the shipped router is unsure of them and fine-tuning visibly helps.
Perception questions are labelled `direct`, multi-step ones `think`; a few images are shared by
all lines to keep the folder small.

    python -m metis.finetune.sample   # rewrites assets/finetune/sample/
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from metis.tiny import world

SAMPLE_DIR = Path(__file__).resolve().parents[2] / "assets" / "finetune" / "sample"
SAMPLE_FILE = SAMPLE_DIR / "router.jsonl"
SEED_BASE = 30_000_000  # beyond the world's train/val/test seed ranges

NEW_PHRASINGS = {
    "direct": (
        "Could you count the {p} for me?",
        "Tell me how many {p} you see.",
        "How many {p} are in the picture?",
        "Give the count of {p}.",
        "How many objects are in the picture?",
        "Tell me the number of shapes shown.",
        "Count every shape in the image.",
        "Could you tell me the hue of the {s}?",
        "Which hue does the {s} have?",
        "Name the colour of the {s}.",
        "Which figure is painted {c}?",
        "Name the {c} shape.",
        "What kind of shape is {c}?",
    ),
    "think": (
        "Work out {p} minus {q}.",
        "By how many do the {p} outnumber the {q}?",
        "Subtract the number of {q} from the number of {p}.",
        "Add up the sides of every shape.",
        "What do all the sides sum to?",
        "Sum the edges of all the figures.",
        "Do {c} shapes outnumber {d} shapes?",
        "Compare the {c} and {d} shapes: which has more?",
        "Is {c} or {d} the more frequent colour?",
    ),
}


def write_sample(out: Path = SAMPLE_DIR, lines: int = 500, images: int = 24, seed: int = 0) -> Path:
    """Balanced think/direct lines over `images` rendered scenes; returns the JSONL path."""
    rng = random.Random(seed)
    (out / "images").mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(images):
        name = f"images/scene{i:02d}.png"
        world.sample(SEED_BASE + i).image.save(out / name, optimize=True)
        names.append(name)
    rows = []
    for i in range(lines):
        label = ("direct", "think")[i % 2]
        s, t = rng.sample(world.SHAPES, 2)
        c, d = rng.sample(list(world.COLOURS), 2)
        text = rng.choice(NEW_PHRASINGS[label]).format(p=world.PLURAL[s], q=world.PLURAL[t], s=s, c=c, d=d)
        rows.append(json.dumps({"text": text, "images": [rng.choice(names)], "label": label}))
    path = out / SAMPLE_FILE.name
    path.write_text("\n".join(rows) + "\n")
    return path


if __name__ == "__main__":
    print(write_sample())
