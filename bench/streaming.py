"""Streaming overhead: `engine.stream` versus a bare `model.generate` doing the same work.

Both build the prompt, prefill and decode exactly `new_tokens` greedy tokens on the same model;
the engine adds its worker thread, token queue, stopping criterion, incremental detokenizer and
output parser. The ratio of their tokens/s is the price of streaming typed events; the same
ratio in process CPU time (both threads) shows how much of it is our work rather than waiting
for cores that other processes hold.
"""

from __future__ import annotations

import torch

from metis.serving.engine import Engine, GenerationSettings
from metis.streaming import Done

from .common import Row, decode_settings, fixed_length, interleave, ratio, sample_messages, timed_cpu, verdict

TARGET = 0.95


def run(engine: Engine, quick: bool) -> dict:
    new_tokens = 64 if quick else 256
    messages = sample_messages()
    settings = GenerationSettings(max_new_tokens=new_tokens)
    model = engine.model
    stats = []

    def streamed():
        for event in engine.stream(messages, settings):
            if isinstance(event, Done):
                stats.append(event.stats)

    def plain():
        inputs = {k: v.to(model.device) for k, v in engine.prompts.build(messages).items()}
        with torch.inference_mode():
            model.generate(**inputs, routing=model.new_routing("auto"), **decode_settings(engine, new_tokens))

    with fixed_length(model, new_tokens):
        medians = interleave({"engine.stream": lambda: timed_cpu(streamed), "model.generate": lambda: timed_cpu(plain)},
                             repeats=7 if quick else 21)
    assert all(s.tokens == new_tokens for s in stats), "the engine did not produce the fixed length"
    wall = {name: m[0] for name, m in medians.items()}
    cpu = {name: m[1] for name, m in medians.items()}
    return dict(
        new_tokens=new_tokens,
        tokens_per_s={k: round(new_tokens / v, 1) for k, v in wall.items()},
        ratio=ratio(wall["model.generate"], wall["engine.stream"]),
        cpu_ratio=ratio(cpu["model.generate"], cpu["engine.stream"]),
        overhead_us_per_token=round((wall["engine.stream"] - wall["model.generate"]) / new_tokens * 1e6, 1),
        cpu_overhead_us_per_token=round((cpu["engine.stream"] - cpu["model.generate"]) / new_tokens * 1e6, 1),
        target=TARGET,
    )


def rows(s: dict) -> list[Row]:
    tps = s["tokens_per_s"]
    return [("Streaming: engine.stream / model.generate tokens/s",
             f"{s['ratio']:.3f} ({tps['engine.stream']:.0f} vs {tps['model.generate']:.0f} tok/s, "
             f"{s['overhead_us_per_token']:.0f} µs/token; CPU-time ratio {s['cpu_ratio']:.3f})",
             "≥ 0.95", verdict(s["ratio"] >= TARGET))]
