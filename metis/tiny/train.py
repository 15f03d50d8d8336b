"""Train a tiny Metis-HOME on the shapes world, following the paper's recipe at miniature scale.

Stage 1 trains a dense Qwen2.5-VL from scratch to always think (`<think>chain</think><answer>X`):
the stand-in for the RL-trained dense reasoning model. Stage 2 upcycles it into the two-expert
model and trains both experts and the routers at once: reasoning questions go through the thinking
expert with the chain, direct questions through the direct expert with an empty chain, and every
MoE layer's pooled gate learns to predict that label.

    python -m metis.tiny.train --out assets/metis-home-tiny --minutes 45
"""

from __future__ import annotations

import argparse
import json
import math
import random
import re
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

from metis.modeling import MetisHomeForConditionalGeneration
from metis.prompting import Message, PromptBuilder, PromptConfig
from metis.tiny import world
from metis.tiny.tokenizer import build_image_processor, build_tokenizer
from metis.upcycle import upcycle

PIXELS = world.IMAGE_SIZE * world.IMAGE_SIZE
STAGE_SPAN = 5_000_000  # each stage draws its samples from its own half of the train seed range
_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.S)


def dense_config(tok) -> Qwen2_5_VLConfig:
    """About 2.7M parameters: the size measured to train at ~4 steps/s on two CPU cores."""
    ids = tok.convert_tokens_to_ids
    text = dict(
        vocab_size=len(tok),
        hidden_size=192,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=6,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rope_scaling={"rope_type": "default", "mrope_section": [4, 6, 6]},  # sums to head_dim / 2
        eos_token_id=ids("<|im_end|>"),
        bos_token_id=ids("<|endoftext|>"),
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
    )
    vision = dict(
        depth=3,
        hidden_size=128,
        intermediate_size=384,
        num_heads=4,
        out_hidden_size=192,
        patch_size=14,
        spatial_merge_size=2,
        temporal_patch_size=2,
        window_size=112,  # one window covers the whole image
        fullatt_block_indexes=[2],
    )
    config = Qwen2_5_VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
        tie_word_embeddings=False,
    )
    config._attn_implementation = "sdpa"
    return config


class Encoder:
    """Sample -> training example: prompt ids from PromptBuilder (as at inference) + target ids."""

    def __init__(self, tok, image_processor):
        self.tok = tok
        self.builder = PromptBuilder(
            tok, image_processor, PromptConfig(min_pixels=PIXELS, max_pixels=PIXELS), system_prompt=world.SYSTEM_PROMPT
        )

    def prompt(self, sample: world.Sample) -> dict:
        return self.builder.build([Message("user", sample.question, [sample.image])])

    def example(self, sample: world.Sample, thinking: bool, expert: int, route_weight: float) -> dict:
        p = self.prompt(sample)
        target = self.tok(world.format_target(sample, thinking) + "<|im_end|>", add_special_tokens=False)["input_ids"]
        prompt_ids = p["input_ids"][0].tolist()
        return dict(
            ids=prompt_ids + target,
            labels=[-100] * len(prompt_ids) + target,
            prompt_len=len(prompt_ids),
            pixel_values=p["pixel_values"],
            image_grid_thw=p["image_grid_thw"],
            expert=expert,
            route_weight=route_weight,
        )


def collate(examples: list[dict], pad_id: int, image_token_id: int) -> dict:
    """Right-padded batch; padding is masked out of attention, the LM loss and the router pooling."""
    T = max(len(e["ids"]) for e in examples)
    B = len(examples)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    labels = torch.full((B, T), -100, dtype=torch.long)
    attn = torch.zeros(B, T, dtype=torch.long)
    prompt_mask = torch.zeros(B, T, dtype=torch.bool)
    for b, e in enumerate(examples):
        n = len(e["ids"])
        ids[b, :n] = torch.tensor(e["ids"])
        labels[b, :n] = torch.tensor(e["labels"])
        attn[b, :n] = 1
        prompt_mask[b, : e["prompt_len"]] = True
    return dict(
        input_ids=ids,
        attention_mask=attn,
        mm_token_type_ids=(ids == image_token_id).int(),
        pixel_values=torch.cat([e["pixel_values"] for e in examples]),
        image_grid_thw=torch.cat([e["image_grid_thw"] for e in examples]),
        labels=labels,
        prompt_mask=prompt_mask,
        expert=torch.tensor([e["expert"] for e in examples]),
        route_weight=torch.tensor([e["route_weight"] for e in examples]),
    )


