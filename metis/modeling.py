"""Metis-HOME: Qwen2.5-VL with a two-expert MoE block in place of each decoder MLP.

Data flow of one forward pass: embeddings (text + vision tower) -> decoder layers, each
`attention -> MoE block` -> LM head. The MoE block holds a router gate (hidden -> experts) and
the expert MLPs under Qwen2-MoE parameter names (`mlp.gate`, `mlp.experts.N.{gate,up,down}_proj`,
optional `mlp.shared_expert*`). How the block routes is decided by the per-call `Routing`
(see routing.py): once per query in `auto`/`think`/`direct`, per token in `token` mode.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModel, AutoModelForImageTextToText
from transformers.activations import ACT2FN
from transformers.conversion_mapping import register_checkpoint_conversion_mapping
from transformers.core_model_loading import WeightRenaming
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import (
    Qwen2_5_VisionTransformerPretrainedModel,
    Qwen2_5_VLAttention,
    Qwen2_5_VLDecoderLayer,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLModel,
    Qwen2_5_VLPreTrainedModel,
    Qwen2_5_VLRMSNorm,
    Qwen2_5_VLRotaryEmbedding,
    Qwen2_5_VLTextModel,
    Qwen2MLP,
)

from .configuration import MetisHomeConfig, MetisHomeTextConfig
from .routing import Routing

GATE_SUFFIX = "mlp.gate.weight"  # a router gate's parameter name ends so; routers are saved by it


def is_gate(name: str) -> bool:
    return name.endswith(GATE_SUFFIX)


class ExpertMLP(nn.Module):
    """SwiGLU MLP of an explicit width (experts may differ from the dense `intermediate_size`)."""

    def __init__(self, hidden_size: int, intermediate_size: int, hidden_act: str):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)
        self.act_fn = ACT2FN[hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


def masked_mean(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean over the sequence axis of [batch, seq, dim], counting only positions where mask is set.
    The mask is moved to `x`'s device: with layers spread over GPUs (accelerate's device map) the
    hooks move hidden states, never the per-call routing that carries the mask."""
    if mask is None:
        return x.mean(dim=1)
    mask = mask.to(device=x.device, dtype=x.dtype).unsqueeze(-1)
    return (x * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)


