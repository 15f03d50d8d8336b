"""GPU: the full-size Metis-HOME (random bf16 weights) at batch 1, and batched (1, 8, 32 rows).

The architecture is the published config (`assets/reference/metis-home-config.json`, the
`config.json` of `mmthinking/Metis-HOME`) with the expert width the checkpoint really has
(18944, a copy of Qwen2.5-VL-7B's MLP) and no shared expert. Batch-1 decoding is memory-bound,
so tokens/s is compared with the bound set by reading every weight one token touches once per
step at the measured copy bandwidth. Variants that fail (flash-attn missing, compile errors)
are recorded with their error instead of stopping the run.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from PIL import Image
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from metis.configuration import MetisHomeConfig
from metis.loading import flash_attention_available
from metis.modeling import MetisHomeForConditionalGeneration

from .common import Clock, Row

REFERENCE = Path(__file__).resolve().parent.parent / "assets" / "reference" / "metis-home-config.json"
QWEN25_VL_MAX_PIXELS = 12845056  # Qwen2.5-VL-7B's preprocessor bound: a 1080p frame keeps its resolution


def full_config() -> MetisHomeConfig:
    config = MetisHomeConfig.from_json_file(REFERENCE)
    config.text_config.moe_intermediate_size = 18944
    config.text_config.shared_expert_intermediate_size = 0
    return config


def _sync_timed(fn) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - start


def copy_bandwidth(gib: int = 4) -> float:
    """Bytes/s of a device-to-device copy (read + write), the practical HBM roof."""
    src = torch.empty(gib << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    dst.copy_(src)
    seconds = min(_sync_timed(lambda: dst.copy_(src)) for _ in range(5))
    return 2 * src.numel() / seconds


def decode_bytes(model) -> int:
    """Weight bytes one decode step reads: the decoder with one expert per layer, the LM head
    and one embedding row (the vision tower is idle while decoding); the KV cache is small at
    these lengths and left out, so the bound is slightly optimistic."""
    text = model.model.language_model
    total = sum(p.numel() * p.element_size() for n, p in text.named_parameters()
                if ".experts." not in n and "embed_tokens" not in n)
    total += sum(p.numel() * p.element_size() for b in model.moe_blocks() for p in b.experts[0].parameters())
    return total + model.lm_head.weight.numel() * model.lm_head.weight.element_size()


def _image_inputs(config, processor, size=(1920, 1080)) -> dict:
    vision = processor(images=[Image.new("RGB", size, "gray")], return_tensors="pt",
                       min_pixels=56 * 56, max_pixels=QWEN25_VL_MAX_PIXELS)
    n = int(vision["image_grid_thw"].prod() // processor.merge_size**2)
    image = [config.vision_start_token_id] + [config.image_token_id] * n + [config.vision_end_token_id]
    ids = image + list(range(100, 132))  # a short question of arbitrary text tokens
    input_ids = torch.tensor([ids])
    return dict(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                mm_token_type_ids=(input_ids == config.image_token_id).int(), **vision)


def measure(config: MetisHomeConfig, new_tokens: int = 128) -> dict:
    bandwidth = copy_bandwidth()  # before the model, so its buffers neither crowd it nor count in the peak
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    with torch.device("cuda"):
        model = MetisHomeForConditionalGeneration._from_config(config, dtype=torch.bfloat16,
                                                               attn_implementation="sdpa").eval()
    # use_cache explicitly: the published config says `use_cache: false` (a training leftover)
    settings = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, use_cache=True,
                    eos_token_id=config.text_config.eos_token_id, pad_token_id=0)
    bound = bandwidth / decode_bytes(model)
    decode = _decode_batch1(model, settings, bound)
    batched = _decode_batched(model, settings)
    inputs = {k: v.to("cuda") for k, v in _image_inputs(config, Qwen2VLImageProcessorPil()).items()}
    ttft = _ttft(model, inputs)
    return dict(
        device=torch.cuda.get_device_name(),
        params=sum(p.numel() for p in model.parameters()),
        decode_weight_gib=round(decode_bytes(model) / 2**30, 2),
        copy_bandwidth_gb_s=round(bandwidth / 1e9),
        bandwidth_bound_tokens_per_s=round(bound, 1),
        decode_batch1=decode,
        decode_batched_tokens_per_s=batched,
        ttft_1080p_ms=round(ttft * 1e3, 1),
        image_tokens_1080p=int((inputs["input_ids"] == config.image_token_id).sum()),
        peak_gpu_gib=round(torch.cuda.max_memory_allocated() / 2**30, 1),
    )


def _decode_batch1(model, settings: dict, bound: float) -> dict:
    """Batch-1 decode tokens/s per attention variant, and its share of the bandwidth bound."""
    prompt = torch.randint(1000, 100_000, (1, 128), device="cuda")

    @torch.inference_mode()
    def decode_rate(**extra) -> float:
        rates = []
        for _ in range(3):  # the first run also pays any compilation
            clock = Clock()
            model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt),
                           routing=model.new_routing("auto"), streamer=clock, **settings, **extra)
            rates.append(clock.decode_rate())
        return round(max(rates[1:]), 1)

    variants = {"sdpa": ("sdpa", {}),
                "sdpa+static_cache": ("sdpa", dict(cache_implementation="static", disable_compile=True)),
                "sdpa+static_cache+torch.compile": ("sdpa", dict(cache_implementation="static"))}
    if flash_attention_available():
        variants["flash_attention_2"] = ("flash_attention_2", {})
    decode = {}
    for name, (attn, extra) in variants.items():
        try:
            model.set_attn_implementation(attn)
            rate = decode_rate(**extra)
            decode[name] = {"tokens_per_s": rate, "of_bandwidth_bound": round(rate / bound, 3)}
        except Exception as exc:  # a variant's failure is a result too
            decode[name] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
    model.set_attn_implementation("sdpa")
    return decode


def _decode_batched(model, settings: dict) -> dict:
    """Aggregate decode tokens/s of 1, 8 and 32 answers decoded together, alternately on each
    expert (a served batch mixes them), as the engine batches users."""

    @torch.inference_mode()
    def batch_rate(rows: int) -> float:
        ids = torch.randint(1000, 100_000, (rows, 128), device="cuda")
        modes = tuple(("think" if i % 2 == 0 else "direct", 0.5) for i in range(rows))
        prompt_mask = torch.ones_like(ids, dtype=torch.bool)
        rates = []
        for _ in range(2):
            clock = Clock()
            model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), streamer=clock, **settings,
                           routing=model.new_routing("auto", prompt_mask=prompt_mask, rows=modes))
            rates.append(rows * clock.decode_rate())
        return round(rates[-1], 1)

    batched = {}
    for rows in (1, 8, 32):
        try:
            batched[str(rows)] = batch_rate(rows)
        except Exception as exc:  # out of memory at 32 rows on a small card is a result too
            batched[str(rows)] = f"{type(exc).__name__}: {exc}"[:200]
    return batched


def _ttft(model, inputs: dict) -> float:
    """Median of three times to the first token of a 1080p image question, after a warm-up."""

    @torch.inference_mode()
    def first_token():
        model.generate(**inputs, routing=model.new_routing("auto"), max_new_tokens=1, do_sample=False,
                       use_cache=True, pad_token_id=0)

    first_token()
    return sorted(_sync_timed(first_token) for _ in range(3))[1]


def run(quick: bool) -> dict | str:
    if not torch.cuda.is_available():
        return "skipped: no GPU"
    return measure(full_config(), new_tokens=64 if quick else 256)


def rows(g: dict | str) -> list[Row]:
    return [("GPU: full-size Metis-HOME, bf16, batch 1", _summary(g), "", "")]


def _summary(g: dict | str) -> str:
    if isinstance(g, str):  # skipped, or failed
        return g
    decode = "; ".join(
        f"{name} {v['tokens_per_s']:.1f} tok/s ({v['of_bandwidth_bound']:.0%} of bound)" if "error" not in v
        else f"{name} failed" for name, v in g["decode_batch1"].items()
    )
    batched = " / ".join(f"{v:.0f}" if isinstance(v, float) else "failed"
                         for v in g["decode_batched_tokens_per_s"].values())
    return (f"{decode}; batch 1 / 8 / 32: {batched} tok/s in all; "
            f"TTFT 1080p ({g['image_tokens_1080p']} image tokens) {g['ttft_1080p_ms']:.0f} ms")