def lm_loss(logits: torch.Tensor, labels: torch.Tensor, per_sample: bool = False) -> torch.Tensor:
    """Next-token cross-entropy over the target tokens (labels != -100)."""
    logits, labels = logits[:, :-1].float(), labels[:, 1:]
    ce = F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=-100, reduction="none")
    mask = (labels != -100).float()
    if per_sample:
        return (ce * mask).sum(1) / mask.sum(1)
    return (ce * mask).sum() / mask.sum()


def forward(model, batch: dict, moe: bool):
    """Returns (total loss, LM loss, router loss or None, router accuracy or None, logits)."""
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "mm_token_type_ids", "pixel_values", "image_grid_thw")}
    routing = None
    if moe:
        routing = model.new_routing("auto", labels=batch["expert"], prompt_mask=batch["prompt_mask"])
        inputs["routing"] = routing
    logits = model(**inputs, use_cache=False).logits
    lm = lm_loss(logits, batch["labels"])
    if not moe:
        return lm, lm, None, None, logits
    # Router CE averaged over all MoE layers (each gate must be meaningful); samples with route
    # weight 0 (direct questions trained to think) teach the thinking expert but not the router.
    w = batch["route_weight"]
    ce = torch.stack([F.cross_entropy(l.float(), batch["expert"], reduction="none") for l in routing.layer_logits])
    router = (ce.mean(0) * w).sum() / w.sum().clamp(min=1)
    acc = ((routing.query_logits.argmax(-1) == batch["expert"]).float() * w).sum() / w.sum().clamp(min=1)
    return lm + router, lm, router, acc.item(), logits


class Stream:
    """Endless seeded stream of fresh training samples (rendering costs ~0.05 ms, processing ~0.5 ms
    per image, small next to a ~250 ms step), so the model never sees the same image twice."""

    def __init__(self, stage: int, seed: int):
        self.rng = random.Random(seed * 1000 + stage)
        self.base = world.SPLIT_BASE["train"] + stage * STAGE_SPAN

    def next(self) -> world.Sample:
        return world.sample(self.base + self.rng.randrange(STAGE_SPAN))


def stage_examples(stream: Stream, enc: Encoder, n: int, moe: bool, think_idx: int, direct_think: float) -> list[dict]:
    out = []
    for _ in range(n):
        s = stream.next()
        if not moe:  # dense stage: everything in the thinking format
            out.append(enc.example(s, True, think_idx, 1.0))
        elif s.family == "reasoning":
            out.append(enc.example(s, True, think_idx, 1.0))
        elif stream.rng.random() < direct_think:
            out.append(enc.example(s, True, think_idx, 0.0))
        else:
            out.append(enc.example(s, False, 1 - think_idx, 1.0))
    return out


@torch.no_grad()
def image_spread(model, enc: Encoder, samples: list[world.Sample]) -> float:
    """Mean distance of each image's features from the mean image, relative to their norm.
    Near 0 means the vision tower maps every image to the same vector (collapse)."""
    prompts = [enc.prompt(s) for s in samples]
    pv = torch.cat([p["pixel_values"] for p in prompts])
    grid = torch.cat([p["image_grid_thw"] for p in prompts])
    feats = torch.stack(model.model.get_image_features(pv, grid).pooler_output).flatten(1)  # [N, 16*hidden]
    return ((feats - feats.mean(0)).norm(dim=1).mean() / feats.norm(dim=1).mean()).item()


