"""Memory of loading one request's images, measured in a fresh process from /proc/self/status.

    python tests/rss_probe.py chat FOLDER        # every image in FOLDER as one chat turn, to model inputs
    python tests/rss_probe.py finetune ZIP       # a fine-tuning upload: unpack, validate, load each row

Prints one JSON line: baseline (after imports), peak (VmHWM, reset after the baseline) and after
(VmRSS once everything is released), in MiB, and what happened (`ok` or the refusal's message).
"""

from __future__ import annotations

import gc
import json
import sys
import tempfile
from pathlib import Path

from metis.finetune.data import DatasetError, load_dataset, unpack_upload
from metis.images import ImageError
from metis.prompting import PromptBuilder
from metis.tiny.tokenizer import build_image_processor, build_tokenizer
from metis.ui.events import to_messages, user_bubbles


def status_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(field)


def chat(folder: str, prompts: PromptBuilder) -> None:
    paths = sorted(str(p) for p in Path(folder).iterdir())
    inputs = prompts.build(to_messages(user_bubbles("What is shown?", paths)))
    del inputs


def finetune(archive: str, prompts: PromptBuilder) -> None:
    with tempfile.TemporaryDirectory() as folder:
        for example in load_dataset(unpack_upload([archive], folder)):
            inputs = prompts.build(example.messages())  # one row at a time, as feature extraction does
            del inputs


def main(kind: str, target: str) -> dict:
    prompts = PromptBuilder(build_tokenizer(), build_image_processor())
    gc.collect()
    baseline = status_mib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    try:
        {"chat": chat, "finetune": finetune}[kind](target, prompts)
        outcome = "ok"
    except (ImageError, DatasetError) as exc:
        outcome = str(exc)
    peak = status_mib("VmHWM")
    gc.collect()
    return dict(baseline_mib=round(baseline), peak_above_mib=round(peak - baseline),
                after_above_mib=round(status_mib("VmRSS") - baseline), outcome=outcome)


if __name__ == "__main__":
    print(json.dumps(main(*sys.argv[1:3])))
