"""The sample router dataset for the tiny model: a Space owner's own traffic, which the shipped
router never saw in any form. Half are shapes questions in wordings from none of the world's
phrasing pools, half are questions from a domain the natural corpus does not cover (cooking,
sport, shopping, travel). The labelling policy is the model's own: several steps of arithmetic or
logic are `think`, looking and reading are `direct`. A few images are shared by all lines to keep
the folder small.

    python -m metis.tiny.router_sample   # rewrites assets/finetune/sample/

Where the folder lives is `metis.finetune.sample` (the fine-tuning tab offers it); how it is made
lives here, beside the world it draws from, so that fine-tuning never imports the tiny world.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from metis.finetune.sample import SAMPLE_DIR, SAMPLE_FILE
from metis.tiny import world

SEED_BASE = 30_000_000  # beyond the world's train/val/test seed ranges

NEW_PHRASINGS = {
    "direct": (
        "Yo, how many {p} r there",
        "{p} count pls",
        "Spot any {s} in there?",
        "What hue has been given to the {s}?",
        "Which of the pieces is {c}?",
        "Anything {c} in the upper half?",
        "What dish is on the plate?",
        "Which team is leading on the scoreboard?",
        "What is the name of the restaurant on the menu?",
        "What colour are the players' shirts?",
        "Which airline is painted on the plane?",
        "What does the price tag say?",
        "Is the shop open or closed?",
    ),
    "think": (
        "Take the {p}, subtract the {q}, what's left?",
        "Do the maths: {p} plus {q}, all the sides together.",
        "If every {s} vanished, how many pieces would be left?",
        "How many pieces are neither {c} nor {d}?",
        "A recipe for 4 needs 3 eggs. How many eggs for 10 people?",
        "The team scored 12 points a game for 7 games. What is their average if they add 20 in the next game?",
        "Three shirts cost 45 dollars after a 25% discount. What was the full price of one?",
        "The bus leaves at 7:50 and the ride takes 85 minutes. When do we arrive?",
        "If I save 15 dollars a week, how many weeks until I can buy the 240 dollar bike?",
        "Split the bill on the receipt among 3 friends with a 10% tip. How much each?",
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
