"""Find, check and load a Metis-HOME checkpoint: the embedded tiny model, a folder or a Hub id.

The published checkpoint's tensor names and expert widths are not documented, so nothing is
assumed: the widths are read from the tensor shapes, every name and shape is compared with the
model the config describes, and a mismatch fails listing what differs instead of leaving any
weight randomly initialised.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import math
import os
import re
import shutil
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import psutil
import torch
from accelerate import init_empty_weights
from accelerate.utils import compute_module_sizes, get_balanced_memory, get_max_memory, infer_auto_device_map
from transformers import AutoTokenizer
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from .configuration import MetisHomeConfig
from .modeling import LEGACY_RENAMES, MetisHomeForConditionalGeneration
from .prompting import PromptConfig
from .sizing import GIB, RUNTIME_RESERVE_GIB, kv_bytes_per_token, size_from_config, tensor_shapes

ROOT = Path(__file__).resolve().parent.parent
log = logging.getLogger(__name__)
EMBEDDED = ROOT / "assets" / "metis-home-tiny"
EMBEDDED_NAMES = ("", "tiny", "embedded", "default")
SMALL_CPU_MODEL = 100_000_000  # parameters; see pick_cpu_threads
# Beyond this, a model that would land on CPU is refused unless asked for (METIS_ALLOW_CPU=1): the
# 14B checkpoint in float32 needs ~52 GiB and answers at seconds per token, and landing there
# silently usually means CUDA is broken (a wheel needing a newer driver), not a choice.
CPU_MAX_PARAMS = 2_000_000_000
PUBLISHED = "mmthinking/Metis-HOME"  # what a GPU host serves when no model is named
REFERENCE_CONFIG = ROOT / "assets" / "reference" / "metis-home-config.json"
PREPROCESSING_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
    "preprocessor_config.json", "chat_template.json", "chat_template.jinja", "added_tokens.json",
)


class CheckpointMismatch(ValueError):
    """The checkpoint does not hold the tensors the config describes."""


class NotEnoughGPUMemory(ValueError):
    """The model does not fit the GPUs; offloading the rest to CPU or disk was not asked for."""


class NoUsableGPU(RuntimeError):
    """A large model would run on CPU because CUDA is not usable; running there was not asked for."""


def zero_gpu() -> bool:
    """On a ZeroGPU Space: SPACES_ZERO_GPU read as the `spaces` package reads it."""
    return os.environ.get("SPACES_ZERO_GPU", "").lower() in ("1", "t", "true")


@dataclass(frozen=True)
class ModelInfo:
    checkpoint: str
    device: str
    dtype: str
    attn_implementation: str
    num_experts: int
    thinking_expert: int
    params_total: int
    params_shared: int
    params_per_expert: int
    memory_bytes: int
    routing: str
    cpu_threads: int  # torch's intra-op threads in this process
    notice: str | None = None  # why this is not the model a GPU host would serve (load_default)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class LoadedModel:
    """What `load` (or `export.load_router`) hands to `Engine`: the model and what reads its inputs.
    Named, so a caller cannot swap the tokenizer for the image processor by position."""

    model: MetisHomeForConditionalGeneration
    tokenizer: object
    image_processor: object
    prompt_config: PromptConfig | None = None  # None: PromptBuilder's defaults
    info: ModelInfo | None = None  # None: not described (a router export)


def resolve_checkpoint(spec: str | None, allow_pickle: bool = False) -> Path:
    if spec is None or spec in EMBEDDED_NAMES:
        if not (EMBEDDED / "config.json").exists():
            raise FileNotFoundError(f"the embedded model is missing: {EMBEDDED} (train it: python -m metis.tiny.train)")
        return EMBEDDED
    path = Path(spec).expanduser()
    if path.is_dir():
        return path
    if re.fullmatch(r"[\w.-]+/[\w.-]+", spec):
        from huggingface_hub import snapshot_download

        patterns = ["*.json", "*.safetensors", "*.txt", "*.jinja"] + (["*.bin"] if allow_pickle else [])
        return Path(snapshot_download(spec, allow_patterns=patterns))
    raise FileNotFoundError(f"no checkpoint folder or Hub id {spec!r}")


def checkpoint_shapes(path: Path, allow_pickle: bool = False) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes from the safetensors headers (no weight is read)."""
    files = sorted(path.glob("*.safetensors"))
    if not files:
        pickled = sorted(path.glob("*.bin")) + sorted(path.glob("*.pt"))
        if pickled and not allow_pickle:
            raise CheckpointMismatch(
                f"{path} holds only pickled weights ({pickled[0].name}); they can run code when loaded. "
                "Convert them to safetensors, or pass --allow-pickle if you trust the source."
            )
        if not pickled:
            raise CheckpointMismatch(f"{path} holds no weights (*.safetensors)")
        return {}
    return tensor_shapes(files)


