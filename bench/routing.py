"""Routing overhead: the MoE in `auto` versus the dense model it was upcycled from.

Query routing should cost one tiny gate matmul per layer during the prefill and nothing while
decoding. Timings compare prefill latency and decode tokens/s; hooks count forward passes and
gate calls, to show the decision rides inside the one prefill pass instead of adding one.
"""

from __future__ import annotations

import torch

from metis.serving.engine import Engine

from .common import Clock, Row, decode_settings, interleave, ratio, sample_messages, timed, upcycled_pair, verdict

PREFILL_TARGET, DECODE_TARGET = 1.05, 0.95


def _counter(modules) -> tuple[list[int], list]:
    """([calls], hook handles): counts forward calls of `modules` until the handles are removed."""
    calls = [0]

    def hook(*_):
        calls[0] += 1

    return calls, [m.register_forward_hook(hook) for m in modules]


def run(engine: Engine, quick: bool) -> dict:
    dense, moe = upcycled_pair(engine)
    inputs = {k: v.to(moe.device) for k, v in engine.prompts.build(sample_messages()).items()}
    new_tokens = 64 if quick else 128
    settings = decode_settings(engine, new_tokens)

    def routing(model) -> dict:
        """The MoE gets a fresh per-call routing state, as the engine gives it; the dense model none."""
        return {"routing": model.new_routing("auto")} if model is moe else {}

    @torch.inference_mode()
    def prefill(model):
        return timed(lambda: model(**inputs, **routing(model), use_cache=True, logits_to_keep=1))

    @torch.inference_mode()
    def decode(model):
        clock = Clock()
        model.generate(**inputs, **routing(model), streamer=clock, **settings)
        return clock.decode_rate()

    prefill_s = interleave({"dense": lambda: prefill(dense), "moe_auto": lambda: prefill(moe)}, 21 if quick else 61)
    decode_rate = interleave({"dense": lambda: decode(dense), "moe_auto": lambda: decode(moe)}, 9 if quick else 15)

    passes = {}
    for name, model in (("dense", dense), ("moe_auto", moe)):
        forwards, handles = _counter([model])
        gates, gate_handles = _counter([b.gate for b in model.moe_blocks()] if model is moe else [])
        with torch.inference_mode():
            model.generate(**inputs, **routing(model), **settings)
        for h in handles + gate_handles:
            h.remove()
        passes[name] = {"forward_passes": forwards[0], "gate_calls": gates[0]}
    passes["new_tokens"] = new_tokens
    passes["moe_layers"] = len(moe.moe_blocks())
    passes["extra_passes_for_routing"] = passes["moe_auto"]["forward_passes"] - passes["dense"]["forward_passes"]

    return dict(
        prompt_tokens=int(inputs["input_ids"].shape[1]),
        prefill_ms={k: round(v * 1e3, 2) for k, v in prefill_s.items()},
        prefill_ratio=ratio(prefill_s["moe_auto"], prefill_s["dense"]),
        decode_tokens_per_s={k: round(v, 1) for k, v in decode_rate.items()},
        decode_ratio=ratio(decode_rate["moe_auto"], decode_rate["dense"]),
        forward_passes_for_routing=passes,
        targets={"prefill_ratio": PREFILL_TARGET, "decode_ratio": DECODE_TARGET},
    )


def rows(r: dict) -> list[Row]:
    passes = r["forward_passes_for_routing"]
    prefill, decode = r["prefill_ms"], r["decode_tokens_per_s"]
    return [
        ("Routing: prefill latency MoE auto / dense",
         f"{r['prefill_ratio']:.3f} ({prefill['moe_auto']:.1f} vs {prefill['dense']:.1f} ms, "
         f"{r['prompt_tokens']} tokens)", "≤ 1.05", verdict(r["prefill_ratio"] <= 1.05)),
        ("Routing: decode tokens/s MoE auto / dense",
         f"{r['decode_ratio']:.3f} ({decode['moe_auto']:.0f} vs {decode['dense']:.0f} tok/s)", "≥ 0.95",
         verdict(r["decode_ratio"] >= 0.95)),
        ("Routing: forward passes for N tokens (dense / MoE), gate calls",
         f"{passes['dense']['forward_passes']} / {passes['moe_auto']['forward_passes']} for N={passes['new_tokens']}, "
         f"{passes['moe_auto']['gate_calls']} gate calls ({passes['moe_layers']} MoE layers, prefill only)",
         "0 extra", verdict(passes["extra_passes_for_routing"] == 0)),
    ]
