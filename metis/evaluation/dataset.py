"""Evaluation datasets: one question per JSONL line, with its images and expected answer.

    {"question": "How many circles are there?", "images": ["img/1.png"], "answer": "3",
     "category": "direct/count", "choices": ["2", "3"]}

`question` and `answer` are required (an answer may be a JSON number); `images` are paths
relative to the file that may not leave its folder; `category` is optional, and a category
named `think` or `direct`, or starting with `think/` or `direct/`, carries the expert the
question should go to (the report then scores routing against it); `choices` (2 to 26 texts)
make it multiple choice: they are appended to the question as `A. …` lines and `answer` is a
letter or one of the texts (see matching.py).

The file, its images and uploads get fine-tuning's checks and bounds (finetune/data.py: size,
line count, image headers, a zip's unpacked size and file count), and every bad line is refused
at once with its number.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..finetune.data import (
    PROMPT,
    DataFiles,
    DatasetError,  # noqa: F401  (the evaluation's callers catch it from here)
    UploadBudget,
    check_images,
    checked_rows,
    read_rows,
    unpack_upload,
    within_budget,
)
from ..images import load_images
from ..prompting import Message
from .matching import choice_index, letter

EVAL_DATA = DataFiles((".jsonl", ".json"), ".jsonl")
LABELS = ("think", "direct")
MAX_CATEGORY_CHARS = 100
MAX_CHOICES = 26


@dataclass(frozen=True)
class Question:
    question: str
    images: tuple[Path, ...]
    answer: str
    category: str | None = None
    choices: tuple[str, ...] = ()
    line: int = 0

    @property
    def label(self) -> str | None:
        """The expert its category says it should go to (`think/…`, `direct/…`), if any."""
        head = (self.category or "").split("/", 1)[0]
        return head if head in LABELS else None

    def prompt(self) -> str:
        """What the model is asked: the question, then the choices as lettered lines."""
        return "\n".join([self.question] + [f"{letter(i)}. {c}" for i, c in enumerate(self.choices)])

    def messages(self) -> list[Message]:
        """One user turn; images loaded like a chat request's (same checks and pixel budget)."""
        return [Message("user", self.prompt(), load_images(self.images))]


def _text(record: dict, name: str, problems: list[str], required: bool = True) -> str | None:
    """A string field (answers may also be JSON numbers), or None after noting what is wrong."""
    value = record.get(name)
    if value is None:
        if required:
            problems.append(f"missing field {name!r}")
        return None
    if name == "answer" and isinstance(value, int | float) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str) or not value.strip():
        problems.append(f"field {name!r} must be a non-empty string")
        return None
    return value.strip()


def _choices(record: dict, answer: str | None, problems: list[str]) -> tuple[str, ...]:
    choices = record.get("choices")
    if choices is None:
        return ()
    if (not isinstance(choices, list) or not 2 <= len(choices) <= MAX_CHOICES
            or not all(isinstance(c, str) and c.strip() for c in choices)):
        problems.append(f"field 'choices' must be a list of 2 to {MAX_CHOICES} non-empty strings")
        return ()
    choices = tuple(c.strip() for c in choices)
    if answer is not None and choice_index(answer, choices) is None:
        problems.append(f"answer {answer!r} is neither a choice's letter (A-{letter(len(choices) - 1)}) "
                        "nor one of the choices")
    return choices


def _question(record: dict, number: int, root: Path, seen: dict) -> tuple[Question | None, list[str]]:
    problems: list[str] = []
    question = _text(record, "question", problems)
    answer = _text(record, "answer", problems)
    category = _text(record, "category", problems, required=False)
    if category and len(category) > MAX_CATEGORY_CHARS:
        problems.append(f"category too long ({len(category)} characters, at most {MAX_CATEGORY_CHARS})")
    choices = _choices(record, answer, problems)
    if question:
        asked = len(Question(question, (), "", choices=choices).prompt())
        if asked > PROMPT.max_text_chars:
            problems.append(f"question too long ({asked} characters with its choices, at most {PROMPT.max_text_chars})")
    headers, found = check_images(root, record.get("images", []), seen)
    problems += found
    if not problems:
        problems += within_budget(headers)
    if problems:
        return None, problems
    return Question(question, tuple(h.path for h in headers), answer, category, choices, number), []


def load_questions(path: str | Path) -> list[Question]:
    """Parse and check a .jsonl dataset; raises one DatasetError listing every problem."""
    path, rows = read_rows(path, EVAL_DATA)
    return checked_rows(rows, lambda record, number, seen: _question(record, number, path.parent, seen))


def load_upload(files: list[str | Path], folder: str | Path) -> list[Question]:
    """Questions from uploaded files (a .jsonl with its images, or a zip of its folder) gathered
    into `folder` within one upload budget, as fine-tuning's uploads are."""
    return load_questions(unpack_upload(files, folder, UploadBudget(), kind=EVAL_DATA))
