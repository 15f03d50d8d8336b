"""The built-in evaluation datasets, so the Evaluate tab works before any upload.

- The embedded tiny model's: 8 questions for each of its 14 tasks (112) on test-split images
  (world.py's held-out seeds), worded from the held-out test pool of phrasings (phrasing.py),
  never trained on and never tuned against. Categories are `think/<task>` for the reasoning tasks
  and `direct/<task>` for the perception ones, so the report scores routing too. The lines go
  task by task in rounds, so any prefix (`--limit`) covers every task.
- The real model's: the chart, triangle and receipt of the chat's examples (ui/examples.py),
  six questions with their answers, one rule of matching.py or more each.

    python -m metis.evaluation.samples   # rewrites assets/eval/
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from ..tiny import world

ROOT = Path(__file__).resolve().parents[2] / "assets"
TINY_FILE = ROOT / "eval" / "tiny" / "questions.jsonl"
REAL_FILE = ROOT / "eval" / "real-model" / "questions.jsonl"
SAMPLES = {
    "Embedded tiny model: shapes world, held-out wordings (112 questions)": TINY_FILE,
    "Real model: the chart, triangle and receipt examples (6 questions)": REAL_FILE,
}
PER_TASK = 8
LABEL = {"direct": "direct", "reasoning": "think"}

REAL_QUESTIONS = [
    {"question": "Which quarter had the highest sales, and by how much did it exceed the lowest?",
     "images": ["chart.png"], "choices": ["Q2, by 23", "Q4, by 36", "Q4, by 29", "Q1, by 7"], "answer": "B",
     "category": "think/chart"},
    {"question": "What were the sales in Q2, in k$?", "images": ["chart.png"], "answer": "58",
     "category": "direct/chart"},
    {"question": "In triangle ABC, angle A is 50° and angle B is 60°. Find x, the angle at C.",
     "images": ["geometry.png"], "answer": "70°", "category": "think/geometry"},
    {"question": "What is the total on this receipt?", "images": ["receipt.png"], "answer": "14.40",
     "category": "direct/receipt"},
    {"question": "How much do the latte and the muffin cost together?", "images": ["receipt.png"],
     "answer": "7.40", "category": "think/receipt"},
    {"question": "What is the name of the cafe?", "images": ["receipt.png"], "answer": "Corner Cafe",
     "category": "direct/receipt"},
]


def sample_for(info: dict | None) -> str:
    """The built-in dataset that suits a backend (its Model tab rows): the tiny one for the
    embedded model or when nothing loaded, the real model's for any other checkpoint or server."""
    names, checkpoint = list(SAMPLES), str((info or {}).get("checkpoint", "")).lower()
    return names[0] if not info or "embedded tiny" in checkpoint or "metis-home-tiny" in checkpoint else names[1]


def tiny_samples() -> list[world.Sample]:
    """PER_TASK test-split samples of every task, in rounds of one per task."""
    found: dict[str, list[world.Sample]] = {q: [] for family in world.QTYPES for q in world.QTYPES[family]}
    offset = 0
    while any(len(v) < PER_TASK for v in found.values()):
        family = ("direct", "reasoning")[offset % 2]
        s = world.sample(world.SPLIT_BASE["test"] + offset, family, wording="test")
        if len(found[s.qtype]) < PER_TASK:
            found[s.qtype].append(s)
        offset += 1
    return [found[q][r] for r in range(PER_TASK) for q in found]


def _write_jsonl(path: Path, records: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")


def write_tiny(path: Path = TINY_FILE) -> None:
    (path.parent / "images").mkdir(parents=True, exist_ok=True)
    records = []
    for i, s in enumerate(tiny_samples()):
        name = f"images/{i:03d}.png"
        s.image.save(path.parent / name, optimize=True)
        records.append({"question": s.question, "images": [name], "answer": s.answer,
                        "category": f"{LABEL[s.family]}/{s.qtype}"})
    _write_jsonl(path, records)


def write_real(path: Path = REAL_FILE, examples: Path = ROOT / "examples") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    for name in sorted({n for q in REAL_QUESTIONS for n in q["images"]}):
        shutil.copy(examples / name, path.parent / name)
    _write_jsonl(path, REAL_QUESTIONS)


if __name__ == "__main__":
    write_tiny()
    write_real()