class MetisHomeMoeBlock(nn.Module):
    """Router gate + expert MLPs (+ optional shared expert) of one decoder layer."""

    def __init__(self, config: MetisHomeTextConfig, moe_index: int):
        super().__init__()
        self.moe_index = moe_index  # position among MoE layers; index 0 takes the query decision
        self.top_k = config.num_experts_per_tok
        self.norm_topk_prob = config.norm_topk_prob
        self.gate = nn.Linear(config.hidden_size, config.num_experts, bias=False)
        self.experts = nn.ModuleList(
            ExpertMLP(config.hidden_size, config.moe_intermediate_size, config.hidden_act)
            for _ in range(config.num_experts)
        )
        self.shared_expert = None
        if config.shared_expert_intermediate_size > 0:
            self.shared_expert = ExpertMLP(
                config.hidden_size, config.shared_expert_intermediate_size, config.hidden_act
            )
            self.shared_expert_gate = nn.Linear(config.hidden_size, 1, bias=False)

    def forward(self, x: torch.Tensor, routing: Routing | None = None) -> torch.Tensor:
        if routing is None or routing.mode == "token":
            out = self._route_tokens(x, routing)
        else:
            out = self._route_query(x, routing)
        if self.shared_expert is not None:
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return out

    def _gate(self, x: torch.Tensor, routing: Routing | None) -> torch.Tensor:
        """Router logits: the model's gate, or for a row with its own router (`Routing.gates`) that
        row's weights for this layer, moved to the layer's device."""
        logits = self.gate(x)
        for row, gates in enumerate(routing.gates if routing is not None and routing.gates else ()):
            if gates is not None:
                weight = gates[self.moe_index].to(x.device, x.dtype)
                logits.select(0, row).copy_(F.linear(x.select(0, row), weight))
        return logits

    def _route_query(self, x: torch.Tensor, routing: Routing) -> torch.Tensor:
        record = routing.record
        if not record.decided:  # prefill only: decode steps never touch the gate
            gate_logits = self._gate(x, routing)
            pooled = masked_mean(gate_logits, routing.prompt_mask)
            record.layer_logits.append(pooled)
            if self.moe_index == 0:
                record.token_logits = gate_logits.detach()
                record.expert = routing.decide(pooled)
                record.expert_ids = record.expert.tolist()  # one host sync per query, not per step
        ids = record.expert_ids
        if all(e == ids[0] for e in ids):
            return self.experts[ids[0]](x)
        out = torch.empty_like(x)
        for e, expert in enumerate(self.experts):
            if rows := [i for i, chosen in enumerate(ids) if chosen == e]:
                index = torch.tensor(rows, device=x.device)
                out.index_copy_(0, index, expert(x.index_select(0, index)))
        return out

    def _route_tokens(self, x: torch.Tensor, routing: Routing | None) -> torch.Tensor:
        """Qwen2-MoE semantics: every token picks its top-k experts in every layer."""
        logits = self._gate(x, routing)
        weights, chosen = logits.float().softmax(-1).topk(self.top_k, dim=-1)
        if self.norm_topk_prob:
            weights = weights / weights.sum(-1, keepdim=True)
        decode = x.shape[1] == 1
        out = (self._dispatch_dense if decode else self._dispatch_sorted)(x, weights, chosen)
        if routing is not None and not routing.record.decided:
            record = routing.record
            record.layer_logits.append(masked_mean(logits, routing.prompt_mask))
            if self.moe_index == 0:
                record.token_logits = logits.detach()
            # per row, over its own prompt tokens: a batch's padding and other rows stay out of it
            thinks = (chosen.narrow(-1, 0, 1) == routing.thinking_expert).float()
            record.token_think_shares.append(masked_mean(thinks, routing.prompt_mask).squeeze(-1))
        return out

    def _dispatch_sorted(self, x, weights, chosen):
        """Prefill: (token, slot) pairs sorted by expert, each expert run on its own tokens. One
        host read of the group sizes per layer (branching on `sel.any()` and boolean indexing took
        two per expert). Groups keep ascending token order and experts add in index order, so the
        sums are those of per-expert masks, bit for bit."""
        flat = x.reshape(-1, x.shape[-1])
        picks = chosen.flatten()
        order = picks.argsort(stable=True)
        sizes = (picks.unsqueeze(1) == torch.arange(len(self.experts), device=x.device)).sum(0).tolist()
        tokens = order // self.top_k
        scale = weights.flatten()[order].unsqueeze(-1).to(x.dtype)
        out = torch.zeros_like(flat)
        for expert, rows, w in zip(self.experts, tokens.split(sizes), scale.split(sizes)):
            if len(rows):
                out.index_add_(0, rows, w * expert(flat[rows]))
        return out.view_as(x)

    def _dispatch_dense(self, x, weights, chosen):
        """Decode steps (one token per row): every expert runs on every row, weighted by the row's
        gate weight for it (0 where not chosen), so no host read stalls the step (28 per token on
        the real model otherwise). Rows of a batch that chose differently read both experts'
        weights either way; the cost is one unused expert's reads at batch 1."""
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            weight = (weights * (chosen == e)).sum(-1, keepdim=True).to(x.dtype)
            out = out + weight * expert(x)
        return out


class DenseMLP(Qwen2MLP):
    """A decoder MLP that is not an MoE block (`mlp_only_layers`); it takes the routing like one."""

    def forward(self, x: torch.Tensor, routing: Routing | None = None) -> torch.Tensor:
        return super().forward(x)


class MetisHomeDecoderLayer(Qwen2_5_VLDecoderLayer):
    """Qwen2.5-VL decoder layer whose MLP may be an MoE block that needs the call's `Routing`."""

    def __init__(self, config: MetisHomeTextConfig, layer_idx: int, moe_index: int | None):
        # Not the parent's __init__, which would build a dense MLP: its other attributes are set
        # here by hand, a copy of transformers 5.24's; tests/test_model.py compares them with it.
        nn.Module.__init__(self)
        self.hidden_size = config.hidden_size
        self.self_attn = Qwen2_5_VLAttention(config, layer_idx)
        self.mlp = DenseMLP(config) if moe_index is None else MetisHomeMoeBlock(config, moe_index)
        self.input_layernorm = Qwen2_5_VLRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = Qwen2_5_VLRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache=None,
        use_cache: bool | None = False,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        routing: Routing | None = None,
        **kwargs,
    ) -> torch.Tensor:
        residual = hidden_states
        hidden_states, _ = self.self_attn(
            hidden_states=self.input_layernorm(hidden_states),
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=use_cache,
            position_embeddings=position_embeddings,
            **kwargs,
        )
        hidden_states = residual + hidden_states
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states), routing)


class MetisHomePreTrainedModel(Qwen2_5_VLPreTrainedModel):
    config: MetisHomeConfig
    config_class = MetisHomeConfig
    _no_split_modules = ["MetisHomeDecoderLayer", "Qwen2_5_VLVisionBlock"]


