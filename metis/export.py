"""Split a Metis-HOME checkpoint into parts that stock servers run: two dense experts and a router.

The experts differ only in their decoder MLPs, and a query is routed once, before its first token,
by the first MoE layer's gate. So the model is exactly:
- `think/` and `direct/`: stock `Qwen2_5_VLForConditionalGeneration` checkpoints, each holding the
  shared weights and one expert's MLPs (vLLM, SGLang or `transformers serve` load them as they are);
- `router/`: a Metis-HOME checkpoint with only what the decision reads (vision tower, embeddings,
  the decoder layers up to the first MoE layer and its gate), loaded as `MetisHomeRouter`.

A model that mixes experts inside a token (top-k > 1, a shared expert) has no such split: refused.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import init_empty_weights
from transformers import Qwen2_5_VLForConditionalGeneration
from transformers.conversion_mapping import register_checkpoint_conversion_mapping
from transformers.core_model_loading import WeightRenaming

from .configuration import MetisHomeConfig
from .conversion import to_dense_config
from .loading import (
    CheckpointMismatch,
    LoadedModel,
    checkpoint_shapes,
    copy_preprocessing_files,
    load,
    pick_cpu_threads,
    reconcile_config,
    resolve_checkpoint,
    zero_gpu,
)
from .modeling import (
    LEGACY_RENAMES,
    MetisHomeForConditionalGeneration,
    MetisHomeModel,
    MetisHomePreTrainedModel,
    is_gate,
)
from .routing import expert_index

EXPERT_NAMES = ("think", "direct")
ROUTER = "router"
_EXPERT_KEY = re.compile(r"^(.*\.mlp\.)experts\.(\d+)\.(.*)$")


class NotSplittable(ValueError):
    """The checkpoint's experts cannot be served as two independent dense models."""


@dataclass(frozen=True)
class ExportSummary:
    think: Path
    direct: Path
    router: Path
    params_moe: int  # the in-process model
    params_expert: int  # each dense export
    params_router: int

    def lines(self) -> list[str]:
        return [
            f"think:  {self.think} ({self.params_expert:,} parameters)",
            f"direct: {self.direct} ({self.params_expert:,} parameters)",
            f"router: {self.router} ({self.params_router:,} parameters)",
            f"(the in-process MoE has {self.params_moe:,})",
        ]


def split_problems(config: MetisHomeConfig) -> list[str]:
    """Why this model is not two dense experts behind a query router; empty when it is."""
    text = config.text_config
    problems = []
    if text.num_experts != 2:
        problems.append(f"it has {text.num_experts} experts; the split needs exactly two (thinking and direct)")
    if text.num_experts_per_tok != 1:
        problems.append(
            f"it routes per token: num_experts_per_tok={text.num_experts_per_tok} mixes several experts inside "
            "every token, which no single dense model reproduces; the split needs one expert per query (top-1)"
        )
    if text.shared_expert_intermediate_size > 0:
        problems.append(
            f"it has a shared expert (width {text.shared_expert_intermediate_size}) added to every token through "
            "its own sigmoid gate; a stock Qwen2.5-VL MLP has no place for it"
        )
    dense_layers = [i for i in range(text.num_hidden_layers) if not text.is_moe_layer(i)]
    if dense_layers and text.intermediate_size != text.moe_intermediate_size:
        problems.append(
            f"its dense layers {dense_layers} are {text.intermediate_size} wide and its experts "
            f"{text.moe_intermediate_size}; a stock Qwen2.5-VL has one MLP width"
        )
    if not any(text.is_moe_layer(i) for i in range(text.num_hidden_layers)):
        problems.append("it has no MoE layer, so there is nothing to route")
    return problems


def check_splittable(config: MetisHomeConfig) -> None:
    if problems := split_problems(config):
        raise NotSplittable("cannot export this checkpoint as two dense experts: " + "; ".join(problems))


def expert_state_dict(state_dict: dict[str, torch.Tensor], expert: int) -> dict[str, torch.Tensor]:
    """Shared weights + `experts.{expert}` renamed to the dense MLP; gates and other experts dropped.
    The tensors are the model's own (no copy)."""
    out = {}
    for key, value in state_dict.items():
        if is_gate(key):
            continue
        if m := _EXPERT_KEY.match(key):
            if int(m.group(2)) != expert:
                continue
            key = m.group(1) + m.group(3)
        out[key] = value
    return out


class MetisHomeRouter(MetisHomeForConditionalGeneration):
    """Metis-HOME up to its routing decision: vision tower, embeddings and the decoder layers through
    the first MoE layer, whose gate decides. Its experts are zero-width (`moe_intermediate_size=0`:
    no weights, no compute) and there is no LM head. Calling it fills the `Routing` it is given,
    with the same code path and numbers as the full model's prefill."""

    def __init__(self, config: MetisHomeConfig):
        MetisHomePreTrainedModel.__init__(self, config)
        with warnings.catch_warnings():  # torch warns that initialising the empty experts does nothing
            warnings.filterwarnings("ignore", "Initializing zero-element tensors")
            self.model = MetisHomeModel(config)
            self.post_init()

    def get_output_embeddings(self):
        return None

    def forward(self, routing=None, use_cache=None, logits_to_keep=None, **inputs):
        """Runs the layers for their routing side effect; the hidden states are returned unused."""
        return self.model(**inputs, routing=routing, use_cache=False).last_hidden_state


