"""Training data for Metis-HOME-Tiny: shapes-world samples and natural questions -> padded batches.

Every training example is built with the same `PromptBuilder` as inference, so the model is trained
on exactly the prompts it will be asked. Samples are drawn fresh from seeds and never repeat; the
stream for step `k` depends only on (seed, stage, k), so a resumed run continues with new data.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from metis.prompting import Message, PromptBuilder, PromptConfig
from metis.tiny import corpus, world

PIXELS = world.IMAGE_SIZE * world.IMAGE_SIZE
MODEL_INPUTS = ("input_ids", "attention_mask", "mm_token_type_ids", "pixel_values", "image_grid_thw")
STAGE_SPAN = 5_000_000  # each stage draws its shapes from its own half of the train seed range
# Weight of the answer's own tokens (between <answer> and </answer>) in the LM loss. A direct answer
# is one token beside five format tokens, and a chain has forty: at weight 1 the one-token answers
# that need the most perception got the least of the loss (colour and shape stayed near 70%).
ANSWER_WEIGHT = 4.0


@dataclass(frozen=True)
class Mix:
    """What a training batch holds besides shapes questions in the thinking/direct formats."""

    natural: float = 0.25  # share of natural (off-world) questions
    natural_image: float = 0.6  # of those, share with an image attached
    direct_think: float = 0.1  # direct shapes questions kept in the thinking format (thinking expert)


def picture(rng: random.Random) -> Image.Image:
    """A random non-shapes picture (noise, gradients, bars, lines, text-like marks) of random size,
    so the router learns that what is in an image does not by itself decide thinking."""
    w, h = rng.choice((112, 160, 224, 320)), rng.choice((112, 160, 224, 320))
    base = tuple(rng.randrange(256) for _ in range(3))
    image = Image.new("RGB", (w, h), base)
    draw = ImageDraw.Draw(image)
    for _ in range(rng.randint(3, 30)):
        colour = tuple(rng.randrange(256) for _ in range(3))
        x0, y0 = rng.randrange(w), rng.randrange(h)
        x1, y1 = min(w, x0 + rng.randint(2, w // 2)), min(h, y0 + rng.randint(2, h // 2))
        kind = rng.randrange(4)
        if kind == 0:
            draw.rectangle((x0, y0, x1, y1), fill=colour)
        elif kind == 1:
            draw.line((x0, y0, x1, y1), fill=colour, width=rng.randint(1, 6))
        elif kind == 2:
            draw.ellipse((x0, y0, x1, y1), outline=colour, width=rng.randint(1, 4))
        else:  # a "line of text": a row of short dark marks
            for x in range(x0, x1, 5):
                draw.line((x, y0, x, y0 + 6), fill=(20, 20, 20), width=2)
    return image


class Encoder:
    """Question (+ image) and target text -> one training example, prompts built as at inference."""

    def __init__(self, tok, image_processor):
        self.tok = tok
        self.answer_tags = tuple(tok.convert_tokens_to_ids(["<answer>", "</answer>"]))
        self.builder = PromptBuilder(
            tok, image_processor, PromptConfig(min_pixels=PIXELS, max_pixels=PIXELS), system_prompt=world.SYSTEM_PROMPT
        )

    def prompt(self, question: str, images: list[Image.Image]) -> dict:
        return self.builder.build([Message("user", question, images)])

    def example(self, question: str, images: list, target: str, expert: int, route_weight: float) -> dict:
        p = self.prompt(question, images)
        ids = self.tok(target + "<|im_end|>", add_special_tokens=False)["input_ids"]
        prompt_ids = p["input_ids"][0].tolist()
        return dict(
            ids=prompt_ids + ids,
            labels=[-100] * len(prompt_ids) + ids,
            weights=[0.0] * len(prompt_ids) + self._answer_weights(ids),
            prompt_len=len(prompt_ids),
            pixel_values=p.get("pixel_values"),
            image_grid_thw=p.get("image_grid_thw"),
            expert=expert,
            route_weight=route_weight,
        )

    def _answer_weights(self, ids: list[int]) -> list[float]:
        begin, end = self.answer_tags
        inside, weights = False, []
        for i in ids:
            inside = (inside or i == begin) and i != end
            weights.append(ANSWER_WEIGHT if inside and i != begin else 1.0)
        return weights

    def shapes(self, sample: world.Sample, thinking: bool, expert: int, route_weight: float) -> dict:
        target = world.format_target(sample, thinking)
        return self.example(sample.question, [sample.image], target, expert, route_weight)


def collate(examples: list[dict], pad_id: int, image_token_id: int) -> dict:
    """Right-padded batch; padding is masked out of attention, the LM loss and the router pooling."""
    T = max(len(e["ids"]) for e in examples)
    B = len(examples)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    labels = torch.full((B, T), -100, dtype=torch.long)
    weights = torch.zeros(B, T)
    attn = torch.zeros(B, T, dtype=torch.long)
    prompt_mask = torch.zeros(B, T, dtype=torch.bool)
    for b, e in enumerate(examples):
        n = len(e["ids"])
        ids[b, :n] = torch.tensor(e["ids"])
        labels[b, :n] = torch.tensor(e["labels"])
        weights[b, :n] = torch.tensor(e["weights"])
        attn[b, :n] = 1
        prompt_mask[b, : e["prompt_len"]] = True
    with_images = [e for e in examples if e["pixel_values"] is not None]
    return dict(
        input_ids=ids,
        attention_mask=attn,
        mm_token_type_ids=(ids == image_token_id).int(),
        pixel_values=torch.cat([e["pixel_values"] for e in with_images]) if with_images else None,
        image_grid_thw=torch.cat([e["image_grid_thw"] for e in with_images]) if with_images else None,
        labels=labels,
        loss_weights=weights,
        prompt_mask=prompt_mask,
        expert=torch.tensor([e["expert"] for e in examples]),
        route_weight=torch.tensor([e["route_weight"] for e in examples]),
    )


class Stream:
    """Seeded training examples for one stage. The dense stage learns every answer in the thinking
    format; the MoE stage sends each question through the expert of its label and trains the router
    on that label (route weight 0 for direct questions kept in the thinking format)."""

    def __init__(self, enc: Encoder, stage: int, seed: int, think_idx: int, mix: Mix):
        self.enc, self.stage, self.seed, self.think_idx, self.mix = enc, stage, seed, think_idx, mix
        self.base = world.SPLIT_BASE["train"] + stage * STAGE_SPAN

    def batch(self, step: int, size: int) -> list[dict]:
        rng = random.Random(f"{self.seed}-{self.stage}-{step}")
        return [self._example(rng) for _ in range(size)]

    def _example(self, rng: random.Random) -> dict:
        moe = self.stage == 2
        think, direct = self.think_idx, 1 - self.think_idx
        if rng.random() < self.mix.natural:
            q = corpus.question(rng, "train")
            images = []
            if rng.random() < self.mix.natural_image:
                images = [world.sample(self.base + rng.randrange(STAGE_SPAN)).image if rng.random() < 0.5
                          else picture(rng)]
            thinking = q.label == "think" or not moe
            return self.enc.example(q.text, images, corpus.target(thinking), think if thinking else direct, 1.0)
        s = world.sample(self.base + rng.randrange(STAGE_SPAN))
        if not moe or s.family == "reasoning":
            return self.enc.shapes(s, True, think, 1.0)
        if rng.random() < self.mix.direct_think:
            return self.enc.shapes(s, True, think, 0.0)
        return self.enc.shapes(s, False, direct, 1.0)


def lm_loss(logits: torch.Tensor, labels: torch.Tensor, per_sample: bool = False,
            weights: torch.Tensor | None = None) -> torch.Tensor:
    """Next-token cross-entropy over the target tokens (labels != -100), weighted per token when
    `weights` (aligned with `labels`) is given."""
    logits, labels = logits[:, :-1].float(), labels[:, 1:]
    ce = F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=-100, reduction="none")
    mask = (labels != -100).float() if weights is None else weights[:, 1:] * (labels != -100)
    if per_sample:
        return (ce * mask).sum(1) / mask.sum(1)
    return (ce * mask).sum() / mask.sum()
