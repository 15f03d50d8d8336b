"""Per-call routing state and the trace every call reports.

Metis-HOME routes a whole query, not each token: the decision is taken once, during the prefill
pass, from the first MoE layer's gate pooled over the prompt, and then held by every layer for
the whole answer. The state lives in a `Routing` object created per call and passed through the
forward pass, so concurrent users never share it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Literal

import torch

Mode = Literal["auto", "think", "direct", "token"]
MODES: tuple[str, ...] = ("auto", "think", "direct", "token")
QUERY_MODES: tuple[str, ...] = ("auto", "think", "direct")  # one expert per query; `token` routes each token


@dataclass(frozen=True)
class RoutingTrace:
    """What the router saw and chose for one query; plain floats, safe to serialise."""

    p_think: float
    decision: str  # "think", "direct" or "token" (per-token routing has no single decision)
    per_layer: list[float]
    mode: str
    threshold: float
    token_think_share: float | None = None  # `token` mode: share of routed tokens sent to thinking
    # why it routed (metis/explain.py): each prompt token's exact share of logit(p_think), in order
    contributions: list[dict] | None = None  # {"token": str, "kind": "text"|"image", "score": float}
    image_grids: list[list[list[float]]] | None = None  # per image, scores on its merged-patch grid
    question: tuple[int, int] | None = None  # [start, end) of the last user message's text tokens

    def to_dict(self) -> dict:
        return asdict(self)


# A router's weights: every MoE layer's gate by parameter name (`...mlp.gate.weight`), what router
# fine-tuning makes and a session carries; opaque to the UI, checked by the engine it is used with.
RouterWeights = dict[str, torch.Tensor]


def expert_index(label: str, thinking_expert: int) -> int:
    """The expert that answers a `think` or `direct` question (the other one of two)."""
    return thinking_expert if label == "think" else 1 - thinking_expert


def expert_label(index: int, thinking_expert: int) -> str:
    return "think" if index == thinking_expert else "direct"


@dataclass
class RoutingRecord:
    """What the prefill wrote, filled by the MoE blocks. `decided` turns on once the prefill
    forward is over: from then on every step reuses the decision and no gate runs."""

    decided: bool = False
    expert: torch.Tensor | None = None  # [batch] chosen expert per sample
    expert_ids: list[int] = field(default_factory=list)  # same, as host ints for the hot path
    layer_logits: list[torch.Tensor] = field(default_factory=list)  # per MoE layer, [batch, experts]
    token_logits: torch.Tensor | None = None  # deciding layer's gate per token, [batch, seq, experts]
    token_think_shares: list[torch.Tensor] = field(default_factory=list)  # token mode: per layer, [batch]


@dataclass(frozen=True, eq=False)
class Routing:
    """How one call routes (fixed before the forward pass), and its `record` (what the prefill
    found and chose).

    mode: `auto` uses the router against `threshold`; `think`/`direct` force an expert; `token` is
    Qwen2-MoE's per-token top-k. `labels` (one expert index per sample) forces experts per sample,
    which is how training sends each sample through the expert of its label. `prompt_mask` marks the
    prompt tokens the router pools over; by default every token of the prefill. `rows` gives each
    row of a served batch its own (mode, threshold), and `gates` its own router weights, so users
    who chose differently share a batch.
    """

    mode: Mode = "auto"
    threshold: float = 0.5
    thinking_expert: int = 0
    temperature: float = 1.0  # calibration of the deciding gate (config.router_temperature)
    labels: torch.Tensor | None = None
    prompt_mask: torch.Tensor | None = None
    rows: tuple[tuple[str, float], ...] | None = None  # per-row (mode, threshold) of a query-mode batch
    # per row, a session's router: one [experts, hidden] gate weight per MoE layer, or None for the
    # model's own gates; so users with different routers share a batch and no gate is swapped
    gates: list[tuple[torch.Tensor, ...] | None] | None = None
    record: RoutingRecord = field(default_factory=RoutingRecord)

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"unknown routing mode {self.mode!r}; expected one of {', '.join(MODES)}")
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"routing threshold must be within [0, 1], got {self.threshold}")
        if self.gates is not None and all(g is None for g in self.gates):  # no row has its own router
            object.__setattr__(self, "gates", None)

    @property
    def query_logits(self) -> torch.Tensor:
        """Pooled router logits of the deciding (first MoE) layer: what the router loss trains."""
        return self.record.layer_logits[0]

    def decide(self, pooled_logits: torch.Tensor) -> torch.Tensor:
        """Pick one expert per sample from the first MoE layer's pooled logits."""
        device = pooled_logits.device
        if self.labels is not None:
            return self.labels.to(device, torch.long)
        p_think = (pooled_logits.float() / self.temperature).softmax(-1).select(-1, self.thinking_expert)
        rows = self.rows or ((self.mode, self.threshold),) * len(p_think)
        chosen = [expert_index("think" if mode == "think" or (mode == "auto" and p >= threshold) else "direct",
                               self.thinking_expert) for (mode, threshold), p in zip(rows, p_think.tolist())]
        return torch.tensor(chosen, dtype=torch.long, device=device)

    def p_think(self, sample: int = 0) -> list[float]:
        """Thinking probability of each MoE layer for one sample."""
        return [float((logits[sample].detach().float() / self.temperature).softmax(-1)[self.thinking_expert])
                for logits in self.record.layer_logits]

    def token_scores(self, sample: int = 0) -> torch.Tensor:
        """Each pooled token's share of the deciding margin, (think - direct) / (N * temperature):
        the scores sum to logit(p_think) of the deciding layer, so the attribution is exact."""
        logits = self.record.token_logits[sample].detach().float()
        if self.prompt_mask is not None:
            logits = logits[self.prompt_mask[sample].to(logits.device)]
        think, direct = expert_index("think", self.thinking_expert), expert_index("direct", self.thinking_expert)
        margin = logits[:, think] - logits[:, direct]
        return margin.cpu() / (margin.numel() * self.temperature)

    def trace(self, sample: int = 0) -> RoutingTrace:
        if not self.record.layer_logits:
            raise RuntimeError("no routing happened: the model has no MoE layer or was not called")
        per_layer = self.p_think(sample)
        if self.mode == "token":
            shares = [float(layer[sample]) for layer in self.record.token_think_shares]
            share = sum(shares) / max(len(shares), 1)
            return RoutingTrace(per_layer[0], "token", per_layer, self.mode, self.threshold, share)
        mode, threshold = self.rows[sample] if self.rows is not None else (self.mode, self.threshold)
        decision = expert_label(int(self.record.expert[sample]), self.thinking_expert)
        return RoutingTrace(per_layer[0], decision, per_layer, mode, threshold)