class MetisHomeTextModel(Qwen2_5_VLTextModel):
    config: MetisHomeTextConfig
    config_class = MetisHomeTextConfig
    _no_split_modules = ["MetisHomeDecoderLayer"]
    _can_record_outputs = {"hidden_states": MetisHomeDecoderLayer, "attentions": Qwen2_5_VLAttention}

    def __init__(self, config: MetisHomeTextConfig):
        # Not the parent's __init__, which would build dense layers: a copy of its attributes
        # (transformers 5.24), compared with the parent's by tests/test_model.py
        Qwen2_5_VLPreTrainedModel.__init__(self, config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        moe_layers = [i for i in range(config.num_hidden_layers) if config.is_moe_layer(i)]
        self.layers = nn.ModuleList(
            MetisHomeDecoderLayer(config, i, moe_layers.index(i) if i in moe_layers else None)
            for i in range(config.num_hidden_layers)
        )
        self._attn_implementation = config._attn_implementation
        self.norm = Qwen2_5_VLRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.has_sliding_layers = "sliding_attention" in config.layer_types
        self.rotary_emb = Qwen2_5_VLRotaryEmbedding(config=config)
        self.gradient_checkpointing = False
        self.post_init()

    def forward(self, *args, routing: Routing | None = None, **kwargs):
        outputs = super().forward(*args, routing=routing, **kwargs)
        if routing is not None:
            routing.record.decided = True  # the prefill has routed; later steps keep its decision
        return outputs


class MetisHomeModel(Qwen2_5_VLModel):
    config: MetisHomeConfig
    config_class = MetisHomeConfig

    def __init__(self, config: MetisHomeConfig):
        # Not the parent's __init__ (it would build the dense text model first): a copy of its
        # attributes (transformers 5.24), compared with the parent's by tests/test_model.py
        Qwen2_5_VLPreTrainedModel.__init__(self, config)
        self.visual = Qwen2_5_VisionTransformerPretrainedModel._from_config(config.vision_config)
        self.language_model = MetisHomeTextModel._from_config(config.text_config)
        self.rope_deltas = None
        self.post_init()


class MetisHomeForConditionalGeneration(Qwen2_5_VLForConditionalGeneration):
    """Generation model. Pass `routing=Routing(...)` to `forward`/`generate`; without it the
    blocks fall back to per-token routing (`token` mode), the only stateless choice."""

    config: MetisHomeConfig
    config_class = MetisHomeConfig
    _no_split_modules = ["MetisHomeDecoderLayer", "Qwen2_5_VLVisionBlock"]

    def __init__(self, config: MetisHomeConfig):
        # Not the parent's __init__ (it would build the dense text model first): a copy of its
        # attributes (transformers 5.24), compared with the parent's by tests/test_model.py
        Qwen2_5_VLPreTrainedModel.__init__(self, config)
        self.model = MetisHomeModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()

    def prepare_inputs_for_generation(self, *args, routing: Routing | None = None, **kwargs):
        # Named here so `generate(routing=...)` accepts it and hands it to every step's forward.
        inputs = super().prepare_inputs_for_generation(*args, **kwargs)
        inputs["routing"] = routing
        return inputs

    def new_routing(self, mode: str = "auto", threshold: float | None = None, **kwargs) -> Routing:
        """A fresh per-call routing state wired to this model's expert roles."""
        threshold = self.config.routing_threshold if threshold is None else threshold
        return Routing(mode=mode, threshold=threshold, thinking_expert=self.config.thinking_expert,
                       temperature=self.config.router_temperature, **kwargs)

    def moe_blocks(self) -> list[MetisHomeMoeBlock]:
        return [m for m in self.modules() if isinstance(m, MetisHomeMoeBlock)]

    def router_state_dict(self) -> dict[str, torch.Tensor]:
        """Only the router gates: what router fine-tuning changes and saves."""
        return {k: v for k, v in self.state_dict().items() if is_gate(k)}


# Checkpoints saved by transformers 4.x (the published one) keep the text model at `model.` and the
# vision tower at `visual.`; map them onto the 5.x layout, as transformers does for Qwen2.5-VL.
LEGACY_RENAMES = [
    (r"^visual", "model.visual"),
    (r"^model(?!\.(language_model|visual))", "model.language_model"),
]
register_checkpoint_conversion_mapping(
    MetisHomeForConditionalGeneration.__name__,
    [WeightRenaming(source_patterns=src, target_patterns=dst) for src, dst in LEGACY_RENAMES],
)
AutoModel.register(MetisHomeConfig, MetisHomeModel)
AutoModelForImageTextToText.register(MetisHomeConfig, MetisHomeForConditionalGeneration)
