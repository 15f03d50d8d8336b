"""Many wordings for every shapes-world question, built from parts, with held-out pools.

A question is a frame (its sentence structure) filled with slot words, an optional prefix, and a
surface variant (case, punctuation, now and then a typo). Frames and prefixes are split into three
disjoint pools: `train` (what the model learns from), `val` (never trained on; used to calibrate
the router and pick settings) and `test` (never trained on and never tuned against). The fixed
phrasings of the first release sit in the train pool, so the template split still measures them.
Synonyms are shared by all pools, so a test wording differs from every training wording in its
structure (frame), its prefix and its location phrase, not in single words.
"""

from __future__ import annotations

import random

POOLS = ("train", "val", "test")

# Frames per question type and pool. Slots: {p}/{a}/{b} plural shape names, {s} singular shape,
# {c}/{ca}/{cb} colours, {x} a word for "shapes", {x1} its singular, {col} a word for "colour",
# {pos} a cell position, {k} a number removed, {art} "a"/"an".
FRAMES: dict[str, dict[str, tuple[str, ...]]] = {
    "count_shape": {
        "train": ("I want to know how many {p} there are.", "Please count the {p}.", "How many {p} exist?", "How many {p} are there?", "Count the {p}.", "How many {p} can you see?",
                  "What is the number of {p}?", "How many {p} do you see?", "Tell me how many {p} there are.",
                  "Number of {p}?", "How many {p} are in the picture?", "Give the count of {p}.",
                  "What's the number of {p} shown?"),
        "val": ("Can you count the {p} for me?", "How many {p} appear?"),
        "test": ("Count how many {p} are shown.", "What number of {p} is there?",
                 "How many {p} does the image contain?"),
    },
    "count_all": {
        "train": ("How many {x} are shown?", "What is the total count of {x}?", "Give me the number of {x}.", "How many shapes are there?", "Count the shapes.", "How many shapes can you see?",
                  "What is the number of shapes?", "How many {x} are there in total?", "Count all the {x}.",
                  "How many {x} do you see?", "Tell me the number of {x}.", "Total number of {x}?"),
        "val": ("How many {x} appear in all?", "Can you count every {x1}?"),
        "test": ("How many {x} does the picture hold?", "Count up all of the {x}.",
                 "What is the count of {x} in the image?"),
    },
    "colour": {
        "train": ("Which {col} does the {s} have?", "I want to know the {col} of the {s}.", "What colour is the {s}?", "Which colour is the {s}?", "What is the colour of the {s}?",
                  "What {col} is the {s}?", "Tell me the {col} of the {s}.", "The {s} is which {col}?",
                  "Name the {col} of the {s}.", "What {col} does the {s} have?"),
        "val": ("Which {col} has the {s}?", "Can you tell me what {col} the {s} is?"),
        "test": ("Identify the {col} of the {s}.", "What is the {s}'s {col}?", "In what {col} is the {s} drawn?"),
    },
    "shape": {
        "train": ("Which {x1} has the colour {c}?", "Tell me the shape of the {c} {x1}.", "Which shape is {c}?", "What shape is {c}?", "What is the {c} shape?",
                  "What kind of {x1} is the {c} one?", "Name the {c} {x1}.", "Which {x1} is {c}?",
                  "What is the shape of the {c} {x1}?", "Tell me which shape is {c}."),
        "val": ("The {c} {x1} is what shape?", "Can you name the {c} shape?"),
        "test": ("Identify the shape that is {c}.", "What sort of shape is coloured {c}?",
                 "Which figure has the colour {c}?"),
    },
    "cell": {
        "train": ("Which {x1} is in the {pos}?", "Tell me what is located in the {pos}.", "What is in the {pos}?", "What is in the {pos} cell?", "What do you see in the {pos}?",
                  "Which shape is in the {pos} corner?", "What is drawn in the {pos}?",
                  "Tell me what is in the {pos} square of the grid.", "Describe the {pos} cell."),
        "val": ("What sits in the {pos}?", "What occupies the {pos} part?"),
        "test": ("What can be found in the {pos} of the image?", "Name what is in the {pos}.",
                 "What appears in the {pos} quarter?"),
    },
    "present": {
        "train": ("Are there any {p}?", "Can I find {art} {s} in it?", "Is there {art} {s}?", "Is there {art} {s} in the picture?", "Do you see {art} {s}?",
                  "Can you see {art} {s}?", "Does the image contain {art} {s}?", "Is any {s} present?",
                  "Tell me if there is {art} {s}."),
        "val": ("Is {art} {s} shown?", "Would I find {art} {s} here?"),
        "test": ("Does {art} {s} appear?", "Is there at least one {s}?", "Check whether there is {art} {s}."),
    },
    "colour_at": {
        "train": ("What colour is the thing in the {pos}?", "Tell me which {col} the {pos} one is.", "What colour is the shape in the {pos}?", "What {col} is the {x1} in the {pos}?",
                  "Which {col} is the {pos} shape?", "Tell me the {col} of the {x1} in the {pos}.",
                  "What is the {col} of the {pos} {x1}?", "The {x1} in the {pos} is which {col}?"),
        "val": ("Name the {col} of the {pos} {x1}.", "What {col} has the {x1} at the {pos}?"),
        "test": ("Which {col} is used for the {x1} in the {pos}?", "What is the {pos} {x1}'s {col}?",
                 "Identify the {col} of whatever is in the {pos}."),
    },
    "count_diff": {
        "train": ("First count the {a}, then the {b}, and subtract.", "How many more {a} do you see than {b}?", "How many more {a} than {b} are there?", "How many more {a} are there than {b}?",
                  "What is the number of {a} minus the number of {b}?",
                  "What is the difference between the number of {a} and {b}?",
                  "Count the {a} and the {b}, then subtract.", "By how many do the {a} outnumber the {b}?",
                  "Subtract the number of {b} from the number of {a}.", "How many {a} minus {b}?"),
        "val": ("How much larger is the count of {a} than of {b}?", "Find the difference of {a} and {b}."),
        "test": ("Count the {a} and the {b}, then tell me the difference.",
                 "What is the difference between the counts of {a} and {b}?",
                 "How many extra {a} are there compared to {b}?"),
    },
    "total_sides": {
        "train": ("Count the sides of every {x1} and add them.", "What is the total of all sides?", "How many sides do the shapes have in total?", "What is the total number of sides of all shapes?",
                  "How many sides are there altogether?", "Add up the sides of all the {x}.",
                  "What is the sum of the sides of every {x1}?", "Count all the sides of the {x} together.",
                  "How many edges do the {x} have altogether?"),
        "val": ("Sum the sides over all {x}.", "How many sides in total across the {x}?"),
        "test": ("If you add up every side, how many are there?", "What do the sides of all {x} add up to?",
                 "Total the sides of the {x}."),
    },
    "more_colour": {
        "train": ("Count the {ca} {x} and the {cb} {x}: which colour has more?", "More {ca} or more {cb}?", "Are there more {ca} shapes or {cb} shapes?", "Which is more common, {ca} or {cb}?",
                  "Which colour appears more often, {ca} or {cb}?", "Are there more {ca} {x} or {cb} {x}?",
                  "Compare the {ca} and {cb} {x}: which are more numerous?",
                  "Which {col} is used more, {ca} or {cb}?", "Is {ca} or {cb} more frequent?"),
        "val": ("Which {col} wins, {ca} or {cb}?", "Do {ca} or {cb} {x} outnumber the other?"),
        "test": ("Which occurs more, {ca} {x} or {cb} {x}?", "Is there a larger number of {ca} or {cb} {x}?",
                 "Between {ca} and {cb}, which {col} has more {x}?"),
    },
    "remain": {
        "train": ("I take away {k} {p}. How many {x} are still there?", "How many shapes are left if {k} {p} are taken out?", "If I remove {k} {p}, how many shapes remain?", "Take away {k} {p}. How many {x} are left?",
                  "How many {x} are left after removing {k} {p}?", "Remove {k} {p}; how many {x} remain?",
                  "If {k} {p} were removed, how many {x} would be left?",
                  "After taking away {k} {p}, how many {x} are there?"),
        "val": ("Suppose {k} {p} disappear. How many {x} stay?", "Without {k} {p}, how many {x} would remain?"),
        "test": ("If I take {k} {p} away, how many shapes remain?", "Delete {k} {p}: how many {x} are left over?",
                 "How many {x} remain once {k} {p} are removed?"),
    },
    "not_colour": {
        "train": ("How many {x} are some other colour than {c}?", "Not counting the {c} ones, how many {x} are there?", "How many shapes are not {c}?", "How many {x} are not {c}?", "Count the {x} that are not {c}.",
                  "How many {x} have a colour other than {c}?", "What is the number of non-{c} {x}?",
                  "Excluding {c} ones, how many {x} are there?"),
        "val": ("How many {x} aren't {c}?", "Apart from the {c} ones, how many {x} are there?"),
        "test": ("Count every {x1} that is not {c}.", "How many of the {x} are some colour besides {c}?",
                 "Ignoring the {c} {x}, how many are left?"),
    },
    "kind_sides": {
        "train": ("Add the sides of all {p} together.", "What is the sum of the sides of the {p}?", "How many sides do the {p} have in total?", "Add up the sides of the {p}.",
                  "What is the total number of sides of the {p}?", "How many sides do all the {p} have together?",
                  "Sum the sides of every {s}.", "Count the sides of the {p} altogether."),
        "val": ("What do the sides of the {p} add up to?", "Total the sides of the {p}."),
        "test": ("If you add up the sides of the {p}, what do you get?", "How many edges do the {p} have in all?",
                 "What is the combined number of sides of the {p}?"),
    },
    "compare_two": {
        "train": ("Count the {c} {x} and the {p}: which group is bigger?", "Are {c} {x} more common than {p}?", "Are there more {c} shapes or {p}?", "Which are more numerous, {c} {x} or {p}?",
                  "Are there more {p} or {c} {x}?", "Compare the {c} {x} with the {p}: which are more?",
                  "Which is larger, the number of {p} or the number of {c} {x}?",
                  "Do {c} {x} outnumber {p}?"),
        "val": ("Which group is bigger, {p} or {c} {x}?", "More {c} {x} or more {p}?"),
        "test": ("Which count is higher, the {c} {x} or the {p}?", "Is the number of {p} greater than that of {c} {x}?",
                 "Which wins, {p} or {c} {x}?"),
    },
}

