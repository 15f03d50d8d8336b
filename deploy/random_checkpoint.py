"""A full-size Metis-HOME with random weights, to rehearse the GPU deployment without the real one.

The architecture is the published config with full-width experts (bench/gpu.py's `full_config`);
the tokenizer, image processor and chat template are the embedded tiny model's, and the config's
special-token ids are set to that tokenizer's, so every id the prompt uses exists. The weights are
built in bf16 on the GPU (26 GiB) and saved; nothing is downloaded.

    python deploy/random_checkpoint.py OUT_DIR [--layers N]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from transformers import AutoTokenizer

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.gpu import full_config  # noqa: E402
from metis.loading import EMBEDDED, copy_preprocessing_files  # noqa: E402
from metis.modeling import MetisHomeForConditionalGeneration  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out")
    parser.add_argument("--layers", type=int, default=None, help="fewer decoder layers (quicker rehearsal)")
    args = parser.parse_args()
    config = full_config()
    tokenizer = AutoTokenizer.from_pretrained(EMBEDDED)
    ids = tokenizer.convert_tokens_to_ids
    config.image_token_id, config.video_token_id = ids("<|image_pad|>"), ids("<|video_pad|>")
    config.vision_start_token_id, config.vision_end_token_id = ids("<|vision_start|>"), ids("<|vision_end|>")
    config.text_config.eos_token_id, config.text_config.pad_token_id = ids("<|im_end|>"), tokenizer.pad_token_id
    config.text_config.use_cache = True
    config.system_prompt = "Answer the question about the image."
    if args.layers:
        config.text_config.num_hidden_layers = args.layers
        config.text_config.layer_types = config.text_config.layer_types[: args.layers]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    with torch.device(device):
        model = MetisHomeForConditionalGeneration._from_config(config, dtype=torch.bfloat16)
    model.generation_config.eos_token_id = config.text_config.eos_token_id
    model.save_pretrained(args.out)
    copy_preprocessing_files(EMBEDDED, args.out)
    print(f"random Metis-HOME ({model.num_parameters() / 1e9:.2f}B parameters) in {args.out}")


if __name__ == "__main__":
    main()
