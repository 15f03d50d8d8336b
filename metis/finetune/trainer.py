"""Train the router gates on cached features; the experts and everything else stay frozen.

The trainer works on a copy of the gate weights, so the served model keeps its router while a run
goes on, and the result is a router state dict that `Engine.stream(router=...)` accepts. It is an
iterator of per-epoch metrics so a CLI or UI can draw live curves and stop it (`cancel` event)
between batches. Built on `accelerate.Accelerator`, so `accelerate launch` runs it unchanged.
"""

from __future__ import annotations

import json
import math
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ..loading import zero_gpu
from ..routing import RouterWeights
from . import metrics
from .export import ROUTER_FILE, save_router
from .features import Features


@dataclass(frozen=True)
class TrainSettings:
    """Hyper-parameters; out-of-range values are refused (the UI's sliders use the same LIMITS)."""

    epochs: int = 40
    lr: float = 1e-2
    batch_size: int = 32
    val_fraction: float = 0.2
    seed: int = 0
    patience: int = 8  # epochs without a better validation loss before stopping; 0 disables
    target_ratio: float | None = None  # also report the threshold giving this thinking ratio

    LIMITS = {"epochs": (1, 500), "lr": (1e-5, 1.0), "batch_size": (1, 4096), "val_fraction": (0.05, 0.5),
              "patience": (0, 500)}

    def __post_init__(self):
        problems = [f"{name} must be within [{lo}, {hi}], got {getattr(self, name)}"
                    for name, (lo, hi) in self.LIMITS.items() if not lo <= getattr(self, name) <= hi]
        if self.target_ratio is not None and not 0.0 <= self.target_ratio <= 1.0:
            problems.append(f"target_ratio must be within [0, 1], got {self.target_ratio}")
        if problems:
            raise ValueError("; ".join(problems))


@dataclass(frozen=True)
class EpochMetrics:
    epoch: int
    train_loss: float
    train_accuracy: float
    val_loss: float
    val_accuracy: float
    val_auc: float
    seconds: float


@dataclass(frozen=True)
class BestEpoch:
    """The epoch with the lowest validation loss so far: what `result()` returns and what early
    stopping counts from (epoch 0: the gates as they were)."""

    val_loss: float
    weights: torch.Tensor = field(repr=False)  # GateStack.weight, [layers, experts, hidden]
    epoch: int


@dataclass(frozen=True)
class TrainSummary:
    """A run's outcome on the validation split, before (the gates as they were) and after (the best
    epoch), and its timing; metrics.json holds these fields under these names."""

    examples: dict[str, int]  # {"train": n, "val": n}
    threshold: float
    best_epoch: int
    cancelled: bool
    val_loss_before: float
    val_accuracy_before: float
    val_auc_before: float  # NaN for a one-class validation split (null in metrics.json)
    val_loss_after: float
    val_accuracy_after: float
    val_auc_after: float
    confusion_before: dict[str, int]  # metrics.confusion at `threshold`
    confusion_after: dict[str, int]
    threshold_sweep: list[dict]  # metrics.threshold_sweep of the best epoch
    target_ratio: float | None
    target_threshold: float | None  # the threshold giving `target_ratio` thinking, when asked
    feature_seconds: float
    features_cached: bool
    train_seconds: float


@dataclass(frozen=True)
class TrainResult:
    router: RouterWeights = field(repr=False)  # opaque to UIs: hand it to the engine
    settings: TrainSettings
    history: list[EpochMetrics]
    summary: TrainSummary

    def metrics(self) -> dict:
        """Everything metrics.json holds: settings, per-epoch metrics and the summary."""
        return {"settings": asdict(self.settings), "epochs": [asdict(m) for m in self.history],
                **asdict(self.summary)}

    def save(self, out: str | Path) -> Path:
        """`router.safetensors` + `metrics.json` in `out`; returns the router file."""
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.json").write_text(json.dumps(_finite(self.metrics()), indent=2, allow_nan=False))
        return save_router(self.router, out / ROUTER_FILE, self.metrics())


def _finite(value):
    """NaN (e.g. AUC of a one-class validation set) as null: metrics.json stays standard JSON."""
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return None if isinstance(value, float) and math.isnan(value) else value


class GateStack(nn.Module):
    """All MoE layers' gates as one [layers, experts, hidden] parameter, applied to pooled inputs."""

    def __init__(self, weights: list[torch.Tensor]):
        super().__init__()
        self.weight = nn.Parameter(torch.stack([w.detach().float().cpu() for w in weights]))

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:  # [batch, layers, hidden] -> logits
        return torch.einsum("blh,leh->ble", pooled, self.weight)


