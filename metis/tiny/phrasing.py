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
        "train": ("I want to know how many {p} there are.", "Please count the {p}.", "How many {p} exist?",
                  "How many {p} are there?", "Count the {p}.", "How many {p} can you see?",
                  "What is the number of {p}?", "How many {p} do you see?", "Tell me how many {p} there are.",
                  "Number of {p}?", "How many {p} are in the picture?", "Give the count of {p}.",
                  "What's the number of {p} shown?",
                  "How many {p} are visible?",
                  "Count of {p}?",
                  "Could you tell me how many {p} there are?",
                  "I'd like the number of {p}.",
                  "How many {p} are drawn?",
                  "Find the number of {p}."),
        "val": ("Can you count the {p} for me?", "How many {p} appear?"),
        "test": ("Count how many {p} are shown.", "What number of {p} is there?",
                 "How many {p} does the image contain?"),
    },
    "count_all": {
        "train": ("How many {x} are shown?", "What is the total count of {x}?", "Give me the number of {x}.",
                  "How many shapes are there?", "Count the shapes.", "How many shapes can you see?",
                  "What is the number of shapes?", "How many {x} are there in total?", "Count all the {x}.",
                  "How many {x} do you see?", "Tell me the number of {x}.", "Total number of {x}?",
                  "How many {x} are visible in total?",
                  "Could you tell me how many {x} there are?",
                  "Find the total number of {x}.",
                  "I'd like to know how many {x} are drawn.",
                  "Total {x}?",
                  "How many {x} altogether?"),
        "val": ("How many {x} appear in all?", "Can you count every {x1}?"),
        "test": ("How many {x} does the picture hold?", "Count up all of the {x}.",
                 "What is the count of {x} in the image?"),
    },
    "colour": {
        "train": ("Which {col} does the {s} have?", "I want to know the {col} of the {s}.", "What colour is the {s}?",
                  "Which colour is the {s}?", "What is the colour of the {s}?",
                  "What {col} is the {s}?", "Tell me the {col} of the {s}.", "The {s} is which {col}?",
                  "Name the {col} of the {s}.", "What {col} does the {s} have?",
                  "Could you tell me the {col} of the {s}?",
                  "What {col} has the {s} got?",
                  "The {s}: what {col}?",
                  "I'd like to know which {col} the {s} is.",
                  "Find the {col} of the {s}.",
                  "How is the {s} coloured?"),
        "val": ("Which {col} has the {s}?", "Can you tell me what {col} the {s} is?"),
        "test": ("Identify the {col} of the {s}.", "What is the {s}'s {col}?", "In what {col} is the {s} drawn?"),
    },
    "shape": {
        "train": ("Which {x1} has the colour {c}?", "Tell me the shape of the {c} {x1}.", "Which shape is {c}?",
                  "What shape is {c}?", "What is the {c} shape?",
                  "What kind of {x1} is the {c} one?", "Name the {c} {x1}.", "Which {x1} is {c}?",
                  "What is the shape of the {c} {x1}?", "Tell me which shape is {c}.",
                  "Could you tell me which {x1} is {c}?",
                  "The {c} one is which shape?",
                  "Find the {c} {x1} and name its shape.",
                  "What is the {c} {x1}?",
                  "I'd like to know the shape of the {c} {x1}.",
                  "Which of the {x} is {c}?"),
        "val": ("The {c} {x1} is what shape?", "Can you name the {c} shape?"),
        "test": ("Identify the shape that is {c}.", "What sort of shape is coloured {c}?",
                 "Which figure has the colour {c}?"),
    },
    "cell": {
        "train": ("Which {x1} is in the {pos}?", "Tell me what is located in the {pos}.", "What is in the {pos}?",
                  "What is in the {pos} cell?", "What do you see in the {pos}?",
                  "Which shape is in the {pos} corner?", "What is drawn in the {pos}?",
                  "Tell me what is in the {pos} square of the grid.", "Describe the {pos} cell.",
                  "Could you tell me what is in the {pos}?",
                  "The {pos} holds what?",
                  "What is shown in the {pos}?",
                  "Find what is in the {pos} cell.",
                  "I'd like to know what is in the {pos}.",
                  "What {x1} is placed in the {pos}?"),
        "val": ("What sits in the {pos}?", "What occupies the {pos} part?"),
        "test": ("What can be found in the {pos} of the image?", "Name what is in the {pos}.",
                 "What appears in the {pos} quarter?"),
    },
    "present": {
        "train": ("Are there any {p}?", "Can I find {art} {s} in it?", "Is there {art} {s}?",
                  "Is there {art} {s} in the picture?", "Do you see {art} {s}?",
                  "Can you see {art} {s}?", "Does the image contain {art} {s}?", "Is any {s} present?",
                  "Tell me if there is {art} {s}.",
                  "Could you tell me if there is {art} {s}?",
                  "Any {p}?",
                  "Is {art} {s} visible?",
                  "Do the {x} include {art} {s}?",
                  "I'd like to know whether {art} {s} is drawn.",
                  "Are any of the {x} {p}?"),
        "val": ("Is {art} {s} shown?", "Would I find {art} {s} here?"),
        "test": ("Does {art} {s} appear?", "Is there at least one {s}?", "Check whether there is {art} {s}."),
    },
    "colour_at": {
        "train": ("What colour is the thing in the {pos}?", "Tell me which {col} the {pos} one is.",
                  "What colour is the shape in the {pos}?", "What {col} is the {x1} in the {pos}?",
                  "Which {col} is the {pos} shape?", "Tell me the {col} of the {x1} in the {pos}.",
                  "What is the {col} of the {pos} {x1}?", "The {x1} in the {pos} is which {col}?",
                  "Could you tell me the {col} of the {x1} in the {pos}?",
                  "The {pos} {x1}: what {col}?",
                  "How is the {x1} in the {pos} coloured?",
                  "Find the {col} of the {pos} {x1}.",
                  "I'd like to know what {col} the {pos} {x1} is.",
                  "In the {pos}, what {col} is the {x1}?"),
        "val": ("Name the {col} of the {pos} {x1}.", "What {col} has the {x1} at the {pos}?"),
        "test": ("Which {col} is used for the {x1} in the {pos}?", "What is the {pos} {x1}'s {col}?",
                 "Identify the {col} of whatever is in the {pos}."),
    },
    "count_diff": {
        "train": ("First count the {a}, then the {b}, and subtract.", "How many more {a} do you see than {b}?",
                  "How many more {a} than {b} are there?", "How many more {a} are there than {b}?",
                  "What is the number of {a} minus the number of {b}?",
                  "What is the difference between the number of {a} and {b}?",
                  "Count the {a} and the {b}, then subtract.", "By how many do the {a} outnumber the {b}?",
                  "Subtract the number of {b} from the number of {a}.", "How many {a} minus {b}?",
                  "Could you work out how many more {a} there are than {b}?",
                  "Take the number of {b} away from the number of {a}.",
                  "Find how many more {a} than {b} there are.",
                  "I'd like to know by how much the {a} exceed the {b}.",
                  "What do you get if you subtract the {b} count from the {a} count?",
                  "How many {a} are there beyond the number of {b}?"),
        "val": ("How much larger is the count of {a} than of {b}?", "Find the difference of {a} and {b}."),
        "test": ("Count the {a} and the {b}, then tell me the difference.",
                 "What is the difference between the counts of {a} and {b}?",
                 "How many extra {a} are there compared to {b}?"),
    },
    "total_sides": {
        "train": ("Count the sides of every {x1} and add them.", "What is the total of all sides?",
                  "How many sides do the shapes have in total?", "What is the total number of sides of all shapes?",
                  "How many sides are there altogether?", "Add up the sides of all the {x}.",
                  "What is the sum of the sides of every {x1}?", "Count all the sides of the {x} together.",
                  "How many edges do the {x} have altogether?",
                  "Could you work out the total number of sides?",
                  "Find the sum of all the sides of the {x}.",
                  "How many sides do all the {x} have combined?",
                  "I'd like the total count of sides over every {x1}.",
                  "Sides of all {x} together?",
                  "Add every {x1}'s sides: what is the total?"),
        "val": ("Sum the sides over all {x}.", "How many sides in total across the {x}?"),
        "test": ("If you add up every side, how many are there?", "What do the sides of all {x} add up to?",
                 "Total the sides of the {x}."),
    },
    "more_colour": {
        "train": ("Count the {ca} {x} and the {cb} {x}: which colour has more?", "More {ca} or more {cb}?",
                  "Are there more {ca} shapes or {cb} shapes?", "Which is more common, {ca} or {cb}?",
                  "Which colour appears more often, {ca} or {cb}?", "Are there more {ca} {x} or {cb} {x}?",
                  "Compare the {ca} and {cb} {x}: which are more numerous?",
                  "Which {col} is used more, {ca} or {cb}?", "Is {ca} or {cb} more frequent?",
                  "Could you tell me whether {ca} or {cb} {x} are more numerous?",
                  "Find which {col} has more {x}: {ca} or {cb}.",
                  "{ca} versus {cb}: which has more {x}?",
                  "Which are there more of, {ca} {x} or {cb} {x}?",
                  "I'd like to know which is more frequent: {ca} or {cb}.",
                  "Do more {x} have {ca} or {cb}?"),
        "val": ("Which {col} wins, {ca} or {cb}?", "Do {ca} or {cb} {x} outnumber the other?"),
        "test": ("Which occurs more, {ca} {x} or {cb} {x}?", "Is there a larger number of {ca} or {cb} {x}?",
                 "Between {ca} and {cb}, which {col} has more {x}?"),
    },
    "remain": {
        "train": ("I take away {k} {p}. How many {x} are still there?",
                  "How many shapes are left if {k} {p} are taken out?", "If I remove {k} {p}, how many shapes remain?",
                  "Take away {k} {p}. How many {x} are left?",
                  "How many {x} are left after removing {k} {p}?", "Remove {k} {p}; how many {x} remain?",
                  "If {k} {p} were removed, how many {x} would be left?",
                  "After taking away {k} {p}, how many {x} are there?",
                  "Could you work out how many {x} are left if {k} {p} go away?",
                  "Suppose I remove {k} {p}; how many {x} are there then?",
                  "Find how many {x} stay after {k} {p} are taken away.",
                  "With {k} {p} gone, how many {x} are left?",
                  "How many {x} would there be without {k} of the {p}?",
                  "Take out {k} {p} and count the {x} that are left."),
        "val": ("Suppose {k} {p} disappear. How many {x} stay?", "Without {k} {p}, how many {x} would remain?"),
        "test": ("If I take {k} {p} away, how many shapes remain?", "Delete {k} {p}: how many {x} are left over?",
                 "How many {x} remain once {k} {p} are removed?"),
    },
    "not_colour": {
        "train": ("How many {x} are some other colour than {c}?", "Not counting the {c} ones, how many {x} are there?",
                  "How many shapes are not {c}?", "How many {x} are not {c}?", "Count the {x} that are not {c}.",
                  "How many {x} have a colour other than {c}?", "What is the number of non-{c} {x}?",
                  "Excluding {c} ones, how many {x} are there?",
                  "Could you tell me how many {x} are not {c}?",
                  "Leaving out the {c} {x}, how many {x} are there?",
                  "Find the number of {x} whose colour is not {c}.",
                  "How many {x} are any colour but {c}?",
                  "I'd like to know how many {x} aren't coloured {c}.",
                  "Without counting the {c} ones, how many {x} are there?"),
        "val": ("How many {x} aren't {c}?", "Apart from the {c} ones, how many {x} are there?"),
        "test": ("Count every {x1} that is not {c}.", "How many of the {x} are some colour besides {c}?",
                 "Ignoring the {c} {x}, how many are left?"),
    },
    "kind_sides": {
        "train": ("Add the sides of all {p} together.", "What is the sum of the sides of the {p}?",
                  "How many sides do the {p} have in total?", "Add up the sides of the {p}.",
                  "What is the total number of sides of the {p}?", "How many sides do all the {p} have together?",
                  "Sum the sides of every {s}.", "Count the sides of the {p} altogether.",
                  "Could you work out the total number of sides of the {p}?",
                  "Find the sum of the sides of the {p}.",
                  "Counting only the {p}, how many sides are there?",
                  "I'd like the total of the sides of the {p}.",
                  "What is the side count of all the {p} together?",
                  "Each of the {p} has some sides; what is their total?"),
        "val": ("What do the sides of the {p} add up to?", "Total the sides of the {p}."),
        "test": ("If you add up the sides of the {p}, what do you get?", "How many edges do the {p} have in all?",
                 "What is the combined number of sides of the {p}?"),
    },
    "compare_two": {
        "train": ("Count the {c} {x} and the {p}: which group is bigger?", "Are {c} {x} more common than {p}?",
                  "Are there more {c} shapes or {p}?", "Which are more numerous, {c} {x} or {p}?",
                  "Are there more {p} or {c} {x}?", "Compare the {c} {x} with the {p}: which are more?",
                  "Which is larger, the number of {p} or the number of {c} {x}?",
                  "Do {c} {x} outnumber {p}?",
                  "Could you tell me whether there are more {p} or more {c} {x}?",
                  "Find which group is larger: the {p} or the {c} {x}.",
                  "{c} {x} versus {p}: which are more?",
                  "Which are there more of, the {p} or the {c} {x}?",
                  "Of the {c} {x} and the {p}, which group has more members?",
                  "Which is more common here, {p} or {c} {x}?"),
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
              "About this image: ", "I have a question. ", "So, ", "One more: ", "Tell me: ", "Picture question: ",
              "Well, ", "Hi! "),
    "val": ("", "", "Okay, ", "Looking at this, "),
    "test": ("", "", "Now, ", "Here is a question. ", "Could you help? "),
}
LOCATIONS = {"train": (" in the picture", " in the image", " here", " in the grid", " in this photo", " in the drawing",
                       " on the canvas"),
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


# Words that change no question's meaning; training wordings now and then carry one at a random
# place, so the model learns to read a question by its content words rather than its exact frame.
FILLERS = ("just", "exactly", "actually", "really", "please", "then", "so", "kindly", "roughly")


def _filler(rng: random.Random, text: str) -> str:
    words = text.split(" ")
    words.insert(rng.randrange(len(words)), rng.choice(FILLERS))
    return " ".join(words)


def surface(rng: random.Random, text: str, pool: str, typo_rate: float = 0.08) -> str:
    """Prefix, case, punctuation and the occasional typo: how people actually type. Only training
    wordings get filler words, so the held-out pools stay exactly as they were."""
    if pool == "train" and rng.random() < 0.15:
        text = _filler(rng, text)
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
