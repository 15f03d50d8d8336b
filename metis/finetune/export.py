"""Router files: only the gate weights (a few KB to MB), never the experts.

A router file is a safetensors file of `...mlp.gate.weight` tensors under the model's own names,
so it can be used per session (`Engine.stream(router=load_router(path))`), applied to a model for
good (`apply_router`), or baked into a full checkpoint (`Backend.save_model`).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..modeling import GATE_SUFFIX, is_gate
from ..routing import RouterWeights

ROUTER_FILE = "router.safetensors"


def save_router(router: RouterWeights, path: str | Path, info: dict | None = None) -> Path:
    """Write the gates; `info` (e.g. the run's metrics) goes into the file's metadata as JSON."""
    path = Path(path)
    metadata = {"format": "metis-router", "info": json.dumps(info or {}, default=str)}
    save_file({k: v.contiguous() for k, v in router.items()}, str(path), metadata=metadata)
    return path


def load_router(path: str | Path) -> dict[str, torch.Tensor]:
    """The gate tensors of a router file (a folder is read as its `router.safetensors`)."""
    path = Path(path)
    router = load_file(str(path / ROUTER_FILE if path.is_dir() else path))
    if not router or not all(is_gate(k) for k in router):
        raise ValueError(f"{path} is not a router file: it must hold only '...{GATE_SUFFIX}' tensors")
    return router


def check_router(model, router: RouterWeights) -> None:
    """Refuse a router made for another model layout (names or shapes differ)."""
    own = model.router_state_dict()
    wrong = sorted(set(router) ^ set(own)) + sorted(
        k for k in set(router) & set(own) if router[k].shape != own[k].shape)
    if wrong:
        raise ValueError("router does not fit this model: " + ", ".join(wrong[:10]))


def apply_router(model, router: RouterWeights) -> None:
    """Load the gates into `model` for good."""
    check_router(model, router)
    model.load_state_dict(router, strict=False)
