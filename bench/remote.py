"""Remote backend vs local engine on the same tiny experts, and a pool under 8 concurrent requests.

The embedded model is exported (`metis.export`), each expert is served by `transformers serve`
(deploy/transformers_serve.py, one torch thread like the local engine) on 127.0.0.1, and the
same question is answered alternately by `RemoteEngine.stream` and `Engine.stream`. Both are
forced to exactly `new_tokens` tokens (the export's generation config and the local model's get
`min_new_tokens`), so they do the same work. Time to first token counts from the call to the first
streamed text; tokens/s after it. The overhead per token is the difference of the per-token times.

`python -m bench.remote [--quick]` runs this alone and prints JSON.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import threading
import time
from pathlib import Path

from transformers import GenerationConfig

from deploy.transformers_serve import stock_servers
from metis.export import export_experts
from metis.serving.engine import Engine, GenerationSettings
from metis.serving.remote import RemoteEngine
from metis.streaming import Done, Failed, Routed

from .common import Row, fixed_length, interleave, ratio, sample_messages, verdict

TARGET = 0.8
CONCURRENT = 8


def _timed_stream(engine, messages, settings: GenerationSettings) -> tuple[float, float, int]:
    """(time to first text, decode tokens/s, tokens) of one streamed answer."""
    start = time.perf_counter()
    first = None
    for event in engine.stream(messages, settings):
        if first is None and not isinstance(event, Routed):
            first = time.perf_counter()
        if isinstance(event, Failed):
            raise RuntimeError(event.message)
        if isinstance(event, Done):
            tokens = event.stats.tokens
            return first - start, (tokens - 1) / (time.perf_counter() - first), tokens
    raise RuntimeError("the stream ended without Done")


def _fix_length(folder: Path, new_tokens: int) -> None:
    config = GenerationConfig.from_pretrained(folder)
    config.min_new_tokens = new_tokens
    config.save_pretrained(folder)


def _concurrent(remote: RemoteEngine, messages, settings: GenerationSettings, n: int) -> float:
    """Tokens/s of the pool with `n` requests in flight at once (all sent to the thinking pool)."""
    tokens = [0] * n
    barrier = threading.Barrier(n)

    def one(i: int) -> None:
        barrier.wait()
        tokens[i] = remote.run(messages, settings).stats.tokens

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(tokens) / (time.perf_counter() - start)


def _sequential(remote: RemoteEngine, messages, settings: GenerationSettings, n: int) -> float:
    start = time.perf_counter()
    tokens = sum(remote.run(messages, settings).stats.tokens for _ in range(n))
    return tokens / (time.perf_counter() - start)


def run(quick: bool, new_tokens: int | None = None) -> dict:
    new_tokens = new_tokens or (128 if quick else 256)
    messages = sample_messages()
    settings = GenerationSettings(mode="think", max_new_tokens=new_tokens)
    with tempfile.TemporaryDirectory(prefix="bench-remote-") as folder:
        out = Path(folder)
        export_experts("tiny", out)
        for expert in ("think", "direct"):
            _fix_length(out / expert, new_tokens)
        local = Engine.load("tiny", device="cpu")  # the CPU figure, on a GPU host too
        with stock_servers(out / "think", out / "direct") as (think, direct), fixed_length(local.model, new_tokens):
            remote = RemoteEngine.load(str(out / "router"), think.url, direct.url)
            medians = interleave({"remote": lambda: _timed_stream(remote, messages, settings),
                                  "local": lambda: _timed_stream(local, messages, settings)},
                                 repeats=5 if quick else 11)
            requests = CONCURRENT if quick else 2 * CONCURRENT
            sequential = _sequential(remote, messages, settings, requests)
            concurrent = _concurrent(remote, messages, settings, requests)
    ttft, rate, tokens = ({name: m[i] for name, m in medians.items()} for i in range(3))
    return dict(
        new_tokens=new_tokens,
        tokens={k: int(v) for k, v in tokens.items()},
        ttft_ms={k: round(v * 1e3, 1) for k, v in ttft.items()},
        tokens_per_s={k: round(v, 1) for k, v in rate.items()},
        ratio=ratio(rate["remote"], rate["local"]),
        overhead_us_per_token=round((1 / rate["remote"] - 1 / rate["local"]) * 1e6, 1),
        pool_tokens_per_s={"sequential": round(sequential, 1), f"{CONCURRENT}_concurrent": round(concurrent, 1)},
        concurrency_gain=ratio(concurrent, sequential),
        server="transformers serve (sequential generate: its continuous batching is for text-only models)",
        target=TARGET,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--new-tokens", type=int, default=None)
    args = parser.parse_args()
    print(json.dumps(run(args.quick, args.new_tokens), indent=2))


if __name__ == "__main__":
    main()


def rows(r: dict) -> list[Row]:
    tps, ttft = r["tokens_per_s"], r["ttft_ms"]
    return [("Remote backend (transformers serve) / local engine decode tokens/s",
             f"{r['ratio']:.3f} ({tps['remote']:.0f} vs {tps['local']:.0f} tok/s, {r['overhead_us_per_token']:.0f} "
             f"µs/token; TTFT {ttft['remote']:.0f} vs {ttft['local']:.0f} ms; pool with {CONCURRENT} concurrent "
             f"requests {r['concurrency_gain']:.2f}× sequential)",
             "≥ 0.80", verdict(r["ratio"] >= TARGET))]
