"""Chat messages -> model inputs in the Qwen2.5-VL chat format.

The token ids are assembled piece by piece instead of rendering a template string and
re-tokenising it: control tokens come from their ids, and everything a person typed is encoded
with `split_special_tokens=True`, so typing `<|im_start|>` or `<|image_pad|>` yields ordinary text
and can never end a turn or open an image slot.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
from PIL import Image

IM_START, IM_END = "<|im_start|>", "<|im_end|>"
VISION_START, VISION_END, IMAGE_PAD = "<|vision_start|>", "<|vision_end|>", "<|image_pad|>"

# Metis-RISE's published system prompt asks for this output format.
DEFAULT_SYSTEM_PROMPT = (
    "You are a helpful assistant. Think about the question step by step inside <think> </think> "
    "tags when it needs reasoning, then give the final answer inside <answer> </answer> tags; "
    "put a mathematical final answer in \\boxed{}."
)

_REASONING = re.compile(r"<think>.*?(</think>|$)", re.S)
_ANSWER_TAGS = re.compile(r"</?answer>")


@dataclass
class Message:
    role: str  # "user" or "assistant"
    text: str = ""
    images: list[Image.Image] = field(default_factory=list)


@dataclass(frozen=True)
class PromptConfig:
    min_pixels: int | None = None  # None: the image processor's own bounds
    max_pixels: int | None = None
    max_images: int = 8
    max_text_chars: int = 8000


class PromptError(ValueError):
    """A request that cannot become a prompt; the message is meant for the person who sent it."""


def strip_reasoning(text: str) -> str:
    """Past answers go back into the history without their reasoning, as the model was trained."""
    return _ANSWER_TAGS.sub("", _REASONING.sub("", text)).strip()


class PromptBuilder:
    def __init__(self, tokenizer, image_processor, config: PromptConfig | None = None, system_prompt=None):
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.config = config or PromptConfig()
        self.system_prompt = DEFAULT_SYSTEM_PROMPT if system_prompt is None else system_prompt
        ids = tokenizer.convert_tokens_to_ids
        self.im_start, self.im_end = ids(IM_START), ids(IM_END)
        self.vision_start, self.vision_end, self.image_pad = ids(VISION_START), ids(VISION_END), ids(IMAGE_PAD)
        self.merge = image_processor.merge_size

    def _text(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]

    def _turn(self, role: str, text: str, images: list[int] | None = None) -> list[int]:
        # the role line and the text are one string when nothing sits between them, as the chat
        # template renders it: a byte-level BPE merges "\n" with a leading newline or space
        body = [*self._text(f"{role}\n"), *images, *self._text(text)] if images else self._text(f"{role}\n{text}")
        return [self.im_start, *body, self.im_end, *self._text("\n")]

    def validate(self, messages: list[Message]) -> None:
        if not messages or messages[-1].role != "user":
            raise PromptError("The conversation must end with a user message.")
        last = messages[-1]
        if not last.text.strip() and not last.images:
            raise PromptError("Type a question or attach an image.")
        images = sum(len(m.images) for m in messages)
        if images > self.config.max_images:
            raise PromptError(f"Too many images: {images} in the conversation, at most {self.config.max_images}.")
        for m in messages:
            if len(m.text) > self.config.max_text_chars:
                raise PromptError(
                    f"Message too long: {len(m.text)} characters, at most {self.config.max_text_chars}."
                )

    def build(self, messages: list[Message]) -> dict[str, torch.Tensor]:
        """input_ids, attention_mask, mm_token_type_ids and, with images, pixel_values/image_grid_thw."""
        self.validate(messages)
        images = [img for m in messages for img in m.images]
        vision = {}
        counts: list[int] = []
        if images:
            bounds = {}
            if self.config.min_pixels is not None or self.config.max_pixels is not None:
                own = self.image_processor.size
                bounds["size"] = {"shortest_edge": self.config.min_pixels or own["shortest_edge"],
                                  "longest_edge": self.config.max_pixels or own["longest_edge"]}
            vision = dict(self.image_processor(images=images, return_tensors="pt", **bounds))
            counts = (vision["image_grid_thw"].prod(-1) // self.merge**2).tolist()
        input_ids = torch.tensor([self.token_ids(messages, counts)])
        return dict(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            mm_token_type_ids=(input_ids == self.image_pad).int(),
            **vision,
        )

    def token_ids(self, messages: list[Message], image_tokens: list[int]) -> list[int]:
        """The prompt's ids, given each image's token count (from the processor, or `budget`'s
        count from the image's size alone)."""
        ids: list[int] = []
        if self.system_prompt:
            ids += self._turn("system", self.system_prompt)
        slot = iter(image_tokens)
        for m in messages:
            if m.role == "user":
                images = []
                for _ in m.images:
                    images += [self.vision_start, *[self.image_pad] * next(slot), self.vision_end]
                ids += self._turn("user", m.text, images)
            else:
                ids += self._turn("assistant", strip_reasoning(m.text))
        return ids + [self.im_start, *self._text("assistant\n")]


def left_pad(prompts: list[dict[str, torch.Tensor]], pad_id: int) -> dict[str, torch.Tensor]:
    """Several built prompts (each a batch of one) as one left-padded batch: every row's last prompt
    token sits in the same column, where generation continues. Images stay in row order, as
    Qwen2.5-VL's rope index expects; pad positions have attention 0 and no image tokens."""
    width = max(p["input_ids"].shape[1] for p in prompts)
    batch = {name: torch.full((len(prompts), width), pad_id if name == "input_ids" else 0, dtype=torch.long)
             for name in ("input_ids", "attention_mask", "mm_token_type_ids")}
    for row, prompt in enumerate(prompts):
        n = prompt["input_ids"].shape[1]
        for name, padded in batch.items():
            padded[row, width - n:] = prompt[name][0]
    batch["mm_token_type_ids"] = batch["mm_token_type_ids"].int()
    vision = [p for p in prompts if "pixel_values" in p]
    if vision:
        batch["pixel_values"] = torch.cat([p["pixel_values"] for p in vision])
        batch["image_grid_thw"] = torch.cat([p["image_grid_thw"] for p in vision])
    return batch
