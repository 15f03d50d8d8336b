"""What every measurement shares: the model under test, a fixed prompt, and noise-resistant timing.

The machine these run on is often busy (two cores, a training job beside us), so absolute
numbers drift; every comparison therefore alternates its cases within one run and reports
medians, and the ratios are what the targets are judged on.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import Qwen2_5_VLForConditionalGeneration
from transformers.generation.streamers import BaseStreamer

from metis.conversion import to_dense_config
from metis.loading import EMBEDDED
from metis.prompting import Message
from metis.serving.engine import Engine
from metis.tiny import world
from metis.upcycle import upcycle


def checkpoint(spec: str | None) -> tuple[str, str]:
    """(path or spec for `Engine.load`, label for the report).

    Without a spec: the embedded tiny model, or, while it does not exist yet (it is trained on
    this machine), a random-weight model of exactly its architecture, so every ratio can still
    be measured; only the hybrid accuracy needs trained weights.
    """
    if spec:
        return spec, spec
    if (EMBEDDED / "config.json").exists():
        return str(EMBEDDED), "embedded tiny (trained)"
    return str(random_tiny_checkpoint()), "tiny architecture, random weights (embedded model not trained yet)"


def random_tiny_checkpoint() -> Path:
    """The tiny training recipe's dense model, upcycled, with random weights, saved like the real one."""
    from metis.tiny.tokenizer import build_image_processor, build_tokenizer
    from metis.tiny.train import dense_config

    tok = build_tokenizer()
    torch.manual_seed(0)
    model = upcycle(Qwen2_5_VLForConditionalGeneration(dense_config(tok)).eval(), system_prompt=world.SYSTEM_PROMPT)
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    model.generation_config.eos_token_id = eos
    model.generation_config.pad_token_id = tok.pad_token_id
    out = Path(tempfile.mkdtemp(prefix="bench-tiny-random-"))
    atexit.register(shutil.rmtree, out, ignore_errors=True)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    build_image_processor().save_pretrained(out)
    return out


Row = tuple[str, str, str, str]  # one line of `python -m bench`'s table: measurement, result, target, verdict


def verdict(met: bool) -> str:
    return "met" if met else "**missed**"


def upcycled_pair(engine: Engine) -> tuple[Qwen2_5_VLForConditionalGeneration, torch.nn.Module]:
    """(dense, MoE upcycled from it): same weights, so any speed difference is the MoE's own."""
    torch.manual_seed(0)
    with torch.device(engine.model.device):  # built in place: a full-size twin never passes through fp32 on CPU
        twin = to_dense_config(engine.model.config)
        twin._attn_implementation = engine.model.config._attn_implementation  # the same attention kernel
        dense = Qwen2_5_VLForConditionalGeneration._from_config(twin, dtype=engine.model.dtype).eval()
    return dense, upcycle(dense, system_prompt=engine.model.config.system_prompt)


@contextlib.contextmanager
def cpu_only_children():
    """Processes started inside see no GPU, so a child app measures the CPU path on a GPU host.
    This process asks CUDA first: its device list is fixed once asked, whatever the variable says."""
    torch.cuda.is_available()
    saved = os.environ.get("CUDA_VISIBLE_DEVICES")
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("CUDA_VISIBLE_DEVICES")
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = saved


def sample_messages() -> list[Message]:
    """A held-out tiny-world question with its image: the prompt shape the demo really serves."""
    s = world.generate("test", 1)[0]
    return [Message("user", s.question, [s.image])]


def decode_settings(engine: Engine, new_tokens: int) -> dict:
    """The `generate` arguments the engine uses, for a baseline that does the same work."""
    return dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, top_k=None,
                eos_token_id=engine.eos_ids, pad_token_id=engine.tokenizer.pad_token_id, use_cache=True)


@contextlib.contextmanager
def fixed_length(model, new_tokens: int):
    """Force exactly `new_tokens` tokens from callers that cannot pass `min_new_tokens` (the engine):
    transformers then masks every end token the engine stops on (end of sequence and a one-token
    `</answer>`), so random or early-stopping models still produce comparable work."""
    config = model.generation_config
    saved = config.min_new_tokens
    config.min_new_tokens = new_tokens
    try:
        yield
    finally:
        config.min_new_tokens = saved


class Clock(BaseStreamer):
    """Records when each generated token leaves `generate` (the prompt's `put` is skipped)."""

    def __init__(self):
        self.times: list[float] = []
        self._prompt_seen = False

    def put(self, value):
        if self._prompt_seen:
            self.times.append(time.perf_counter())
        self._prompt_seen = True

    def end(self):
        pass

    def decode_rate(self) -> float:
        """Tokens/s after the first token: the decode speed, free of the prefill."""
        return (len(self.times) - 1) / (self.times[-1] - self.times[0])


def interleave(cases: dict[str, Callable[[], object]], repeats: int, warmup: int = 1) -> dict[str, object]:
    """Median of each case's result (a number, or a tuple of numbers taken element-wise); the
    cases alternate in ABBA order so that drift in machine load hits every case alike."""
    names = list(cases)
    for _ in range(warmup):
        for name in names:
            cases[name]()
    runs: dict[str, list] = {name: [] for name in names}
    for r in range(repeats):
        for name in names if r % 2 == 0 else reversed(names):
            runs[name].append(cases[name]())
    return {name: _median(v) for name, v in runs.items()}


def _median(values: list):
    if isinstance(values[0], tuple):
        return tuple(statistics.median(column) for column in zip(*values))
    return statistics.median(values)


def start_in_one_batch(engine: Engine, threads: list[threading.Thread], rows: int) -> None:
    """Start `threads` and keep the model busy until `rows` of their requests wait: the scheduler
    then takes them into one batch, so "N users at once" really starts together."""
    with engine.slot.hold():
        for thread in threads:
            thread.start()
        while engine.scheduler.waiting() < rows:
            time.sleep(0.0005)


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def timed_cpu(fn: Callable[[], object]) -> tuple[float, float]:
    """(wall, process CPU) seconds: CPU time, summed over our threads, barely moves when other
    processes compete for the cores, so it separates our own overhead from machine load."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def ratio(a: float, b: float) -> float:
    return round(a / b, 3) if b else float("nan")
