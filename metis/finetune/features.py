"""Router features: each MoE layer's input, mean-pooled over the prompt, computed once per example.

Only the gates learn and a gate is linear, so `mean(gate(x)) == gate(mean(x))`: the pooled input of
every MoE layer is all the router ever needs, and epochs then cost a few matrix products instead
of a forward pass each. The prefill sends each example through the expert of its label, so later
layers see the hidden states they will see once the router routes it correctly.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Protocol

import torch
from safetensors.torch import load_file, save_file

from ..routing import RouterWeights, expert_index
from .data import Example, dataset_hash

_MEMORY: dict[str, Features] = {}  # newest last; 7B-model features are ~200 MB per 500 examples
MEMORY_ENTRIES = 4


class Cancelled(Exception):
    """The person cancelled the run before it produced a result."""


@dataclass
class Features:
    inputs: torch.Tensor  # [examples, MoE layers, hidden], float32
    targets: torch.Tensor  # [examples] expert index of each label
    seconds: float  # time spent extracting (0 when served from a cache)
    cached: bool = False
    # the model's routing when these were extracted, where training starts: its gate weights
    # (name -> tensor, on CPU), thinking expert and threshold. Read beside the features, since on
    # ZeroGPU only the GPU process may touch the model
    router: RouterWeights = field(default_factory=dict, repr=False)
    thinking_expert: int = 0
    threshold: float = 0.5

    @classmethod
    def concat(cls, parts: list[Features]) -> Features:
        """The features of consecutive shards (one per process under `accelerate launch`), in order."""
        first = parts[0]
        return cls(torch.cat([p.inputs for p in parts]), torch.cat([p.targets for p in parts]),
                   max(p.seconds for p in parts), all(p.cached for p in parts), first.router,
                   first.thinking_expert, first.threshold)


class FeatureSource(Protocol):
    """What extraction reads of a loaded model (`serving/tuning.py`'s `RouterProbe`)."""

    thinking_expert: int
    threshold: float
    shape: tuple[int, int]  # one example's features: (MoE layers, hidden)

    def fingerprint(self) -> str: ...  # changes whenever a feature would

    def gates(self) -> dict[str, torch.Tensor]: ...

    def pooled(self, examples: list[Example]) -> Iterator[torch.Tensor]: ...  # [layers, hidden] each


def feature_steps(source: FeatureSource, examples: list[Example],
                  cache_dir: str | Path | None = None) -> Iterator[int | Features]:
    """One forced-expert prefill per example (`source.pooled`). Yields the number of examples
    done (0 first), then the `Features`. A generator so it can run where the weights are (ZeroGPU's
    GPU process, through `Runner.features`) and stop between examples when closed. Cached in
    memory, and on disk under `cache_dir` when given, keyed by model fingerprint + data hash."""
    key = f"{source.fingerprint()}-{dataset_hash(examples)}"
    routing = dict(router=source.gates(), thinking_expert=source.thinking_expert, threshold=source.threshold)
    file = Path(cache_dir) / f"features-{key}.safetensors" if cache_dir else None
    if key not in _MEMORY and file and file.exists():
        saved = load_file(str(file))
        _remember(key, Features(saved["inputs"], saved["targets"], 0.0))
    if key in _MEMORY:
        yield replace(_MEMORY[key], cached=True, **routing)
        return

    start = time.perf_counter()
    rows = [torch.empty(0, *source.shape)]
    yield 0
    with contextlib.closing(source.pooled(examples)) as pooled:
        for i, row in enumerate(pooled):
            rows.append(row.unsqueeze(0))
            yield i + 1
    inputs = torch.cat(rows)
    think = source.thinking_expert
    targets = torch.tensor([expert_index(ex.label, think) for ex in examples], dtype=torch.long)
    if file:
        file.parent.mkdir(parents=True, exist_ok=True)
        save_file({"inputs": inputs, "targets": targets}, str(file))
    _remember(key, Features(inputs, targets, 0.0))
    yield replace(_MEMORY[key], seconds=time.perf_counter() - start, **routing)


def extract_features(backend, examples: list[Example], cache_dir: str | Path | None = None,
                     progress: Callable[[int, int], None] | None = None,
                     cancel: threading.Event | None = None) -> Features:
    """`backend.features` (serving/interface.py) in this process, run to the end (see `collect_features`)."""
    return collect_features(backend.features(examples, cache_dir), len(examples), progress, cancel)


def collect_features(steps: Iterator[int | Features], total: int,
                     progress: Callable[[int, int], None] | None = None,
                     cancel: threading.Event | None = None) -> Features:
    """The features at the end of `steps` (`Backend.features`, or `Runner.features` running it on the
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
