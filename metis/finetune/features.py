"""Router features: each MoE layer's input, mean-pooled over the prompt, computed once per example.

Only the gates learn and a gate is linear, so `mean(gate(x)) == gate(mean(x))`: the pooled input of
every MoE layer is all the router ever needs, and epochs then cost a few matrix products instead
of a forward pass each. The prefill sends each example through the expert of its label, so later
layers see the hidden states they will see once the router routes it correctly.
"""

from __future__ import annotations

import contextlib
import hashlib
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .data import Example, dataset_hash

_MEMORY: dict[str, "Features"] = {}  # newest last; 7B-model features are ~200 MB per 500 examples
MEMORY_ENTRIES = 4


class Cancelled(Exception):
    """The person cancelled the run before it produced a result."""


@dataclass
class Features:
    inputs: torch.Tensor  # [examples, MoE layers, hidden], float32
    targets: torch.Tensor  # [examples] expert index of each label
    seconds: float  # time spent extracting (0 when served from a cache)
    cached: bool = False
    # the model's gate weights (name -> tensor, on CPU) when these were extracted, where training
    # starts: read beside the weights, since on ZeroGPU only the GPU process may touch them
    router: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    @classmethod
    def concat(cls, parts: list["Features"]) -> "Features":
        """The features of consecutive shards (one per process under `accelerate launch`), in order."""
        return cls(torch.cat([p.inputs for p in parts]), torch.cat([p.targets for p in parts]),
                   max(p.seconds for p in parts), all(p.cached for p in parts), parts[0].router)


def model_fingerprint(engine) -> str:
    """Cheap hash of everything a feature depends on: config, prompt settings and non-gate weights
    (their float64 sums: one pass over the weights, no copy of them)."""
    model = engine.model
    digest = hashlib.sha256(model.config.to_json_string().encode())
    digest.update(repr((engine.prompts.system_prompt, engine.prompts.config)).encode())
    for name, p in model.named_parameters():
        if not name.endswith("mlp.gate.weight"):
            digest.update(f"{name}{tuple(p.shape)}{torch.sum(p.detach(), dtype=torch.float64).item():.10e}".encode())
    return digest.hexdigest()[:16]


def feature_steps(engine, examples: list[Example], cache_dir: str | Path | None = None) -> Iterator[int | Features]:
    """One forced-expert prefill per example through the engine (so it takes its turn with chat
    users), with hooks recording this thread's MoE-block inputs. Yields the number of examples done
    (0 first), then the `Features`. A generator so it can run where the weights are (ZeroGPU's GPU
    process, through `Runner.features`) and stop between examples when closed. Cached in memory,
    and on disk under `cache_dir` when given, keyed by model fingerprint + data hash."""
    key = f"{model_fingerprint(engine)}-{dataset_hash(examples)}"
    router = {k: v.cpu() for k, v in engine.model.router_state_dict().items()}
    file = Path(cache_dir) / f"features-{key}.safetensors" if cache_dir else None
    if key not in _MEMORY and file and file.exists():
        saved = load_file(str(file))
        _remember(key, Features(saved["inputs"], saved["targets"], 0.0))
    if key in _MEMORY:
        yield replace(_MEMORY[key], cached=True, router=router)
        return

    start = time.perf_counter()
    owner = threading.get_ident()
    home = engine.model.device  # layers may sit on several GPUs: their inputs meet here
    pooled: list[torch.Tensor] = []

    def record(module, args):
        if threading.get_ident() == owner:  # other users' generation threads run the same modules
            pooled.append(args[0].detach().float().mean(dim=1).to(home))  # batch of one: every token is prompt

    blocks = engine.model.moe_blocks()
    rows = [torch.empty(0, len(blocks), engine.model.config.text_config.hidden_size)]
    hooks = [block.register_forward_pre_hook(record) for block in blocks]
    try:
        yield 0
        for i, example in enumerate(examples):
            pooled.clear()
            engine.route(example.messages(), mode=example.label)
            rows.append(torch.cat(pooled).cpu().unsqueeze(0))
            yield i + 1
    finally:
        for hook in hooks:
            hook.remove()
    inputs = torch.cat(rows)
    think = engine.model.config.thinking_expert
    targets = torch.tensor([think if ex.label == "think" else 1 - think for ex in examples], dtype=torch.long)
    if file:
        file.parent.mkdir(parents=True, exist_ok=True)
        save_file({"inputs": inputs, "targets": targets}, str(file))
    _remember(key, Features(inputs, targets, 0.0))
    yield replace(_MEMORY[key], seconds=time.perf_counter() - start, router=router)


def extract_features(engine, examples: list[Example], cache_dir: str | Path | None = None,
                     progress: Callable[[int, int], None] | None = None,
                     cancel: threading.Event | None = None) -> Features:
    """`feature_steps` in this process, run to the end (see `collect_features`)."""
    return collect_features(feature_steps(engine, examples, cache_dir), len(examples), progress, cancel)


def collect_features(steps: Iterator[int | Features], total: int,
                     progress: Callable[[int, int], None] | None = None,
                     cancel: threading.Event | None = None) -> Features:
    """The features at the end of `steps` (`feature_steps`, or `Runner.features` running it on the
    GPU): `progress(done, total)` after each example, `Cancelled` when `cancel` is set before the
    last one; closing `steps` then stops the extraction."""
    with contextlib.closing(steps):
        for step in steps:
            if isinstance(step, Features):
                return step
            if progress and step:
                progress(step, total)
            if cancel is not None and cancel.is_set() and step < total:
                raise Cancelled("cancelled during feature extraction")
    raise RuntimeError("feature extraction ended without features")


def _remember(key: str, features: Features) -> None:
    _MEMORY.pop(key, None)
    _MEMORY[key] = features
    while len(_MEMORY) > MEMORY_ENTRIES:
        _MEMORY.pop(next(iter(_MEMORY)))
