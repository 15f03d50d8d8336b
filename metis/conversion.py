"""Config conversion between stock Qwen2.5-VL and Metis-HOME, both directions in one place.

Upcycling (`upcycle.py`) turns a dense config into a Metis-HOME one whose experts are copies of the
dense MLP; exporting an expert (`export.py`) and the benchmarks' dense twin go back. What moves
across is the same both ways: the text config without the MoE fields, the vision config, tied
embeddings and the vision token ids.
"""

from __future__ import annotations

import dataclasses

from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLTextConfig

from .configuration import MetisHomeConfig, MetisHomeTextConfig

VISION_TOKEN_FIELDS = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")
MOE_TEXT_FIELDS = frozenset(
    {f.name for f in dataclasses.fields(MetisHomeTextConfig)}
    - {f.name for f in dataclasses.fields(Qwen2_5_VLTextConfig)}
)


def to_dense_config(config: MetisHomeConfig) -> Qwen2_5_VLConfig:
    """The stock Qwen2.5-VL config of one expert: the MoE fields go, the MLP width is the expert's."""
    text = {k: v for k, v in config.text_config.to_dict().items() if k not in MOE_TEXT_FIELDS | {"model_type"}}
    text["intermediate_size"] = config.text_config.moe_intermediate_size
    dense = Qwen2_5_VLConfig(
        text_config=text,
        vision_config=config.vision_config.to_dict(),
        tie_word_embeddings=config.tie_word_embeddings,
        **{name: getattr(config, name) for name in VISION_TOKEN_FIELDS},
    )
    dense.architectures = [Qwen2_5_VLForConditionalGeneration.__name__]
    dense.dtype = config.dtype
    return dense


def to_moe_config(dense: Qwen2_5_VLConfig, num_experts: int = 2, thinking_expert: int = 0,
                  system_prompt: str | None = None) -> MetisHomeConfig:
    """The Metis-HOME config upcycled from `dense`: every expert as wide as the dense MLP, every
    layer MoE, no shared expert, top-1 per-token routing renormalised (so it keeps weight 1)."""
    text = dense.text_config.to_dict()
    text.update(
        num_experts=num_experts,
        num_experts_per_tok=1,
        moe_intermediate_size=dense.text_config.intermediate_size,
        shared_expert_intermediate_size=0,
        norm_topk_prob=True,
        mlp_only_layers=[],
        decoder_sparse_step=1,
    )
    text.pop("model_type", None)
    return MetisHomeConfig(
        text_config=text,
        vision_config=dense.vision_config.to_dict(),
        tie_word_embeddings=dense.tie_word_embeddings,
        thinking_expert=thinking_expert,
        system_prompt=system_prompt,
        **{name: getattr(dense, name) for name in VISION_TOKEN_FIELDS},
    )
