"""How big a Metis-HOME is: parameters, bf16 weight memory, KV cache per 1k tokens, and which
Hugging Face Spaces GPU tiers hold it at what context (`python -m metis size [CHECKPOINT|config.json]`).

Counts come from the safetensors headers where a checkpoint has them (no weight is read). From
a config alone, the model is built on the meta device with full-width experts, copies of the
dense FFN (`intermediate_size`) and no shared expert, which is what upcycling makes; the
published config's Qwen2-MoE defaults (1408-wide experts and a 5632 shared expert) are
reported beside it, since only the checkpoint's shapes can tell which is true.
"""

from __future__ import annotations

import copy
import json
import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from accelerate import init_empty_weights
from safetensors import safe_open

from .configuration import MetisHomeConfig

BF16 = 2  # bytes per value
GIB = 2**30
# CUDA context, allocator slack, prefill activations (a full-resolution image in the vision tower):
# kept free on every GPU before counting KV-cache room. An assumption, stated where it is used.
RUNTIME_RESERVE_GIB = 3.0
# Decoding one token at batch 1 reads every active weight once, so memory bandwidth bounds the
# rate; transformers' generate loop reaches about an eighth of that bound on a 7B model (kernel
# launches and Python per step). ZeroGPU runs on H200s (4.8 TB/s). A measured rate
# (bench/gpu.py on the target GPU) replaces the estimate via METIS_DECODE_TOKENS_PER_S.
# A ZeroGPU workload gets a slice of an H200 (70 of its 141 GB), and so about that share of its
# 4.8 TB/s; counting the whole GPU made reservations about twice too short.
ZEROGPU_BANDWIDTH = 4.8e12 * 70 / 141  # bytes/s
GENERATE_EFFICIENCY = 0.12
# (flavor, GPUs, GB of memory per GPU) as Hugging Face lists its Spaces hardware.
SPACES_TIERS = [
    ("t4-medium", 1, 16), ("l4x1", 1, 24), ("a10g-large", 1, 24), ("a10g-largex2", 2, 24),
    ("l40sx1", 1, 48), ("a10g-largex4", 4, 24), ("l4x4", 4, 24), ("zero-a10g (ZeroGPU, H200 slice)", 1, 70),
    ("a100-large", 1, 80), ("h100", 1, 80), ("l40sx4", 4, 48),
]