def to_model_name(key: str) -> str:
    for pattern, replacement in LEGACY_RENAMES:
        key = re.sub(pattern, replacement, key)
    return key


def reconcile_config(config: MetisHomeConfig, shapes: dict[str, tuple[int, ...]]) -> MetisHomeConfig:
    """Expert count and widths as the checkpoint has them (the published config's are defaults)."""
    text = config.text_config
    experts = {
        int(m.group(1)): shape[0]
        for key, shape in shapes.items()
        if (m := re.search(r"\.layers\.\d+\.mlp\.experts\.(\d+)\.gate_proj\.weight$", key))
    }
    if experts:
        text.num_experts = max(experts) + 1
        text.moe_intermediate_size = experts[0]
    shared = [s[0] for k, s in shapes.items() if k.endswith("mlp.shared_expert.gate_proj.weight")]
    text.shared_expert_intermediate_size = shared[0] if shared else 0
    return config


def check_checkpoint(config: MetisHomeConfig, shapes: dict[str, tuple[int, ...]]) -> None:
    with init_empty_weights():
        skeleton = MetisHomeForConditionalGeneration(config)
    expected = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
    if config.tie_word_embeddings:
        expected.pop("lm_head.weight", None)
    found = {to_model_name(k): v for k, v in shapes.items()}
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected) - {"lm_head.weight"})
    wrong = sorted(f"{k}: checkpoint {found[k]} vs model {expected[k]}" for k in set(expected) & set(found)
                   if found[k] != expected[k])
    if missing or unexpected or wrong:
        def listing(title, items):
            more = f" … and {len(items) - 20} more" if len(items) > 20 else ""
            return f"\n  {title} ({len(items)}): " + ", ".join(items[:20]) + more if items else ""

        raise CheckpointMismatch(
            "checkpoint does not match the Metis-HOME layout:"
            + listing("missing", missing) + listing("unexpected", unexpected) + listing("wrong shape", wrong)
        )


