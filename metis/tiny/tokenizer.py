"""Small byte-level BPE tokenizer and Qwen2-VL image processor for the tiny shapes world.

The BPE is trained on the exact text segments the model sees (chat scaffolding, questions, chains,
answers, natural questions of the training pool), so a chain costs few tokens; byte-level fallback
still encodes any user text, including words the model never read.
"""

from __future__ import annotations

import re

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from metis.tiny import corpus, world

SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<think>",
    "</think>",
    "<answer>",
    "</answer>",
]

# Qwen2.5-VL layout; like Qwen, a missing system message is filled in, here with our own short
# SYSTEM_PROMPT, so training and inference prompts agree by default.
CHAT_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}"
    "<|im_start|>system\n" + world.SYSTEM_PROMPT + "<|im_end|>\n"
    "{% endif %}"
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}"
    "{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_CORPUS_SAMPLES = 4000
_SPECIAL_RE = re.compile("|".join(map(re.escape, SPECIAL_TOKENS)))


def _conversation(sample: world.Sample, thinking: bool) -> str:
    return (
        f"<|im_start|>system\n{world.SYSTEM_PROMPT}<|im_end|>\n"
        f"<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>{sample.question}<|im_end|>\n"
        f"<|im_start|>assistant\n{world.format_target(sample, thinking)}<|im_end|>\n"
    )


def _corpus(seed: int) -> list[str]:
    """Text between special tokens, split exactly as the tokenizer splits it at encode time, so
    merges are learnt for the real contexts (e.g. "red" right after <think>, "3" after <answer>)."""
    pieces = [str(n) for n in range(21)]
    for i in range(_CORPUS_SAMPLES):
        s = world.sample(seed * _CORPUS_SAMPLES + i)
        pieces += _SPECIAL_RE.split(_conversation(s, thinking=True))
    for q in corpus.generate("train", _CORPUS_SAMPLES // 2, seed):  # training wordings only
        pieces += [f"user\n{q.text}", corpus.OFF_WORLD_CHAIN, corpus.REFUSAL]
    return [p for p in pieces if p]


def build_tokenizer(seed: int = 0) -> PreTrainedTokenizerFast:
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=2000,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(_corpus(seed), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token="<|endoftext|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens=SPECIAL_TOKENS[1:],
        chat_template=CHAT_TEMPLATE,
        padding_side="left",
    )


def build_image_processor() -> Qwen2VLImageProcessorPil:
    """min_pixels = max_pixels = 112*112 pins every image to an 8x8 patch grid (16 merged tokens)."""
    pixels = world.IMAGE_SIZE * world.IMAGE_SIZE
    return Qwen2VLImageProcessorPil(
        patch_size=14, merge_size=2, temporal_patch_size=2, min_pixels=pixels, max_pixels=pixels
    )
