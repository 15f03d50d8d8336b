"""A rehearsal of the published checkpoint, built offline: `python -m metis.rehearsal OUT`.

These machines never download the real `mmthinking/Metis-HOME`, so this builds the next best
thing, packaged the way that repo is: the published config.json with only the fields that size
forces changed, the real Qwen2.5 vocabulary and special-token ids (metis/qwen_vocab.py), the
Qwen2.5-VL chat template, preprocessor and generation configs, and random bf16 weights under
transformers-4.x tensor names (`model.layers.N.…`, `visual.…`), sharded with an index. Every
file the loader, the prompt builder and the app read is real except the weight values and the
depth and widths.

The expert width is not written into the config: like the published one it keeps Qwen2-MoE's
default `moe_intermediate_size` (1408) and `shared_expert_intermediate_size` (5632), while the
experts in the shards are full-width copies of nothing shared (what upcycling makes), so the
loader must read the widths from the tensor shapes, as it must for the real checkpoint.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import torch
from safetensors.torch import save_file

from .configuration import MetisHomeConfig
from .modeling import MetisHomeForConditionalGeneration
from .qwen_vocab import ADDED_TOKENS, EOS, PAD, SPECIAL_IDS, build_qwen_tokenizer

ROOT = Path(__file__).resolve().parent.parent
PUBLISHED_CONFIG = ROOT / "assets" / "reference" / "metis-home-config.json"

# The fields size forces, and nothing else. Head width (128), the grouping of query heads over
# key-value heads, rope sections, vocabulary, token ids and the vision patch geometry stay real.
TEXT_SIZE = dict(num_hidden_layers=4, hidden_size=256, num_attention_heads=2, num_key_value_heads=1,
                 intermediate_size=512)
VISION_SIZE = dict(depth=4, hidden_size=128, intermediate_size=256, out_hidden_size=256,
                   fullatt_block_indexes=[3])  # the published pattern: every 8th block, the last one

# Qwen2.5-VL-7B-Instruct's image processor: 14-pixel patches merged 2x2, two frames per temporal
# patch, between 4 and 16384 merged tokens (56*56 and 16384*28*28 pixels).
PREPROCESSOR = {
    "min_pixels": 3136,
    "max_pixels": 12845056,
    "patch_size": 14,
    "temporal_patch_size": 2,
    "merge_size": 2,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "image_processor_type": "Qwen2VLImageProcessor",
    "processor_class": "Qwen2_5_VLProcessor",
}
GENERATION = {
    "bos_token_id": SPECIAL_IDS[PAD],
    "pad_token_id": SPECIAL_IDS[PAD],
    "do_sample": True,
    "eos_token_id": [SPECIAL_IDS[EOS], SPECIAL_IDS[PAD]],
    "repetition_penalty": 1.05,
    "temperature": 0.1,
    "top_p": 0.001,
    "top_k": 1,
    "transformers_version": "4.49.0.dev0",
}
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture "
    "{{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video "
    "{{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def rehearsal_config() -> dict:
    """The published config.json with the size fields replaced (flat, transformers 4.49 style)."""
    config = json.loads(PUBLISHED_CONFIG.read_text())
    config.update(TEXT_SIZE)
    config["vision_config"] = {**config["vision_config"], **VISION_SIZE}
    return config


def tokenizer_config() -> dict:
    """tokenizer_config.json as Qwen2.5-VL publishes it (the class name, the added tokens)."""
    return {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": {
            str(SPECIAL_IDS[token]): {"content": token, "lstrip": False, "normalized": False,
                                      "rstrip": False, "single_word": False, "special": special}
            for token, special in ADDED_TOKENS
        },
        "additional_special_tokens": [t for t, special in ADDED_TOKENS if special and t != PAD],
        "bos_token": None,
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": EOS,
        "errors": "replace",
        "model_max_length": 131072,
        "pad_token": PAD,
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }


def legacy_name(name: str) -> str:
    """This model's parameter name -> the transformers-4.x name the published shards use (the
    inverse of modeling.LEGACY_RENAMES, which the loader applies)."""
    for new, old in (("model.language_model.", "model."), ("model.visual.", "visual.")):
        if name.startswith(new):
            return old + name.removeprefix(new)
    return name


def _file_order(name: str) -> tuple:
    """Embeddings first, layers in depth order, the vision tower, the LM head last."""
    layer = re.search(r"\.(?:layers|blocks)\.(\d+)\.", name)
    group = next(i for i, p in enumerate(("model.embed", "model.", "visual.", "")) if name.startswith(p))
    return group, int(layer.group(1)) if layer else -1, name


def save_sharded(state: dict[str, torch.Tensor], out: Path, shards: int) -> None:
    """Safetensors files of at most total/shards bytes each (a larger tensor alone in its file)
    and `model.safetensors.index.json`, as `save_pretrained(max_shard_size=...)` lays them out."""
    nbytes = {name: t.numel() * t.element_size() for name, t in state.items()}
    limit = sum(nbytes.values()) / shards
    files, current, size = [], {}, 0
    for name in sorted(state, key=_file_order):
        if current and size + nbytes[name] > limit:
            files.append(current)
            current, size = {}, 0
        current[name] = state[name]
        size += nbytes[name]
    files.append(current)
    weight_map = {}
    for i, tensors in enumerate(files, 1):
        file = f"model-{i:05d}-of-{len(files):05d}.safetensors"
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, file))
    index = {"metadata": {"total_size": sum(nbytes.values())}, "weight_map": dict(sorted(weight_map.items()))}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def build_rehearsal(out: str | Path, seed: int = 0, shards: int = 4) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(rehearsal_config(), indent=2))
    config = MetisHomeConfig.from_pretrained(out)
    text = config.text_config
    text.moe_intermediate_size, text.shared_expert_intermediate_size = text.intermediate_size, 0  # upcycled
    torch.manual_seed(seed)
    model = MetisHomeForConditionalGeneration(config)
    state = {legacy_name(k): v.to(torch.bfloat16) for k, v in model.state_dict().items()}
    save_sharded(state, out, shards)
    build_qwen_tokenizer().backend_tokenizer.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(), indent=2))
    (out / "chat_template.json").write_text(json.dumps({"chat_template": CHAT_TEMPLATE}, indent=2))
    (out / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR, indent=2))
    (out / "generation_config.json").write_text(json.dumps(GENERATION, indent=2))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m metis.rehearsal", description=__doc__.splitlines()[0])
    parser.add_argument("out")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shards", type=int, default=4)
    args = parser.parse_args(argv)
    print(f"rehearsal checkpoint in {build_rehearsal(args.out, args.seed, args.shards)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