def pick_runtime(device: str | None, dtype: str | None, attn: str | None,
                 saved_dtype: torch.dtype | str | None = None) -> tuple[str, torch.dtype, str]:
    """On a GPU the checkpoint computes in the dtype it was saved in (what it was evaluated in;
    the embedded tiny model is float32), bfloat16 when it names none; on CPU in float32."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    on_gpu = device.startswith("cuda")
    if isinstance(saved_dtype, str):
        saved_dtype = getattr(torch, saved_dtype)
    if dtype:
        torch_dtype = getattr(torch, dtype)
    else:
        torch_dtype = (saved_dtype or torch.bfloat16) if on_gpu else torch.float32
    if attn is None:  # flash-attention 2 runs only in fp16/bf16 (the tiny model is float32)
        half = torch_dtype in (torch.float16, torch.bfloat16)
        attn = "flash_attention_2" if on_gpu and half and flash_attention_available() else "sdpa"
    return device, torch_dtype, attn


def gpu_device_map(config: MetisHomeConfig, dtype: torch.dtype, device: str = "cuda",
                   max_memory: dict | None = None) -> dict[str, int | str]:
    """accelerate's balanced device map over the GPUs `device` names ("cuda": all visible, "cuda:N":
    that one), refused when any module would land on "cpu" or "disk": accelerate would stream those
    weights over PCIe on every token, and offloaded (meta) weights break router features and
    fine-tuned routers. `max_memory` (accelerate's form) stands in for the GPUs' free memory."""
    with init_empty_weights():
        skeleton = MetisHomeForConditionalGeneration(config).to(dtype)
    if ":" in device:  # that GPU alone (others untouched), with accelerate's 10% headroom of one GPU
        index = torch.device(device).index
        if max_memory is None:
            max_memory = {index: torch.cuda.mem_get_info(index)[0], "cpu": psutil.virtual_memory().available}
        max_memory = {k: int(v * 0.9) if k == index else v for k, v in get_max_memory(dict(max_memory)).items()
                      if k in (index, "cpu", "disk")}
    no_split = skeleton._no_split_modules
    budget = get_balanced_memory(skeleton, max_memory and dict(max_memory), no_split_module_classes=no_split)
    device_map = infer_auto_device_map(skeleton, budget, no_split_module_classes=no_split)
    offloaded = sorted(name for name, d in device_map.items() if d in ("cpu", "disk"))
    if offloaded:
        gib = 2**30
        kv = kv_bytes_per_token(config.text_config, dtype.itemsize)
        gpus = ", ".join(f"GPU {k}: {v / gib:.1f} GiB" for k, v in budget.items() if isinstance(k, int)) or "none"
        raise NotEnoughGPUMemory(
            f"the model does not fit the GPU memory: its {str(dtype).removeprefix('torch.')} weights need "
            f"{compute_module_sizes(skeleton)[''] / gib:.1f} GiB, plus the KV cache "
            f"({kv * 1000 / 2**20:.0f} MiB per 1k tokens) and activations; usable for weights: "
            f"{gpus}. {len(offloaded)} module(s) would run from CPU/disk ({', '.join(offloaded[:3])}"
            f"{' …' if len(offloaded) > 3 else ''}), copying their weights over PCIe on every token. "
            "Use a larger GPU or more GPUs, or set METIS_OFFLOAD=1 to accept the offload (slow; "
            "router fine-tuning then cannot run)."
        )
    return device_map


def flash_attention_available() -> bool:
    """flash-attn 2 is installed and imports, or `kernels` is (requirements.txt: a Space installs
    only that file, and flash-attn builds only against CUDA), from which transformers takes the
    prebuilt `kernels-community/flash-attn2` for this GPU and torch when flash-attn is missing."""
    for package in ("flash_attn", "kernels"):
        if importlib.util.find_spec(package) is not None:
            try:
                importlib.import_module(package)
                return True
            except Exception:
                continue
    return False


def pick_cpu_threads(model, threads: int | None) -> int:
    """Intra-op threads for a model on CPU. A small model's decode step is many tiny ops: more
    OpenMP threads do not speed it up, and from the engine's worker thread (any thread but the
    one that first used torch) they slow it by ~25% (BENCHMARKS.md), so small models get one.
    Large ones keep torch's default, which their matmuls use."""
    if threads is not None:
        return threads
    return 1 if model.num_parameters() < SMALL_CPU_MODEL else torch.get_num_threads()


def placement(config: MetisHomeConfig, device: str, dtype: torch.dtype, offload: bool) -> dict:
    """`from_pretrained`'s device_map: none on CPU, and none on ZeroGPU, whose `spaces` emulates one
    CUDA device and expects `.to("cuda")`; otherwise the checked GPU-only map, or accelerate's
    "auto" (which may offload) when offload was asked for."""
    if device == "cpu" or zero_gpu():
        return {}
    return {"device_map": "auto" if offload else gpu_device_map(config, dtype, device)}


def load(spec: str | None = None, device: str | None = None, dtype: str | None = None,
         attn_implementation: str | None = None, allow_pickle: bool = False, cpu_threads: int | None = None,
         offload: bool = False, allow_cpu: bool = False) -> LoadedModel:
    """The checkpoint, ready for `Engine`.

    `device`: "cuda" spreads the model over every visible GPU, "cuda:N" puts it on that one.
    `offload` (METIS_OFFLOAD=1, metis/settings.py) lets a model larger than the GPUs spill to
    CPU/disk; `allow_cpu` (METIS_ALLOW_CPU=1) lets a model over CPU_MAX_PARAMS run on CPU.
    On CPU this sets torch's intra-op threads for the process (`pick_cpu_threads`)."""
    if zero_gpu() and "spaces" not in sys.modules:
        raise RuntimeError("SPACES_ZERO_GPU is set but `spaces` was not imported before the model loaded: "
                           "import spaces first (app.py does), before torch touches CUDA")
    path = resolve_checkpoint(spec, allow_pickle)
    config = MetisHomeConfig.from_pretrained(path)
    shapes = checkpoint_shapes(path, allow_pickle)
    if shapes:
        config = reconcile_config(config, shapes)
        check_checkpoint(config, shapes)
    device, torch_dtype, attn = pick_runtime(device, dtype, attn_implementation, config.dtype)
    if device == "cpu" and not allow_cpu:
        refuse_large_on_cpu(sum(math.prod(s) for s in shapes.values()))
    where = placement(config, device, torch_dtype, offload)
    def build(attn: str):
        return MetisHomeForConditionalGeneration.from_pretrained(
            path, config=config, dtype=torch_dtype, attn_implementation=attn, use_safetensors=bool(shapes), **where)

    try:
        model = build(attn)
    except Exception as exc:  # flash-attention chosen here, not asked for: its kernel may not load
        if attn_implementation is not None or attn != "flash_attention_2":
            raise
        log.warning("flash-attention 2 did not load (%s: %s); using sdpa", type(exc).__name__, exc)
        attn = "sdpa"
        model = build(attn)
    if not where:
        model.to(device)
    if device == "cpu":
        torch.set_num_threads(pick_cpu_threads(model, cpu_threads))
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    image_processor = Qwen2VLImageProcessorPil.from_pretrained(path)
    # image bounds: the checkpoint's own preprocessor config (the tiny model's fixes 112x112)
    return LoadedModel(model, tokenizer, image_processor, PromptConfig(),
                       describe(model, str(spec or "embedded tiny"), attn))


