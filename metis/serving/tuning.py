"""The model side of router fine-tuning, behind `Engine.features`, `check_router` and `save_model`.

Fine-tuning (finetune/*) and the UI see a backend only through `serving/interface.py`; what must
touch the model itself (its MoE blocks' inputs, its weights, its tokenizer) lives here, beside the
engine that owns them.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterator
from pathlib import Path

import torch

from ..finetune.data import Example
from ..finetune.export import check_router
from ..modeling import is_gate


class RouterProbe:
    """One engine's model as router features read it (`finetune.features.FeatureSource`): the
    pooled input of every MoE block during a forced-expert prefill of each example."""

    def __init__(self, engine):
        self.engine = engine
        model = engine.model
        self.thinking_expert = model.config.thinking_expert
        self.threshold = model.config.routing_threshold
        self.shape = (len(model.moe_blocks()), model.config.text_config.hidden_size)  # per example

    def fingerprint(self) -> str:
        """Cheap hash of everything a feature depends on: config, prompt settings and non-gate
        weights (their float64 sums: one pass over the weights, no copy of them)."""
        model, prompts = self.engine.model, self.engine.prompts
        digest = hashlib.sha256(model.config.to_json_string().encode())
        digest.update(repr((prompts.system_prompt, prompts.config)).encode())
        for name, p in model.named_parameters():
            if not is_gate(name):
                total = torch.sum(p.detach(), dtype=torch.float64).item()
                digest.update(f"{name}{tuple(p.shape)}{total:.10e}".encode())
        return digest.hexdigest()[:16]

    def gates(self) -> dict[str, torch.Tensor]:
        """The model's gate weights, on CPU: where training starts (sessions' routers travel with
        their requests and never replace them)."""
        return {k: v.cpu().clone() for k, v in self.engine.model.router_state_dict().items()}

    def pooled(self, examples: list[Example]) -> Iterator[torch.Tensor]:
        """Per example, [MoE layers, hidden] float32 on CPU. The prefill goes through
        `engine.route`, so it takes its turn with chat users; the hooks keep only this thread's
        calls, because other users' batches run the same modules meanwhile."""
        model = self.engine.model
        owner = threading.get_ident()
        home = model.device  # layers may sit on several GPUs: their inputs meet here
        pooled: list[torch.Tensor] = []

        def record(module, args):
            if threading.get_ident() == owner:
                pooled.append(args[0].detach().float().mean(dim=1).to(home))  # batch of one: every token is prompt

        hooks = [block.register_forward_pre_hook(record) for block in model.moe_blocks()]
        try:
            for example in examples:
                pooled.clear()
                self.engine.route(example.messages(), mode=example.label)
                yield torch.cat(pooled).cpu()
        finally:
            for hook in hooks:
                hook.remove()


def save_checkpoint(engine, router: dict[str, torch.Tensor], out: str | Path) -> Path:
    """A full checkpoint (weights, tokenizer, image processor) with `router` baked in; the
    engine's own model keeps its router (others may be chatting with it)."""
    out = Path(out)
    check_router(engine.model, router)
    engine.model.save_pretrained(out, state_dict={**engine.model.state_dict(), **router})
    engine.tokenizer.save_pretrained(out)
    engine.prompts.image_processor.save_pretrained(out)
    return out
