"""How the cost of a query grows: prefill time and memory versus image resolution and prompt
length, and the router's own share at each size.

The tiny model's image processor pins images to 112x112 (16 tokens); here a PromptBuilder with
wider pixel bounds lets 448..1792 px images through, i.e. 256..4096 image tokens. Peak memory
is the process's peak RSS above its resident size just before the pass (Linux and glibc: freed
heap is trimmed and the peak reset through /proc/self/clear_refs before each pass).
"""

from __future__ import annotations

import ctypes
import math
import statistics
import time
from pathlib import Path

import torch

from metis.prompting import Message, PromptBuilder, PromptConfig
from metis.serving.engine import Engine
from metis.tiny import world

from .common import Row, timed

IMAGE_TOKENS = (256, 1024, 4096)
TEXT_TOKENS = (128, 512, 2048)
_STATUS = Path("/proc/self/status")
_LIBC = ctypes.CDLL("libc.so.6")


def _rss_kib(field: str) -> int:
    line = next(x for x in _STATUS.read_text().splitlines() if x.startswith(field + ":"))
    return int(line.split()[1])


def _peak_extra_mib(fn) -> float:
    """Peak resident memory that `fn` adds, in MiB."""
    _LIBC.malloc_trim(0)  # hand freed heap back first, or reused free blocks would hide the peak
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    before = _rss_kib("VmRSS")
    fn()
    return round((_rss_kib("VmHWM") - before) / 1024, 1)


class GateTimer:
    """Wall time spent inside the router gates' forward (the matmul that routing adds)."""

    def __init__(self, model):
        self.seconds = 0.0
        self._handles = []
        for block in model.moe_blocks():
            self._handles.append(block.gate.register_forward_pre_hook(self._start))
            self._handles.append(block.gate.register_forward_hook(self._stop))

    def _start(self, *_):
        self._t = time.perf_counter()

    def _stop(self, *_):
        self.seconds += time.perf_counter() - self._t

    def remove(self):
        for h in self._handles:
            h.remove()


def gate_flops_share(model) -> float:
    """Gate parameters over the decoder parameters one token uses (shared + one expert): the
    router's share of the per-token matmul FLOPs, before attention's quadratic term shrinks it."""
    text = model.config.text_config
    layers = model.model.language_model.layers
    gate = sum(b.gate.weight.numel() for b in model.moe_blocks())
    attn = sum(p.numel() for layer in layers for p in layer.self_attn.parameters())
    per_expert = 3 * text.hidden_size * text.moe_intermediate_size
    shared = 3 * text.hidden_size * text.shared_expert_intermediate_size
    active = attn + gate + len(model.moe_blocks()) * (per_expert + shared) + model.lm_head.weight.numel()
    return gate / active


def _prefill(engine: Engine, inputs: dict, repeats: int) -> dict:
    model = engine.model
    gates = GateTimer(model)

    @torch.inference_mode()
    def once():
        model(**inputs, routing=model.new_routing("auto"), use_cache=True, logits_to_keep=1)

    try:
        times = []
        memory = _peak_extra_mib(lambda: times.append(timed(once)))  # the model is warm by now
        times += [timed(once) for _ in range(repeats - 1)]
        gate_s = gates.seconds / repeats
        seconds = statistics.median(times)
    finally:
        gates.remove()
    text = model.config.text_config
    kv = 2 * text.num_hidden_layers * text.num_key_value_heads * (text.hidden_size // text.num_attention_heads)
    return dict(
        prompt_tokens=int(inputs["input_ids"].shape[1]),
        prefill_ms=round(seconds * 1e3, 2),
        peak_extra_mib=memory,
        kv_cache_mib=round(kv * inputs["input_ids"].shape[1] * model.dtype.itemsize / 2**20, 2),
        gate_ms=round(gate_s * 1e3, 3),
        gate_share=round(gate_s / seconds, 5),
    )


def _inputs(engine: Engine, config: PromptConfig, message: Message) -> dict:
    """The engine's prompt format under other bounds (image size, text length)."""
    builder = PromptBuilder(engine.tokenizer, engine.prompts.image_processor, config, engine.prompts.system_prompt)
    return {k: v.to(engine.model.device) for k, v in builder.build([message]).items()}


def run(engine: Engine, quick: bool) -> dict:
    repeats = 1 if quick else 3
    sample = world.generate("test", 1)[0]
    rows = {"image_tokens": [], "text_tokens": []}
    for tokens in IMAGE_TOKENS:
        side = int(math.isqrt(tokens)) * 28  # one image token = a 2x2 merge of 14 px patches
        config = PromptConfig(min_pixels=side * side, max_pixels=side * side)
        inputs = _inputs(engine, config, Message("user", sample.question, [sample.image.resize((side, side))]))
        rows["image_tokens"].append({"image_tokens": tokens, "side_px": side, **_prefill(engine, inputs, repeats)})
    for tokens in TEXT_TOKENS:
        words = " ".join([sample.question] * tokens)
        ids = engine.tokenizer(words, add_special_tokens=False)["input_ids"][:tokens]
        text = engine.tokenizer.decode(ids)
        inputs = _inputs(engine, PromptConfig(max_text_chars=len(text)), Message("user", text))
        rows["text_tokens"].append({"text_tokens": tokens, **_prefill(engine, inputs, repeats)})
    return dict(rows, gate_flops_share=round(gate_flops_share(engine.model), 5))


def rows(scaling: dict) -> list[Row]:
    out = []
    for key in ("image_tokens", "text_tokens"):
        sizes = " / ".join(str(x[key]) for x in scaling[key])
        costs = " / ".join(f"{x['prefill_ms']:.0f} ms, +{x['peak_extra_mib']:.0f} MiB" for x in scaling[key])
        router = max(x["gate_share"] for x in scaling[key])
        out.append((f"Scaling: prefill at {sizes} {key.replace('_', ' ')}",
                    f"{costs}; router gates ≤ {router:.2%} of it", "", ""))
    return out