# Slot vocabularies, shared by every pool: a word the model never read cannot be understood at this
# scale, so the pools differ in sentence structure, prefixes and locations, not in vocabulary.
SHAPE_WORDS = ("shapes", "figures", "objects", "items", "things", "pieces", "forms")
SHAPE_WORD = ("shape", "figure", "object", "item", "thing", "piece", "form")
COLOUR_WORDS = ("colour", "color", "hue", "shade", "tint")
POSITIONS = {
    "top left": ("top left", "top-left", "upper left"),
    "top right": ("top right", "top-right", "upper right"),
    "bottom left": ("bottom left", "bottom-left", "lower left"),
    "bottom right": ("bottom right", "bottom-right", "lower right"),
}
REMOVALS = {1: ("one", "1", "a single"), 2: ("two", "2")}
PREFIXES = {
    "train": ("", "", "", "", "Please: ", "Look at the picture. ", "Question: ", "Hey, ", "Quick one: ",
              "About this image: ", "I have a question. "),
    "val": ("", "", "Okay, ", "Looking at this, "),
    "test": ("", "", "Now, ", "Here is a question. ", "Could you help? "),
}
LOCATIONS = {"train": (" in the picture", " in the image", " here", " in the grid", " in this photo"),
             "val": (" shown",), "test": (" in this image", " in the scene")}


