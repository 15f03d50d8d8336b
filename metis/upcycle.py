"""Dense Qwen2.5-VL -> Metis-HOME: every expert starts as a copy of the dense MLP.

With the router at zero the thinking probability is exactly 0.5 everywhere, and because every
expert equals the dense MLP the upcycled model computes the same function as its source in every
routing mode (per-token weights are renormalised, `norm_topk_prob=True`, so top-1 keeps weight 1).
"""

from __future__ import annotations

import re

import torch
from accelerate import init_empty_weights
from transformers import Qwen2_5_VLForConditionalGeneration

from .conversion import to_moe_config
from .modeling import MetisHomeForConditionalGeneration, is_gate

_DENSE_MLP = re.compile(r"^(.*\.layers\.\d+\.mlp)\.(gate_proj|up_proj|down_proj)\.weight$")


def upcycle(dense: Qwen2_5_VLForConditionalGeneration, num_experts: int = 2, thinking_expert: int = 0,
            system_prompt: str | None = None) -> MetisHomeForConditionalGeneration:
    config = to_moe_config(dense.config, num_experts, thinking_expert, system_prompt)
    config._attn_implementation = dense.config._attn_implementation
    with init_empty_weights(include_buffers=False):  # parameters are assigned below, never allocated twice
        moe = MetisHomeForConditionalGeneration(config)
    state = {}
    for name, tensor in dense.state_dict().items():
        match = _DENSE_MLP.match(name)
        if not match:
            state[name] = tensor
            continue
        prefix, proj = match.groups()
        for e in range(num_experts):
            state[f"{prefix}.experts.{e}.{proj}.weight"] = tensor.clone()
    for name, param in moe.named_parameters():
        if is_gate(name):
            state[name] = torch.zeros(param.shape, dtype=dense.dtype, device=dense.device)
    missing, unexpected = moe.load_state_dict(state, strict=False, assign=True)
    missing = [k for k in missing if k != "lm_head.weight" or not config.tie_word_embeddings]
    if missing or unexpected:
        raise ValueError(f"upcycling left parameters unmatched: missing={missing} unexpected={unexpected}")
    if config.tie_word_embeddings:
        moe.tie_weights()
    moe.generation_config = dense.generation_config
    return moe.eval() if not dense.training else moe


def upcycle_checkpoint(source: str, out: str, thinking_expert: int = 0) -> None:
    """`python -m metis upcycle SOURCE OUT`: any dense Qwen2.5-VL folder or Hub id to a Metis-HOME folder."""
    from .loading import copy_preprocessing_files, resolve_checkpoint

    path = resolve_checkpoint(source)
    dense = Qwen2_5_VLForConditionalGeneration.from_pretrained(path, dtype="auto")
    upcycle(dense, thinking_expert=thinking_expert).save_pretrained(out)
    copy_preprocessing_files(path, out)
