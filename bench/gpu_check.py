"""The prepared device check: what only a GPU shows, in one run (`python -m bench.gpu_check --json OUT`,
or `bash deploy/gpu_check.sh` with the wheels carried in), under 8 minutes on one H100.

1. The full-size model (the published config with full-width experts, random bf16 weights, the
   real Qwen2.5 vocabulary) behind the engine: route, then stream in all four modes.
2. Batches of 1, 8 and 32 answers: tokens/s, and batch-1 decode as a share of the HBM bound.
3. Peak GPU memory of the 8-row batch against the KV-cache admission estimate.
4. A real CUDA out-of-memory error in one step of a 4-row batch: every answer equals its solo one,
   and the memory comes back.
5. A prefill with the model split across cuda:0 and the CPU (accelerate's hooks, one GPU).
6. A newcomer joining 8 running answers: its first token against alone (bench/join.py).

Each part records its error instead of stopping the run. `--device cpu` rehearses the script on
the small rehearsal config (the CPU stands in for both devices), which is how it was checked here.
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from pathlib import Path

import torch
from PIL import Image
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from metis.configuration import MetisHomeConfig
from metis.loading import LoadedModel, describe
from metis.modeling import MetisHomeForConditionalGeneration
from metis.prompting import Message
from metis.qwen_vocab import build_qwen_tokenizer
from metis.rehearsal import PREPROCESSOR, rehearsal_config
from metis.serving.engine import Engine, GenerationSettings
from metis.serving.interface import collect
from metis.serving.scheduler import BatchLimits
from metis.sizing import kv_bytes_per_token

from .common import start_in_one_batch
from .gpu import copy_bandwidth, decode_bytes, full_config

GIB = 2**30
QUESTION = "How many more circles than squares are there? Explain step by step."


def _engine(config: MetisHomeConfig, device: str, device_map: dict | None = None) -> Engine:
    """The engine over a random-weight model of `config`; with `device_map`, built on the CPU and
    spread by accelerate's hooks (a real cross-device map on one GPU)."""
    dtype = torch.bfloat16 if device == "cuda" and not device_map else torch.float32
    with torch.device("cpu" if device_map else device):
        model = MetisHomeForConditionalGeneration._from_config(config, dtype=dtype, attn_implementation="sdpa")
    if device_map:
        from accelerate import dispatch_model

        model = dispatch_model(model, device_map)
    model.eval()
    fields = {k: v for k, v in PREPROCESSOR.items() if not k.endswith(("_class", "_type"))}
    image_processor = Qwen2VLImageProcessorPil(**fields)
    loaded = LoadedModel(model, build_qwen_tokenizer(), image_processor, info=describe(model, "gpu check", "sdpa"))
    return Engine(loaded, batch=BatchLimits(max_batch=32))


def _messages(i: int = 0) -> list[Message]:
    image = Image.new("RGB", (448 + 28 * (i % 4), 448), (40 * (i % 6), 120, 200))
    return [Message("user", f"{QUESTION} ({i})", [image])]


def _together(engine: Engine, rows: int, settings: GenerationSettings) -> tuple[list, float]:
    results = [None] * rows

    def ask(i):
        results[i] = collect(engine.stream(_messages(i), settings))

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(rows)]
    start = time.perf_counter()
    start_in_one_batch(engine, threads, rows)
    for t in threads:
        t.join()
    return results, time.perf_counter() - start


def modes(engine: Engine, new_tokens: int) -> dict:
    out = {"route_p_think": engine.route(_messages()).p_think}
    for mode in ("auto", "think", "direct", "token"):
        answer = collect(engine.stream(_messages(), GenerationSettings(mode=mode, max_new_tokens=new_tokens)))
        stats = answer.stats
        out[mode] = {"error": answer.error, "decision": answer.trace.decision, "tokens": stats.tokens,
                     "ttft_s": round(stats.ttft_s, 3),
                     "decode_tokens_per_s": round((stats.tokens - 1) / max(stats.total_s - stats.ttft_s, 1e-9), 1)}
    return out


def sweep(engine: Engine, new_tokens: int, cuda: bool) -> dict:
    settings = GenerationSettings(mode="direct", max_new_tokens=new_tokens)
    out = {}
    for rows in (1, 8, 32):
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated() if cuda else 0
        results, seconds = _together(engine, rows, settings)
        tokens = sum(r.stats.tokens for r in results)
        errors = sum(r.error is not None for r in results)
        out[str(rows)] = {"tokens_per_s": round(tokens / seconds, 1), "errors": errors}
        if rows == 8:  # the admission estimate: rows x (longest prompt + longest answer) x KV bytes
            prompt = max(engine.prompts.build(_messages(i))["input_ids"].shape[1] for i in range(rows))
            model = engine.model
            per_token = kv_bytes_per_token(model.config.get_text_config(), model.dtype.itemsize)
            estimate = rows * (prompt + new_tokens) * per_token
            peak = (torch.cuda.max_memory_allocated() - before) if cuda else None
            out["admission"] = {"kv_estimate_gib": round(estimate / GIB, 3),
                                "peak_above_weights_gib": None if peak is None else round(peak / GIB, 3)}
    if cuda:  # batch 1 reads every active weight once per token: bandwidth bounds it
        bound = copy_bandwidth() / decode_bytes(engine.model)
        out["hbm_bound_tokens_per_s"] = round(bound, 1)
        out["batch1_of_hbm_bound"] = round(out["1"]["tokens_per_s"] / bound, 3)
    return out