@dataclass(frozen=True)
class ModelSize:
    source: str  # "tensor shapes" or the assumption made from a config
    params_total: int
    params_per_expert: int
    num_experts: int
    kv_bytes_per_token: int  # bf16 keys and values of every decoder layer
    max_context: int
    literal_config_params: int | None = None  # the config's own MoE widths, when read from a config

    @property
    def params_active(self) -> int:
        """Per query: everything but the experts not chosen."""
        return self.params_total - (self.num_experts - 1) * self.params_per_expert

    @property
    def weight_bytes(self) -> int:
        return self.params_total * BF16

    @property
    def kv_bytes_per_1k(self) -> int:
        return self.kv_bytes_per_token * 1000

    def kv_room(self, gpus: int, gb_per_gpu: float) -> int:
        """Tokens of KV cache that fit beside the weights (0: the weights do not fit)."""
        free = gpus * (gb_per_gpu * 1e9 - RUNTIME_RESERVE_GIB * GIB) - self.weight_bytes
        return max(0, int(free // self.kv_bytes_per_token))

    def to_dict(self) -> dict:
        return {**asdict(self), "params_active": self.params_active, "weight_bytes": self.weight_bytes,
                "kv_bytes_per_1k": self.kv_bytes_per_1k}


def kv_bytes_per_token(text, itemsize: int = BF16) -> int:
    """Bytes of keys and values one token adds to the cache over every decoder layer (`text`: a
    text config), in `itemsize`-byte values."""
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    return text.num_hidden_layers * 2 * text.num_key_value_heads * head_dim * itemsize


def _meta_params(config: MetisHomeConfig) -> tuple[int, int]:
    """(total, per expert) of the model the config describes, built without memory."""
    from .modeling import MetisHomeForConditionalGeneration

    with init_empty_weights():
        model = MetisHomeForConditionalGeneration(config)
    total = sum(p.numel() for p in model.parameters())  # tied embeddings count once
    expert0 = sum(p.numel() for n, p in model.named_parameters() if ".mlp.experts.0." in n)
    return total, expert0


def size_from_shapes(config: MetisHomeConfig, shapes: dict[str, tuple[int, ...]]) -> ModelSize:
    total = sum(math.prod(s) for s in shapes.values())
    expert0 = sum(math.prod(s) for k, s in shapes.items() if re.search(r"\.mlp\.experts\.0\.", k))
    experts = {int(m.group(1)) for k in shapes if (m := re.search(r"\.mlp\.experts\.(\d+)\.", k))}
    kv = sum(s[0] for k, s in shapes.items() if re.search(r"self_attn\.[kv]_proj\.weight$", k)) * BF16
    text = config.text_config
    return ModelSize("tensor shapes", total, expert0, len(experts), kv or kv_bytes_per_token(text),
                     text.max_position_embeddings)


def size_from_config(config: MetisHomeConfig) -> ModelSize:
    literal, _ = _meta_params(config)
    config = copy.deepcopy(config)
    text = config.text_config
    text.moe_intermediate_size, text.shared_expert_intermediate_size = text.intermediate_size, 0
    total, per_expert = _meta_params(config)
    source = (f"config, assuming full-width experts ({text.intermediate_size}, copies of the dense FFN) "
              "and no shared expert, as upcycling makes them")
    return ModelSize(source, total, per_expert, text.num_experts, kv_bytes_per_token(text),
                     text.max_position_embeddings, literal_config_params=literal)


def tensor_shapes(files: list[Path]) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes from safetensors headers (no weight is read)."""
    shapes = {}
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                shapes[key] = tuple(f.get_slice(key).get_shape())
    return shapes


def model_size(spec: str | Path) -> ModelSize:
    """A checkpoint folder (shapes from its safetensors headers) or a config.json."""
    path = Path(spec)
    if path.is_file():
        config = MetisHomeConfig.from_dict(json.loads(path.read_text()))
        return size_from_config(config)
    config = MetisHomeConfig.from_pretrained(path)
    shapes = tensor_shapes(sorted(path.glob("*.safetensors")))
    return size_from_shapes(config, shapes) if shapes else size_from_config(config)


def decode_tokens_per_s(info, measured: float | None = None) -> float:
    """The `measured` decode rate (METIS_DECODE_TOKENS_PER_S, metis/settings.py), or one estimated
    for a ZeroGPU slice from the loaded model's active bf16 weights (`info`: loading.ModelInfo)."""
    if measured:
        return measured
    active = info.params_total - (info.num_experts - 1) * info.params_per_expert
    return ZEROGPU_BANDWIDTH * GENERATE_EFFICIENCY / (active * BF16)


def report(size: ModelSize) -> str:
    lines = [
        f"source: {size.source}",
        f"parameters: {size.params_total / 1e9:.1f}B ({size.params_total:,}); per expert "
        f"{size.params_per_expert / 1e9:.2f}B x {size.num_experts}; active per query {size.params_active / 1e9:.1f}B",
        f"bf16 weights: {size.weight_bytes / GIB:.1f} GiB ({size.weight_bytes / 1e9:.1f} GB)",
        f"KV cache (bf16): {size.kv_bytes_per_token / 1024:.0f} KiB per token, "
        f"{size.kv_bytes_per_1k / 1e6:.1f} MB per 1k tokens",
    ]
    if size.literal_config_params is not None:
        literal = size.literal_config_params / 1e9
        lines.append(f"(read literally, the config's own MoE widths would give {literal:.2f}B)")
    lines += ["", f"Spaces GPU tiers (bf16 weights, {RUNTIME_RESERVE_GIB:g} GiB kept free per GPU for the CUDA "
                  f"context and activations; the model's own maximum context is {size.max_context:,} tokens):",
              "| tier | GPU memory | fits | KV cache room | usable context |", "|---|---|---|---|---|"]
    for name, gpus, gb in SPACES_TIERS:
        room = size.kv_room(gpus, gb)
        memory = f"{gpus} x {gb} GB" if gpus > 1 else f"{gb} GB"
        usable = f"{min(room, size.max_context) // 1000}k tokens" if room else "-"
        kv = f"{room:,} tokens" if room else "-"
        lines.append(f"| {name} | {memory} | {'yes' if room else 'no'} | {kv} | {usable} |")
    return "\n".join(lines)
