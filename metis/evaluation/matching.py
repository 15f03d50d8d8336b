"""How an answer is scored against the expected one: three rules a person can predict.

First the answer is taken from the model's output: the text inside the last `<answer>…</answer>`
if there is one (backends already strip these tags from the answer they return), else the whole
final text; then the content of its last `\\boxed{…}` if there is one, else its last non-empty
line. Then exactly one rule applies:

1. **Multiple choice** (the question has `choices`): the answer names a choice by its letter
   (`B`, `(B)`, `B.`, `B)`, `B: 36`) or by its full text; it is right if that is the expected
   choice. Expected `"B"` with choices `["Q1", "Q4"]`: `"B"`, `"(b)"`, `"B. Q4"` and `"q4"` are
   right; `"A"`, `"Q4 by far"` and `"A circle"` (not a letter form) are not.
2. **Numeric** (the expected answer is a number, optionally with `%`, `°` or `$`, thousands
   separated by commas): the last number in the answer is compared within 0.1%
   (`math.isclose(rel_tol=1e-3)`). Expected `"14.40"`: `"14.4"`, `"$14.40"` and
   `"The total is 14.40."` are right, `"14.5"` and `"14.40 plus tax 1"` (last number 1) are not.
   Numbers are read as written: `"50%"` matches `"50"`, not `"0.5"`.
3. **Exact** otherwise: equal after normalisation (lower case, runs of spaces made one, spaces,
   quotes, `*` and the punctuation `.,;:!?` trimmed from both ends). Expected `"red circle"`:
   `"Red circle."` and `"**red  circle**"` are right, `"a red circle"` and `"red"` are not.
"""

from __future__ import annotations

import math
import re

ANSWER_TAG = re.compile(r"<answer>(.*?)(?:</answer>|$)", re.S)
BOXED = re.compile(r"\\boxed\{((?:[^{}]|\{[^{}]*\})*)\}")
NUMBER = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|[-+]?\.\d+")
GOLD_NUMBER = re.compile(rf"^\$?({NUMBER.pattern})\s*[%°]?$")
LETTER = re.compile(r"^\(?([a-z])(?:\)|[.:]|$)")
TRIM = " \t\n\"'`*.,;:!?"
REL_TOL = 1e-3


def extract(output: str) -> str:
    """The answer part of a model's output (see the module docstring)."""
    tagged = ANSWER_TAG.findall(output)
    text = tagged[-1] if tagged else output
    if boxed := BOXED.findall(text):
        return boxed[-1].strip()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def normalise(text: str) -> str:
    return " ".join(text.lower().split()).strip(TRIM)


def letter(index: int) -> str:
    return chr(ord("A") + index)


def choice_index(text: str, choices: tuple[str, ...]) -> int | None:
    """Which choice `text` names, by letter form or by full text; None if none."""
    said = normalise(text)
    if (found := LETTER.match(said)) and (index := ord(found.group(1)) - ord("a")) < len(choices):
        return index
    texts = [normalise(c) for c in choices]
    return texts.index(said) if said in texts else None


def gold_number(answer: str) -> float | None:
    """The expected answer as a number, or None if it is not one (then the exact rule applies)."""
    found = GOLD_NUMBER.match(normalise(answer))
    return _number(found.group(1)) if found else None


def _number(text: str) -> float:
    return float(text.replace(",", ""))


def is_correct(output: str, answer: str, choices: tuple[str, ...] = ()) -> bool:
    """Whether a model's output gives the expected answer (the rules above)."""
    got = extract(output)
    if choices:
        expected = choice_index(answer, choices)
        return expected is not None and choice_index(got, choices) == expected
    if (gold := gold_number(answer)) is not None:
        numbers = NUMBER.findall(got)
        return bool(numbers) and math.isclose(_number(numbers[-1]), gold, rel_tol=REL_TOL, abs_tol=1e-9)
    return normalise(got) == normalise(answer)