def out_of_memory(engine: Engine, new_tokens: int, cuda: bool) -> dict:
    settings = GenerationSettings(mode="auto", max_new_tokens=new_tokens)
    solo = [collect(engine.stream(_messages(i), settings)) for i in range(4)]
    calls = {"n": 0}

    def allocate_too_much(module, args):
        if args[0].shape[0] == 4:
            calls["n"] += 1
            if calls["n"] == 4:  # the prefill, two decode steps, then a real allocation failure
                if cuda:
                    torch.empty(1 << 50, dtype=torch.uint8, device=args[0].device)
                raise torch.OutOfMemoryError("injected (CPU rehearsal)")

    before = torch.cuda.memory_allocated() if cuda else 0
    hook = engine.model.model.language_model.layers[0].register_forward_pre_hook(allocate_too_much)
    try:
        batched, _ = _together(engine, 4, settings)
    finally:
        hook.remove()
    return {"raised": calls["n"] >= 4,
            "identical": all((a.reasoning, a.answer) == (b.reasoning, b.answer) for a, b in zip(solo, batched)),
            "errors": [b.error for b in batched if b.error],
            "allocated_after_minus_before_gib": round((torch.cuda.memory_allocated() - before) / GIB, 3) if cuda else 0}


def join_case(engine: Engine, new_tokens: int) -> dict:
    """bench/join.py's measurement on this engine: 8 answers run, a short question arrives."""
    from .common import fixed_length
    from .join import newcomer_wait

    with fixed_length(engine.model, new_tokens):
        alone = newcomer_wait(engine, 0, new_tokens, after=0)["ttft_s"]
        joined = newcomer_wait(engine, 8, new_tokens, after=8)
    return {"ttft_alone_ms": round(alone * 1e3, 1), "ttft_joined_ms": round(joined["ttft_s"] * 1e3, 1),
            "ttft_ratio": round(joined["ttft_s"] / alone, 2),
            "batch_tokens_per_s_before": round(joined["before_tokens_per_s"], 1)}


def split_prefill(device: str) -> dict:
    config = MetisHomeConfig.from_dict(rehearsal_config())
    layers = config.text_config.num_hidden_layers
    gpu = 0 if device == "cuda" else "cpu"
    device_map = {"model.visual": gpu, "model.language_model.embed_tokens": gpu,
                  **{f"model.language_model.layers.{i}": gpu if i < layers // 2 else "cpu" for i in range(layers)},
                  "model.language_model.norm": "cpu", "model.language_model.rotary_emb": gpu, "lm_head": "cpu"}
    engine = _engine(config, device, device_map)
    trace = engine.route(_messages())
    answer = collect(engine.stream(_messages(), GenerationSettings(mode="think", max_new_tokens=8)))
    return {"p_think": trace.p_think, "tokens": answer.stats.tokens, "error": answer.error,
            "devices": sorted({str(p.device) for p in engine.model.parameters()})}


def _part(results: dict, name: str, fn) -> None:
    start = time.perf_counter()
    try:
        results[name] = fn()
    except Exception as exc:  # a part's failure is a result too
        results[name] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
    results[name + "_s"] = round(time.perf_counter() - start, 1)
    print(name, json.dumps(results[name]), flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--new-tokens", type=int, default=64)
    args = parser.parse_args(argv)
    cuda = args.device == "cuda"
    results = {"device": torch.cuda.get_device_name() if cuda else "cpu (rehearsal of the script)",
               "torch": torch.__version__}
    config = full_config() if cuda else MetisHomeConfig.from_dict(rehearsal_config())
    _part(results, "split_prefill", lambda: split_prefill(args.device))
    engine = _engine(config, args.device)
    results["params"] = sum(p.numel() for p in engine.model.parameters())
    _part(results, "modes", lambda: modes(engine, args.new_tokens))
    _part(results, "sweep", lambda: sweep(engine, args.new_tokens, cuda))
    _part(results, "out_of_memory", lambda: out_of_memory(engine, args.new_tokens, cuda))
    _part(results, "join", lambda: join_case(engine, args.new_tokens))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