@torch.no_grad()
def evaluate(model, enc: Encoder, samples: list[world.Sample], moe: bool, batch_size: int = 32) -> dict:
    """Greedy answers, left-padded batches; exact match per family, router accuracy, chain length."""
    was_training = model.training
    model.eval()
    tok = enc.tok
    think_idx = model.config.thinking_expert if moe else 0
    stats = {f: [0, 0] for f in ("direct", "reasoning")}
    routed, gen_tokens = 0, 0
    for i in range(0, len(samples), batch_size):
        chunk = samples[i : i + batch_size]
        prompts = [enc.prompt(s) for s in chunk]
        T = max(p["input_ids"].shape[1] for p in prompts)
        ids = torch.full((len(chunk), T), tok.pad_token_id, dtype=torch.long)
        attn = torch.zeros(len(chunk), T, dtype=torch.long)
        for b, p in enumerate(prompts):
            n = p["input_ids"].shape[1]
            ids[b, T - n :] = p["input_ids"][0]
            attn[b, T - n :] = 1
        kwargs = dict(
            input_ids=ids,
            attention_mask=attn,
            mm_token_type_ids=(ids == model.config.image_token_id).int(),
            pixel_values=torch.cat([p["pixel_values"] for p in prompts]),
            image_grid_thw=torch.cat([p["image_grid_thw"] for p in prompts]),
            max_new_tokens=80,
            do_sample=False,
            use_cache=True,
            eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"),
            pad_token_id=tok.pad_token_id,
        )
        routing = None
        if moe:
            routing = model.new_routing("auto", prompt_mask=attn.bool())
            kwargs["routing"] = routing
        out = model.generate(**kwargs)[:, T:]
        for b, s in enumerate(chunk):
            text = tok.decode(out[b], skip_special_tokens=False)
            m = _ANSWER.search(text)
            stats[s.family][0] += bool(m) and world.answers_match(m.group(1), s.answer)
            stats[s.family][1] += 1
            gen_tokens += int((out[b] != tok.pad_token_id).sum())
            if moe:
                routed += (int(routing.expert[b]) == think_idx) == (s.family == "reasoning")
    model.train(was_training)
    result = {f"acc_{f}": c / max(n, 1) for f, (c, n) in stats.items()}
    result["mean_tokens"] = gen_tokens / len(samples)
    if moe:
        result["router_acc"] = routed / len(samples)
    return result


def lr_at(progress: float, step: int, lr: float, warmup: int) -> float:
    """Linear warmup over `warmup` steps, then cosine to 10% by the end of the stage."""
    if step < warmup:
        return lr * (step + 1) / warmup
    return lr * (0.1 + 0.45 * (1 + math.cos(math.pi * min(progress, 1.0))))


def train_stage(name, model, enc, args, stage: int, seconds: float, max_steps: int | None, lr: float, val) -> dict:
    """Trains until the time budget (or `max_steps`) is spent; the cosine follows that progress."""
    moe = stage == 2
    think_idx = model.config.thinking_expert if moe else 0
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.98)
    )
    stream = Stream(stage, args.seed)
    pad, image_id = enc.tok.pad_token_id, model.config.image_token_id
    model.train()
    start, step, history = time.time(), 0, []
    next_val = args.val_every
    bar = tqdm(desc=name, unit="step", mininterval=5)
    while True:
        elapsed = time.time() - start
        progress = step / max_steps if max_steps else elapsed / seconds
        if progress >= 1.0:
            break
        batch = collate(
            stage_examples(stream, enc, args.batch_size, moe, think_idx, args.direct_think), pad, image_id
        )
        for g in opt.param_groups:
            g["lr"] = lr_at(progress, step, lr, args.warmup)
        loss, lm, router, acc, _ = forward(model, batch, moe)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        post = {"lm": f"{lm.item():.3f}"}
        if moe:
            post |= {"router": f"{router.item():.3f}", "r_acc": f"{acc:.2f}"}
        bar.set_postfix(post, refresh=False)
        bar.update()
        if step % 50 == 0 or step == 1:
            history.append({"step": step, "seconds": round(elapsed, 1), "lm": round(lm.item(), 4)}
                           | ({"router": round(router.item(), 4), "router_acc": acc} if moe else {}))
        if step == 100 or (args.smoke and step == 2):
            tqdm.write(f"[{name}] step {step}: image feature spread {image_spread(model, enc, val[:16]):.3f}")
        if step >= next_val and not args.smoke:
            next_val += args.val_every
            metrics = evaluate(model, enc, val[: args.quick_val], moe)
            tqdm.write(f"[{name}] step {step} ({elapsed / 60:.1f} min) lm {lm.item():.3f} val {json.dumps(metrics)}")
    bar.close()
    return {"steps": step, "seconds": round(time.time() - start, 1), "lr": lr, "history": history}