def refuse_large_on_cpu(params: int) -> None:
    if params <= CPU_MAX_PARAMS:
        return
    why = ("this PyTorch is a CPU-only build" if torch.version.cuda is None else
           f"this PyTorch was built for CUDA {torch.version.cuda} but finds no usable GPU "
           "(no GPU visible, or a driver older than the build needs)")
    raise NoUsableGPU(
        f"refusing to run a {params / 1e9:.1f}B-parameter model on CPU (float32: {params * 4 / 2**30:.0f} GiB, "
        f"seconds per token): {why}. Fix CUDA, or set METIS_ALLOW_CPU=1 to run on CPU anyway.")


def published_fits() -> str | None:
    """None when the visible CUDA GPUs' free memory holds the published checkpoint (from its
    config, as `metis size` counts it); otherwise why not, for the notice."""
    count = torch.cuda.device_count()
    free = sum(torch.cuda.mem_get_info(i)[0] for i in range(count)) - count * RUNTIME_RESERVE_GIB * GIB
    need = size_from_config(MetisHomeConfig.from_json_file(REFERENCE_CONFIG)).weight_bytes
    if need <= free:
        return None
    return (f"{PUBLISHED} needs {need / GIB:.1f} GiB for its bf16 weights and the GPU{'s' if count > 1 else ''} "
            f"here have {max(free, 0) / GIB:.1f} GiB free (after {RUNTIME_RESERVE_GIB:g} GiB kept per GPU)")


def load_default(**kwargs) -> LoadedModel:
    """No model named: on a CUDA host whose GPUs hold it, the published checkpoint; else, or when
    it cannot load (no network, a mismatch, too little memory), the embedded tiny model with a
    notice saying why. On CPU, the tiny model and no notice."""
    if not torch.cuda.is_available():
        return load(None, **kwargs)
    why = published_fits()
    if why is None:
        try:
            return load(PUBLISHED, **kwargs)
        except Exception as exc:
            why = f"{PUBLISHED} could not be loaded: {type(exc).__name__}: {exc}"
    loaded = load(None, **kwargs)
    notice = f"Serving the embedded tiny model, not the real one: {why}."
    return replace(loaded, info=replace(loaded.info, notice=notice))


def describe(model: MetisHomeForConditionalGeneration, checkpoint: str, attn: str) -> ModelInfo:
    total = sum(p.numel() for p in model.parameters())
    per_expert = [0] * model.config.text_config.num_experts
    for name, p in model.named_parameters():
        if m := re.search(r"\.mlp\.experts\.(\d+)\.", name):
            per_expert[int(m.group(1))] += p.numel()
    return ModelInfo(
        checkpoint=checkpoint,
        device=str(model.device),
        dtype=str(model.dtype).removeprefix("torch."),
        attn_implementation=model.config._attn_implementation or attn,  # what transformers set up
        num_experts=len(per_expert),
        thinking_expert=model.config.thinking_expert,
        params_total=total,
        params_shared=total - sum(per_expert),
        params_per_expert=per_expert[0] if per_expert else 0,
        memory_bytes=model.get_memory_footprint(),
        routing="once per query: first MoE layer's gate, mean over the prompt, held while decoding",
        cpu_threads=torch.get_num_threads(),
    )


def copy_preprocessing_files(source: Path, out: str | Path) -> None:
    for name in PREPROCESSING_FILES:
        if (Path(source) / name).exists():
            shutil.copy(Path(source) / name, Path(out) / name)
