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

from . import batching, fairness, gpu, hybrid, join, memory, remote, routing, scaling, server, streaming
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
    results["join"] = join.run(engine, quick)
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
    results["auto_vs_think"] = hybrid.run(engine, quick, trained)
    save(results)
    results["scaling"] = scaling.run(engine, quick)
    save(results)
    results["memory"] = memory.run(engine, app_rss)
    save(results)
    results["remote"] = remote.run(quick)
    save(results)
    del engine
    try:
        results["gpu"] = gpu.run(quick)
    except Exception as exc:  # out of memory, a driver error: the CPU figures above still stand
        results["gpu"] = f"failed: {type(exc).__name__}: {exc}"[:300]
    save(results)
    return results


def table(r: dict) -> str:
    """One row per measurement, each section rendering its own (`rows` in its module)."""
    d = r["details"]
    rows = [*streaming.rows(d["streaming"]), *batching.rows(r["batching"]), *join.rows(r["join"]),
            *fairness.rows(r["fairness"]),
            *routing.rows(d["routing"]), *server.rows(d["server"]), *hybrid.rows(r["auto_vs_think"]),
            *scaling.rows(r["scaling"]), *memory.rows(r["memory"]), *gpu.rows(r["gpu"]), *remote.rows(r["remote"])]
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