def check_padding(model, enc: Encoder) -> float:
    """A right-padded batch must give each sample the loss it gets alone (3D rope + masks)."""
    model.eval()
    samples = [world.sample(i, f) for i, f in ((1, "direct"), (2, "reasoning"), (3, "reasoning"))]
    examples = [enc.example(s, True, 0, 1.0) for s in samples]
    pad, image_id = enc.tok.pad_token_id, model.config.image_token_id
    with torch.no_grad():
        b = collate(examples, pad, image_id)
        keys = ("input_ids", "attention_mask", "mm_token_type_ids", "pixel_values", "image_grid_thw")
        batched = lm_loss(model(**{k: b[k] for k in keys}).logits, b["labels"], per_sample=True)
        alone = []
        for e in examples:
            s = collate([e], pad, image_id)
            alone.append(lm_loss(model(**{k: s[k] for k in keys}).logits, s["labels"]))
    model.train()
    return (batched - torch.stack(alone)).abs().max().item()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", help="output folder (a temporary one with --smoke)")
    ap.add_argument("--minutes", type=float, default=45.0, help="total wall time, split between the stages")
    ap.add_argument("--stage1-share", type=float, default=0.4)
    ap.add_argument("--steps1", type=int, help="fixed stage-1 steps instead of a time budget (exact reruns)")
    ap.add_argument("--steps2", type=int, help="fixed stage-2 steps instead of a time budget")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr1", type=float, default=1e-3)
    ap.add_argument("--lr2", type=float, default=5e-4)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--direct-think", type=float, default=0.1,
                    help="share of direct questions kept in the thinking format on the thinking expert")
    ap.add_argument("--val-every", type=int, default=500)
    ap.add_argument("--quick-val", type=int, default=64, help="val samples in periodic checks")
    ap.add_argument("--final-val", type=int, default=200)
    ap.add_argument("--smoke", action="store_true", help="a few steps per stage into --out, for tests")
    args = ap.parse_args(argv)
    if args.smoke:
        args.steps1 = args.steps1 or 3
        args.steps2 = args.steps2 or 3
        args.batch_size, args.warmup, args.quick_val, args.final_val = 4, 2, 8, 8
        args.out = args.out or tempfile.mkdtemp(prefix="metis-tiny-")
    elif not args.out:
        ap.error("--out is required")

    torch.set_num_threads(2)
    torch.manual_seed(args.seed)
    t0 = time.time()
    tok = build_tokenizer(args.seed)
    image_processor = build_image_processor()
    enc = Encoder(tok, image_processor)
    val = world.generate("val", max(args.quick_val, args.final_val))

    dense = Qwen2_5_VLForConditionalGeneration(dense_config(tok))
    print(f"dense model: {sum(p.numel() for p in dense.parameters()) / 1e6:.2f}M parameters")
    print(f"padded vs alone max loss difference: {check_padding(dense, enc):.2e}")
    budget = args.minutes * 60 - (time.time() - t0)
    s1 = train_stage("stage1-dense", dense, enc, args, 1, budget * args.stage1_share, args.steps1, args.lr1, val)
    s1["val"] = evaluate(dense, enc, val[: args.quick_val], moe=False)
    print(f"stage 1 done: {s1['steps']} steps, val {json.dumps(s1['val'])}")

    model = upcycle(dense, thinking_expert=0, system_prompt=world.SYSTEM_PROMPT)
    del dense
    print(f"Metis-HOME model: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters")
    budget = args.minutes * 60 - (time.time() - t0)
    s2 = train_stage("stage2-moe", model, enc, args, 2, budget - 60, args.steps2, args.lr2, val)  # 60 s for final val
    final = evaluate(model.eval(), enc, val[: args.final_val], moe=True)
    print(f"stage 2 done: {s2['steps']} steps, final val {json.dumps(final)}")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    model.generation_config.eos_token_id = eos
    model.generation_config.pad_token_id = tok.pad_token_id
    model.config.text_config.eos_token_id = eos
    model.save_pretrained(out)
    tok.save_pretrained(out)
    image_processor.save_pretrained(out)
    settings = {k: v for k, v in vars(args).items() if k != "out"}
    report = {"settings": settings, "stage1": s1, "stage2": s2, "final_val": final,
              "final_val_samples": args.final_val, "total_seconds": round(time.time() - t0, 1)}
    (out / "training.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"saved to {out} in {report['total_seconds'] / 60:.1f} min")


if __name__ == "__main__":
    main()