register_checkpoint_conversion_mapping(
    MetisHomeRouter.__name__,
    [WeightRenaming(source_patterns=src, target_patterns=dst) for src, dst in LEGACY_RENAMES],
)


def router_config(config: MetisHomeConfig) -> MetisHomeConfig:
    text = config.text_config
    first_moe = next(i for i in range(text.num_hidden_layers) if text.is_moe_layer(i))
    router = MetisHomeConfig.from_dict(config.to_dict())
    router.text_config.num_hidden_layers = first_moe + 1
    router.text_config.layer_types = text.layer_types[: first_moe + 1]
    router.text_config.moe_intermediate_size = 0
    router.architectures = [MetisHomeRouter.__name__]
    return router


def router_state_dict(state_dict: dict[str, torch.Tensor], config: MetisHomeConfig) -> dict[str, torch.Tensor]:
    layers = config.text_config.num_hidden_layers
    out = {}
    for key, value in state_dict.items():
        if key.startswith("lm_head.") or (_EXPERT_KEY.match(key) is not None):
            continue
        if (m := re.search(r"\.layers\.(\d+)\.", key)) and int(m.group(1)) >= layers:
            continue
        out[key] = value
    return out


def _build(cls, config, state_dict):
    """A model of `cls` holding exactly `state_dict` (strict: a missing or extra tensor fails)."""
    with init_empty_weights():
        model = cls(config)
    empty = {k: v for k, v in model.state_dict().items() if v.numel() == 0}  # zero-width router experts
    model.load_state_dict({**state_dict, **{k: torch.empty(v.shape, dtype=config.dtype) for k, v in empty.items()}},
                          strict=True, assign=True)
    return model


def export_experts(checkpoint: str | None, out: str | Path) -> ExportSummary:
    """Write `out/think`, `out/direct` and `out/router` from a Metis-HOME checkpoint."""
    source = resolve_checkpoint(checkpoint)
    config = MetisHomeConfig.from_pretrained(source)
    dtype = str(config.dtype or "float32").removeprefix("torch.")  # exported in the checkpoint's own dtype
    # refused before any weight is read, with the widths the checkpoint's tensors have
    check_splittable(reconcile_config(config, checkpoint_shapes(source)))
    model = load(str(source), device="cpu", dtype=dtype).model
    config = model.config
    out = Path(out)
    state = model.state_dict()
    experts = {name: expert_index(name, config.thinking_expert) for name in EXPERT_NAMES}
    params_expert = 0
    for name in EXPERT_NAMES:
        weights = expert_state_dict(state, experts[name])
        dense = _build(Qwen2_5_VLForConditionalGeneration, to_dense_config(config), weights)
        dense.generation_config = model.generation_config
        _save(dense, source, out / name)
        params_expert = dense.num_parameters()
    rconfig = router_config(config)
    router = _build(MetisHomeRouter, rconfig, router_state_dict(state, rconfig))
    router.generation_config = model.generation_config
    _save(router, source, out / ROUTER)
    return ExportSummary(out / "think", out / "direct", out / ROUTER, model.num_parameters(), params_expert,
                         router.num_parameters())


def _save(model, source: Path, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    copy_preprocessing_files(source, folder)


def load_router(path: str | Path, cpu_threads: int | None = None, device: str | None = None) -> LoadedModel:
    """The router model of an exported `router/` folder, ready for `Engine`. Every tensor
    must be there with its shape: nothing is initialised at random. `device`: by default the
    GPU where CUDA is usable (its prefill runs the shared vision tower and attention), except on
    ZeroGPU, where CUDA may only be touched inside a GPU function."""
    from transformers import AutoTokenizer
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    path = Path(path)
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"no router checkpoint in {path} (make one: python -m metis export-experts)")
    config = MetisHomeConfig.from_pretrained(path)
    if config.architectures != [MetisHomeRouter.__name__]:
        raise CheckpointMismatch(f"{path} is not a router export (architectures {config.architectures})")
    model, info = MetisHomeRouter.from_pretrained(path, config=config, output_loading_info=True)
    problems = {k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    if problems:
        raise CheckpointMismatch(f"router checkpoint {path} does not match its config: {problems}")
    device = device or ("cuda" if torch.cuda.is_available() and not zero_gpu() else "cpu")
    model.to(device)
    if device == "cpu":
        torch.set_num_threads(pick_cpu_threads(model, cpu_threads))
    model.eval()
    return LoadedModel(model, AutoTokenizer.from_pretrained(path), Qwen2VLImageProcessorPil.from_pretrained(path))