def split(n: int, val_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded (train, validation) index split; both sides get at least one example."""
    if n < 2:
        raise ValueError(f"need at least 2 examples to train and validate, got {n}")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_val = min(max(1, round(n * val_fraction)), n - 1)
    return order[n_val:], order[:n_val]


class RouterTrainer:
    def __init__(self, features: Features, settings: TrainSettings | None = None,
                 cancel: threading.Event | None = None, accelerator: Accelerator | None = None):
        self.settings = settings or TrainSettings()
        self.cancel = cancel or threading.Event()
        self.features = features
        # the routing as extracted with the features (gates in layer order, thinking expert,
        # threshold); the model itself is not read here (on ZeroGPU it lives in the GPU process)
        self.threshold = features.threshold
        self.think = features.thinking_expert
        self.names = list(features.router)
        self.dtype = next(iter(features.router.values())).dtype
        # On ZeroGPU, `spaces` reports CUDA in this request thread but forbids initialising it
        # outside a GPU function; the gates are a few thousand numbers, so they train on CPU there.
        self.accelerator = accelerator or Accelerator(cpu=zero_gpu())
        self.gates = GateStack(list(features.router.values()))
        train_idx, val_idx = split(len(features.targets), self.settings.val_fraction, self.settings.seed)
        device = self.accelerator.device
        self.val = (features.inputs[val_idx].to(device), features.targets[val_idx].to(device))
        loader = DataLoader(TensorDataset(features.inputs[train_idx], features.targets[train_idx]),
                            batch_size=self.settings.batch_size, shuffle=True,
                            generator=torch.Generator().manual_seed(self.settings.seed))
        optimizer = torch.optim.AdamW(self.gates.parameters(), lr=self.settings.lr)
        self.model, self.optimizer, self.loader = self.accelerator.prepare(self.gates, optimizer, loader)
        self.sizes = {"train": len(train_idx), "val": len(val_idx)}
        self.history: list[EpochMetrics] = []
        self.before = self._evaluate()
        self.best = BestEpoch(self.before["loss"], self.gates.weight.detach().clone(), 0)
        self.seconds = 0.0
        self.cancelled = False

    def _loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """CE of every MoE layer's gate against the label, averaged over layers: layer 0 decides,
        the others are reported per layer and should agree."""
        layers = logits.shape[1]
        return F.cross_entropy(logits.flatten(0, 1), targets.repeat_interleave(layers))

    def _p_think(self, logits: torch.Tensor) -> torch.Tensor:
        return logits[:, 0].softmax(-1)[:, self.think]

    @torch.no_grad()
    def _evaluate(self) -> dict:
        inputs, targets = self.val
        logits = self.gates(inputs)
        p = self._p_think(logits).cpu().numpy()
        y = (targets == self.think).cpu().numpy()
        return {"loss": float(self._loss(logits, targets)), "accuracy": metrics.accuracy(p, y, self.threshold),
                "auc": metrics.roc_auc(p, y), "p": p, "y": y}

    def __iter__(self):
        """Runs the epochs, yielding each one's metrics; stops early, or when `cancel` is set."""
        settings = self.settings
        for epoch in range(1, settings.epochs + 1):
            start = time.perf_counter()
            total = correct = count = 0.0
            self.model.train()
            for inputs, targets in self.loader:
                if self.cancel.is_set():
                    self.cancelled = True
                    self.seconds += time.perf_counter() - start
                    return
                logits = self.model(inputs)
                loss = self._loss(logits, targets)
                self.optimizer.zero_grad()
                self.accelerator.backward(loss)
                self.optimizer.step()
                total += float(loss.detach()) * len(targets)
                correct += float(((self._p_think(logits) >= self.threshold) == (targets == self.think)).sum())
                count += len(targets)
            val = self._evaluate()
            self.seconds += time.perf_counter() - start
            if val["loss"] < self.best.val_loss:
                self.best = BestEpoch(val["loss"], self.gates.weight.detach().clone(), epoch)
            m = EpochMetrics(epoch, total / count, correct / count, val["loss"], val["accuracy"], val["auc"],
                             time.perf_counter() - start)
            self.history.append(m)
            yield m
            if settings.patience and epoch - self.best.epoch >= settings.patience:
                return

    def result(self) -> TrainResult:
        """The best epoch's router (lowest validation loss) and its metrics."""
        with torch.no_grad():
            self.gates.weight.copy_(self.best.weights)
        after = self._evaluate()
        router = {name: w.to(self.dtype).cpu().contiguous() for name, w in zip(self.names, self.best.weights)}
        target = self.settings.target_ratio
        summary = TrainSummary(
            examples=self.sizes,
            threshold=self.threshold,
            best_epoch=self.best.epoch,
            cancelled=self.cancelled,
            val_loss_before=self.before["loss"],
            val_accuracy_before=self.before["accuracy"],
            val_auc_before=self.before["auc"],
            val_loss_after=after["loss"],
            val_accuracy_after=after["accuracy"],
            val_auc_after=after["auc"],
            confusion_before=metrics.confusion(self.before["p"], self.before["y"], self.threshold),
            confusion_after=metrics.confusion(after["p"], after["y"], self.threshold),
            threshold_sweep=metrics.threshold_sweep(after["p"], after["y"]),
            target_ratio=target,
            target_threshold=None if target is None else metrics.threshold_for_ratio(after["p"], target),
            feature_seconds=self.features.seconds,
            features_cached=self.features.cached,
            train_seconds=self.seconds,
        )
        return TrainResult(router, self.settings, list(self.history), summary)


def train_router(features: Features, settings: TrainSettings | None = None,
                 cancel: threading.Event | None = None, on_epoch=None) -> TrainResult:
    """Callback form of RouterTrainer: `on_epoch(EpochMetrics)` after each epoch."""
    trainer = RouterTrainer(features, settings, cancel)
    for epoch in trainer:
        if on_epoch:
            on_epoch(epoch)
    return trainer.result()