def pick_position(rng: random.Random, cell: int) -> str:
    return rng.choice(POSITIONS[tuple(POSITIONS)[cell]])


def _typo(rng: random.Random, text: str) -> str:
    """One keyboard slip inside a word of 4+ letters: swap, drop or double a letter."""
    words = [i for i, w in enumerate(text.split(" ")) if len(w) >= 4 and w.isalpha()]
    if not words:
        return text
    parts = text.split(" ")
    i = rng.choice(words)
    w = parts[i]
    j = rng.randrange(1, len(w) - 1)
    kind = rng.randrange(3)
    parts[i] = (w[:j] + w[j + 1] + w[j] + w[j + 2:] if kind == 0 else w[:j] + w[j + 1:] if kind == 1
                else w[:j] + w[j] + w[j:])
    return " ".join(parts)


def surface(rng: random.Random, text: str, pool: str, typo_rate: float = 0.08) -> str:
    """Prefix, case, punctuation and the occasional typo: how people actually type."""
    text = rng.choice(PREFIXES[pool]) + text
    r = rng.random()
    if r < 0.15:
        text = text.lower()
    elif r < 0.18:
        text = text.upper()
    r = rng.random()
    if r < 0.15:
        text = text.rstrip("?.")
    elif r < 0.2:
        text = text.rstrip("?.") + "??"
    if rng.random() < typo_rate:
        text = _typo(rng, text)
    return text


def phrase(rng: random.Random, qtype: str, pool: str, **slots: str) -> str:
    """A surface-varied question of `qtype` from `pool`, with the task's own slot values."""
    if pool not in POOLS:
        raise ValueError(f"unknown phrasing pool {pool!r}; expected one of {', '.join(POOLS)}")
    frame = rng.choice(FRAMES[qtype][pool])
    s = slots.get("s", "")
    fill = dict(
        x=rng.choice(SHAPE_WORDS), x1=rng.choice(SHAPE_WORD), col=rng.choice(COLOUR_WORDS),
        art="an" if s[:1] in "aeiou" and s else "a", **slots,
    )
    text = frame.format(**fill)
    if text.endswith("?") and rng.random() < 0.2 and "{pos}" not in frame and not any(
            w in text for w in ("picture", "image")):
        text = text[:-1] + rng.choice(LOCATIONS[pool]) + "?"
    return surface(rng, text, pool)
