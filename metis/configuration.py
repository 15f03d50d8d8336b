"""Configuration of Metis-HOME: Qwen2.5-VL whose decoder MLPs are two-expert MoE blocks.

The published `mmthinking/Metis-HOME` config.json is flat (transformers 4.49 style) and uses the
Qwen2-MoE vocabulary; these classes read it as it is. The base class moves every text field it
finds at the top level into `text_config`, so the MoE fields land there too.
"""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers import AutoConfig
from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import (
    Qwen2_5_VLConfig,
    Qwen2_5_VLTextConfig,
    Qwen2_5_VLVisionConfig,
)


@strict
class MetisHomeTextConfig(Qwen2_5_VLTextConfig):
    r"""
    num_experts (`int`, defaults to 2): experts per MoE block (thinking and non-thinking).
    num_experts_per_tok (`int`, defaults to 1): top-k of the per-token (`token`) routing mode.
    decoder_sparse_step (`int`, defaults to 1): every `decoder_sparse_step`-th layer is MoE.
    mlp_only_layers (`list[int]`): layers that keep the dense MLP.
    moe_intermediate_size (`int`): width of each expert. The published value (1408) is a Qwen2-MoE
        default; the loader replaces it with the width found in the checkpoint.
    shared_expert_intermediate_size (`int`): width of the optional shared expert, 0 for none
        (also reconciled with the checkpoint by the loader).
    norm_topk_prob (`bool`): in `token` mode, renormalise the top-k probabilities.
    router_aux_loss_coef (`float`): kept for compatibility; query routing has no load balancing.
    """

    model_type = "qwen2_5_vl_moe_text"
    base_config_key = "text_config"

    num_experts: int = 2
    num_experts_per_tok: int = 1
    decoder_sparse_step: int = 1
    mlp_only_layers: list[int] | tuple[int, ...] = ()
    moe_intermediate_size: int = 1408
    shared_expert_intermediate_size: int = 0
    norm_topk_prob: bool = False
    router_aux_loss_coef: float = 0.001
    output_router_logits: bool = False

    def is_moe_layer(self, layer_idx: int) -> bool:
        """Qwen2-MoE's rule for which decoder layers carry an MoE block."""
        return (
            layer_idx not in self.mlp_only_layers
            and self.num_experts > 0
            and (layer_idx + 1) % self.decoder_sparse_step == 0
        )


@strict
class MetisHomeConfig(Qwen2_5_VLConfig):
    r"""
    thinking_expert (`int`, defaults to 0): index of the expert trained to write `<think>` reasoning.
        The published checkpoint does not say which one it is; override it if its outputs show
        the other index thinks.
    routing_threshold (`float`, defaults to 0.5): in `auto` mode the query goes to the thinking
        expert when the router's thinking probability is at least this.
    system_prompt (`str`, *optional*): system message the model was trained with.
    router_temperature (`float`, defaults to 1.0): the deciding gate's pooled margin is divided by it
        before the softmax; fitted on held-out questions so that p_think is calibrated.
    """

    model_type = "qwen2_5_vl_moe"
    sub_configs_defaults = {
        "vision_config": Qwen2_5_VLVisionConfig,
        "text_config": MetisHomeTextConfig,
    }

    thinking_expert: int = 0
    routing_threshold: float = 0.5
    system_prompt: str | None = None
    router_temperature: float = 1.0


AutoConfig.register(MetisHomeTextConfig.model_type, MetisHomeTextConfig)
AutoConfig.register(MetisHomeConfig.model_type, MetisHomeConfig)
