"""`python -m bench [--quick] [--json FILE] [--model SPEC]`: every measurement, one table.

Timing-sensitive comparisons run first, while the process is small and nothing else of ours is
loaded; the app process lives only for the server measurement, whose end also gives its peak RSS.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import time

import torch
import transformers

from metis.serving.engine import Engine

from . import batching, fairness, gpu, hybrid, memory, remote, routing, scaling, server, streaming
from .common import checkpoint, cpu_only_children


def machine() -> dict:
    return dict(
        platform=platform.platform(),
        processor=platform.processor() or platform.machine(),
        cpus=os.cpu_count(),
        torch_threads=torch.get_num_threads(),
        load_average_at_start=[round(x, 2) for x in os.getloadavg()],  # > cpus: other work shared the CPU
        python=platform.python_version(),
        torch=torch.__version__,
        transformers=transformers.__version__,
        cuda=torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    )


def measure(spec: str | None, quick: bool, save=lambda results: None) -> dict:
    """Every section in turn, `save(results)` after each, so a failure late in the run (the GPU
    section's out-of-memory, say) keeps what was already measured."""
    path, label = checkpoint(spec)
    trained = spec is not None or label.startswith("embedded")
    engine = Engine.load(path, device="cpu")  # on a GPU host too: these are the CPU figures
    results = {"model": label, "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
               "machine": machine(), "quick": quick, "details": {}}
    details = results["details"]
    details["streaming"] = stream = streaming.run(engine, quick)
    results["streaming_ratio"] = stream["ratio"]
    save(results)
    results["batching"] = batching.run(engine, quick)
    save(results)
    results["fairness"] = fairness.run(engine, quick)
    save(results)
    details["routing"] = route = routing.run(engine, quick)
    results |= dict(prefill_ratio=route["prefill_ratio"], decode_ratio=route["decode_ratio"],
                    forward_passes_for_routing=route["forward_passes_for_routing"])
    save(results)
    with cpu_only_children(), server.App(path, new_tokens=256 if quick else 384) as app:
        details["server"] = serve = server.run(engine, app, quick)
        app_rss = app.peak_rss_mib()
    results["server_ratio"] = serve["ratio"]
    save(results)
    for name, section in (("auto_vs_think", lambda: hybrid.run(engine, quick, trained)),
                          ("scaling", lambda: scaling.run(engine, quick)),
                          ("memory", lambda: memory.run(engine, app_rss)),
                          ("remote", lambda: remote.run(quick))):
        results[name] = section()
        save(results)
    del engine
    try:
        results["gpu"] = gpu.run(quick)
    except Exception as exc:  # out of memory, a driver error: the CPU figures above still stand
        results["gpu"] = f"failed: {type(exc).__name__}: {exc}"[:300]
    save(results)
    return results


def _check(value: float, target: float, at_least: bool) -> str:
    return "met" if (value >= target if at_least else value <= target) else "**missed**"


def _gpu_summary(g: dict | str) -> str:
    if isinstance(g, str):
        return g
    decode = "; ".join(
        f"{name} {v['tokens_per_s']:.1f} tok/s ({v['of_bandwidth_bound']:.0%} of bound)" if "error" not in v
        else f"{name} failed" for name, v in g["decode_batch1"].items()
    )
    batched = " / ".join(f"{v:.0f}" if isinstance(v, float) else "failed" for v in g["decode_batched_tokens_per_s"].values())
    return (f"{decode}; batch 1 / 8 / 32: {batched} tok/s in all; "
            f"TTFT 1080p ({g['image_tokens_1080p']} image tokens) {g['ttft_1080p_ms']:.0f} ms")


def _scaling_row(rows: list[dict], key: str) -> tuple[str, str, str, str]:
    sizes = " / ".join(str(x[key]) for x in rows)
    costs = " / ".join(f"{x['prefill_ms']:.0f} ms, +{x['peak_extra_mib']:.0f} MiB" for x in rows)
    router = max(x["gate_share"] for x in rows)
    label = f"Scaling: prefill at {sizes} {key.replace('_', ' ')}"
    return label, f"{costs}; router gates ≤ {router:.2%} of it", "", ""


def table(r: dict) -> str:
    d = r["details"]
    passes = r["forward_passes_for_routing"]
    hy = r["auto_vs_think"]
    auto, think = hy["per_query"]["auto"], hy["per_query"]["think"]
    mem = r["memory"]
    rows = [
        ("Streaming: engine.stream / model.generate tokens/s",
         f"{r['streaming_ratio']:.3f} ({d['streaming']['tokens_per_s']['engine.stream']:.0f} vs "
         f"{d['streaming']['tokens_per_s']['model.generate']:.0f} tok/s, "
         f"{d['streaming']['overhead_us_per_token']:.0f} µs/token; CPU-time ratio {d['streaming']['cpu_ratio']:.3f})",
         "≥ 0.95",
         _check(r["streaming_ratio"], 0.95, True)),
        ("Batching: tokens/s with 1 / 4 / 8 / 16 users at once (mean batch)",
         " / ".join(f"{v:.0f}" for v in r["batching"]["tokens_per_s"].values())
         + f" ({' / '.join(str(v) for v in r['batching']['mean_batch'].values())}); speedup_16 "
         f"{r['batching']['speedup_16']:.2f}, identical {str(r['batching']['identical']).lower()}",
         "≥ 3, identical", "met" if r["batching"]["speedup_16"] >= batching.TARGET and r["batching"]["identical"]
         else "**missed**"),
        ("Batching at natural lengths (load test's questions): ms per answer alone / 16 in one batch",
         f"{r['batching']['natural_16']['ms_per_answer_1']:.1f} / {r['batching']['natural_16']['ms_per_answer_16']:.1f}"
         f" (ratio {r['batching']['natural_16']['ratio']:.3f}: the floor under the load test's wall ratio)",
         "", ""),
        ("Fairness: a 256 KB conversation refused in; another user's short answer meanwhile / alone",
         f"{r['fairness']['refuse_256kb_s'] * 1e3:.0f} ms; {r['fairness']['short_answer_ratio']:.2f}×", "≤ 1 s; < 2×",
         "met" if r["fairness"]["refuse_256kb_s"] <= 1 and r["fairness"]["short_answer_ratio"] < 2 else "**missed**"),
        ("Fairness: longest gap between a batch's tokens, calm / longest prompt as chat / as routing calls",
         " / ".join(f"{v:.0f} ms" for v in r["fairness"]["max_gap_ms"].values())
         + f" (step {r['fairness']['decode_step_ms']:.1f} ms; one {r['fairness']['longest_prompt_tokens']}-token "
         f"prefill {r['fairness']['longest_prefill_ms']:.0f} ms)", "≤ one prefill", ""),
        ("Routing: prefill latency MoE auto / dense",
         f"{r['prefill_ratio']:.3f} ({d['routing']['prefill_ms']['moe_auto']:.1f} vs "
         f"{d['routing']['prefill_ms']['dense']:.1f} ms, {d['routing']['prompt_tokens']} tokens)", "≤ 1.05",
         _check(r["prefill_ratio"], 1.05, False)),
        ("Routing: decode tokens/s MoE auto / dense",
         f"{r['decode_ratio']:.3f} ({d['routing']['decode_tokens_per_s']['moe_auto']:.0f} vs "
         f"{d['routing']['decode_tokens_per_s']['dense']:.0f} tok/s)", "≥ 0.95",
         _check(r["decode_ratio"], 0.95, True)),
        ("Routing: forward passes for N tokens (dense / MoE), gate calls",
         f"{passes['dense']['forward_passes']} / {passes['moe_auto']['forward_passes']} for N={passes['new_tokens']}, "
         f"{passes['moe_auto']['gate_calls']} gate calls ({passes['moe_layers']} MoE layers, prefill only)",
         "0 extra", "met" if passes["extra_passes_for_routing"] == 0 else "**missed**"),
        ("Server: gradio_client / engine decode tokens/s",
         f"{r['server_ratio']:.3f} ({d['server']['tokens_per_s']['gradio_client']:.0f} vs "
         f"{d['server']['tokens_per_s']['engine']:.0f} tok/s; TTFT {d['server']['ttft_ms']['gradio_client']:.0f} vs "
         f"{d['server']['ttft_ms']['engine']:.0f} ms; engine CPU/request {d['server']['cpu_ratio']:.2f}× the app's)",
         "≥ 0.90", _check(r["server_ratio"], 0.90, True)),
        (f"Hybrid: auto vs think, {hy['samples']} held-out questions (tokens, s, accuracy)",
         f"{auto['tokens']:.1f} vs {think['tokens']:.1f} tok, {auto['seconds'] * 1e3:.0f} vs "
         f"{think['seconds'] * 1e3:.0f} ms, {auto['accuracy']:.1%} vs {think['accuracy']:.1%}"
         + ("" if hy["meaningful"] else " (random weights: not meaningful)"), "fewer tokens, same accuracy", ""),
        *(_scaling_row(r["scaling"][key], key) for key in ("image_tokens", "text_tokens")),
        ("Memory: MoE / dense parameters (active per token / dense)",
         f"{mem['moe_over_dense_params']:.3f} ({mem['moe']['params_total'] / 1e6:.2f}M vs "
         f"{mem['dense']['params_total'] / 1e6:.2f}M; active {mem['active_over_dense_params']:.4f})", "", ""),
        ("Memory: peak RSS of the app process", f"{mem['app_peak_rss_mib']:.0f} MiB", "", ""),
        ("GPU: full-size Metis-HOME, bf16, batch 1", _gpu_summary(r["gpu"]), "", ""),
        ("Remote backend (transformers serve) / local engine decode tokens/s",
         f"{r['remote']['ratio']:.3f} ({r['remote']['tokens_per_s']['remote']:.0f} vs "
         f"{r['remote']['tokens_per_s']['local']:.0f} tok/s, {r['remote']['overhead_us_per_token']:.0f} µs/token; "
         f"TTFT {r['remote']['ttft_ms']['remote']:.0f} vs {r['remote']['ttft_ms']['local']:.0f} ms; "
         f"pool with {remote.CONCURRENT} concurrent requests {r['remote']['concurrency_gain']:.2f}× sequential)",
         "≥ 0.80", _check(r["remote"]["ratio"], remote.TARGET, True)),
    ]
    lines = ["| measurement | result | target | |", "|---|---|---|---|"]
    lines += [f"| {a} | {b} | {c} | {e} |" for a, b, c, e in rows]
    m = r["machine"]
    head = (f"Model: {r['model']}. {r['date']}, {m['processor']}, {m['cpus']} CPUs, torch {m['torch']}, "
            f"load average at start {m['load_average_at_start'][0]}{', quick' if r['quick'] else ''}.")
    return head + "\n\n" + "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats and samples (under a minute on CPU)")
    parser.add_argument("--json", help="write all results here")
    parser.add_argument("--model", help="checkpoint folder or Hub id (default: the embedded tiny model)")
    args = parser.parse_args(argv)
    start = time.perf_counter()

    def save(results: dict) -> None:
        results["seconds"] = round(time.perf_counter() - start, 1)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(results, f, indent=2)
                f.write("\n")

    print(table(measure(args.model, args.quick, save)))


if __name__ == "__main__":
    main()
