"""Where the sample router dataset lives: `assets/finetune/sample/` (500 labelled lines for the
tiny model, offered by the fine-tuning tab). `metis.tiny.router_sample` writes it.
"""

from __future__ import annotations

from pathlib import Path

SAMPLE_DIR = Path(__file__).resolve().parents[2] / "assets" / "finetune" / "sample"
SAMPLE_FILE = SAMPLE_DIR / "router.jsonl"
