"""Train a tiny Metis-HOME on the shapes world, following the paper's recipe at miniature scale.

Stage 1 trains a dense Qwen2.5-VL from scratch to always think (`<think>chain</think><answer>X`):
the stand-in for the RL-trained dense reasoning model. Stage 2 upcycles it into the two-expert
model and trains both experts and the routers at once: reasoning questions go through the thinking
expert with the chain, direct questions through the direct expert with an empty chain, and every
MoE layer's pooled gate learns to predict that label. A last router stage (`router_stage.py`, a few
minutes) re-fits only the gates on many train-pool questions and keeps the router that routes the
val pools best.

    python -m metis.tiny.train --out assets/metis-home-tiny --minutes 45
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

from metis.modeling import MetisHomeForConditionalGeneration
from metis.tiny import router_stage, world
from metis.tiny.data import MODEL_INPUTS, Encoder, Mix, Stream, collate, lm_loss
from metis.tiny.tokenizer import build_image_processor, build_tokenizer
from metis.tiny.validation import calibrate, check_padding, evaluate, image_spread
from metis.upcycle import upcycle


def dense_config(tok) -> Qwen2_5_VLConfig:
    """About 4.5M parameters (6.6M after upcycling): wide enough for the phrasing variety and the
    natural questions, small enough to train in under two hours on two CPU cores."""
    ids = tok.convert_tokens_to_ids
    text = dict(
        vocab_size=len(tok),
        hidden_size=256,
        intermediate_size=704,
        num_hidden_layers=4,
        num_attention_heads=8,
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
        out_hidden_size=256,
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


def forward(model, batch: dict, moe: bool, router_smoothing: float = 0.0):
    """Returns (total loss, LM loss, router loss or None, router accuracy or None)."""
    inputs = {k: batch[k] for k in MODEL_INPUTS if batch[k] is not None}
    routing = None
    if moe:
        routing = model.new_routing("auto", labels=batch["expert"], prompt_mask=batch["prompt_mask"])
        inputs["routing"] = routing
    logits = model(**inputs, use_cache=False).logits
    lm = lm_loss(logits, batch["labels"], weights=batch["loss_weights"])
    if not moe:
        return lm, lm, None, None
    # Router CE averaged over all MoE layers (each gate must be meaningful); label smoothing keeps
    # the gate's margins finite, so p_think can be calibrated. Route weight 0 (direct questions
    # trained to think) teaches the thinking expert but not the router.
    w = batch["route_weight"]
    ce = torch.stack([F.cross_entropy(layer.float(), batch["expert"], reduction="none",
                                      label_smoothing=router_smoothing) for layer in routing.record.layer_logits])
    router = (ce.mean(0) * w).sum() / w.sum().clamp(min=1)
    acc = ((routing.query_logits.argmax(-1) == batch["expert"]).float() * w).sum() / w.sum().clamp(min=1)
    return lm + router, lm, router, acc.item()


def lr_at(progress: float, step: int, lr: float, warmup: int) -> float:
    """Linear warmup over `warmup` steps, then cosine to 10% by the end of the stage."""
    if step < warmup:
        return lr * (step + 1) / warmup
    return lr * (0.1 + 0.45 * (1 + math.cos(math.pi * min(progress, 1.0))))


def save_optimizer(opt: torch.optim.Optimizer, path: Path) -> None:
    """AdamW state as safetensors (no pickle): one tensor per parameter and moment, the param
    groups as JSON metadata."""
    state = opt.state_dict()
    tensors = {f"{i}.{k}": v.reshape(-1) if v.dim() == 0 else v
               for i, entry in state["state"].items() for k, v in entry.items()}
    save_file(tensors, path, metadata={"param_groups": json.dumps(state["param_groups"])})


def load_optimizer(opt: torch.optim.Optimizer, path: Path) -> None:
    with safe_open(path, "pt") as f:
        groups = json.loads(f.metadata()["param_groups"])
        state: dict[int, dict] = {}
        for name in f.keys():
            i, k = name.split(".", 1)
            v = f.get_tensor(name)
            state.setdefault(int(i), {})[k] = v.reshape(()) if k == "step" else v
    opt.load_state_dict({"state": state, "param_groups": groups})


class Checkpoints:
    """The latest state of a run, so a stopped run resumes where it was (`--resume`)."""

    def __init__(self, out: Path):
        self.dir = out / "checkpoint"

    def save(self, model, opt, state: dict) -> None:
        tmp = self.dir.with_name("checkpoint.tmp")
        model.save_pretrained(tmp / "model")
        save_optimizer(opt, tmp / "optimizer.safetensors")
        (tmp / "state.json").write_text(json.dumps(state, indent=1))
        if self.dir.exists():
            self.dir.rename(self.dir.with_name("checkpoint.old"))
        tmp.rename(self.dir)
        shutil.rmtree(self.dir.with_name("checkpoint.old"), ignore_errors=True)

    def state(self) -> dict | None:
        path = self.dir / "state.json"
        return json.loads(path.read_text()) if path.exists() else None

    def load(self, cls) -> torch.nn.Module:
        return cls.from_pretrained(self.dir / "model", dtype=torch.float32)


def make_optimizer(model, lr: float) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(
        [{"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.01},
         {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.98)
    )


def train_stage(name, model, enc, args, stage: int, seconds: float, max_steps: int | None, lr: float, val,
                ckpt: Checkpoints, resume: dict | None, report: dict) -> dict:
    """Trains until the time budget (or `max_steps`) is spent; the cosine follows that progress."""
    moe = stage == 2
    opt = make_optimizer(model, lr)
    step, done_before, history = 0, 0.0, []
    if resume:
        load_optimizer(opt, ckpt.dir / "optimizer.safetensors")
        step, done_before, history = resume["step"], resume["seconds"], resume["history"]
    params = [p for p in model.parameters() if p.requires_grad]
    stream = Stream(enc, stage, args.seed, model.config.thinking_expert if moe else 0,
                    Mix(args.natural, args.natural_image, args.direct_think))
    pad, image_id = enc.tok.pad_token_id, model.config.image_token_id
    model.train()
    start = time.time() - done_before
    last_save, next_val = time.time(), (step // args.val_every + 1) * args.val_every
    bar = tqdm(desc=name, unit="step", mininterval=5, initial=step)
    while True:
        elapsed = time.time() - start
        progress = step / max_steps if max_steps else elapsed / seconds
        if progress >= 1.0:
            break
        batch = collate(stream.batch(step, args.batch_size), pad, image_id)
        for g in opt.param_groups:
            g["lr"] = lr_at(progress, step, lr, args.warmup)
        loss, lm, router, acc = forward(model, batch, moe, args.router_smoothing)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        post = {"lm": f"{lm.item():.3f}"} | ({"router": f"{router.item():.3f}", "r_acc": f"{acc:.2f}"} if moe else {})
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
        if time.time() - last_save > args.checkpoint_minutes * 60:
            last_save = time.time()
            ckpt.save(model, opt, report | {"stage": stage, "step": step, "seconds": time.time() - start,
                                            "history": history})
    bar.close()
    return {"steps": step, "seconds": round(time.time() - start, 1), "lr": lr, "history": history}


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", help="output folder (a temporary one with --smoke)")
    ap.add_argument("--minutes", type=float, default=90.0, help="total wall time, split between the stages")
    ap.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint")
    ap.add_argument("--stage1-share", type=float, default=0.35)
    ap.add_argument("--steps1", type=int, help="fixed stage-1 steps instead of a time budget (exact reruns)")
    ap.add_argument("--steps2", type=int, help="fixed stage-2 steps instead of a time budget")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr1", type=float, default=1e-3)
    ap.add_argument("--lr2", type=float, default=5e-4)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--natural", type=float, default=0.25, help="share of natural (off-world) questions")
    ap.add_argument("--natural-image", type=float, default=0.6, help="share of natural questions with an image")
    ap.add_argument("--direct-think", type=float, default=0.1,
                    help="share of direct questions kept in the thinking format on the thinking expert")
    ap.add_argument("--router-smoothing", type=float, default=0.05, help="label smoothing of the router loss")
    ap.add_argument("--checkpoint-minutes", type=float, default=5.0)
    ap.add_argument("--val-every", type=int, default=500)
    ap.add_argument("--quick-val", type=int, default=64, help="val samples in periodic checks")
    ap.add_argument("--final-val", type=int, default=200)
    ap.add_argument("--calibration", type=int, default=400, help="val questions per source for calibration")
    ap.add_argument("--router-minutes", type=float, default=4.0,
                    help="budget of the router stage (router_stage.py); 0 skips it")
    ap.add_argument("--router-examples", type=int, default=3000, help="train-pool questions per source, router stage")
    ap.add_argument("--smoke", action="store_true", help="a few steps per stage into --out, for tests")
    args = ap.parse_args(argv)
    if args.smoke:
        args.steps1 = args.steps1 or 3
        args.steps2 = args.steps2 or 3
        args.batch_size, args.warmup, args.quick_val, args.final_val, args.calibration = 4, 2, 8, 8, 8
        args.router_examples, args.router_minutes = 8, 0.1
        args.out = args.out or tempfile.mkdtemp(prefix="metis-tiny-")
    elif not args.out:
        ap.error("--out is required")
    return args


def stage1(args, tok, enc: Encoder, val: list, ckpt: Checkpoints, resume: dict | None, report: dict,
           seconds: float) -> tuple[Qwen2_5_VLForConditionalGeneration, dict]:
    """The dense model learns the world (from scratch, or from its checkpoint)."""
    if resume:
        dense = ckpt.load(Qwen2_5_VLForConditionalGeneration)
    else:
        dense = Qwen2_5_VLForConditionalGeneration(dense_config(tok))
        print(f"dense model: {sum(p.numel() for p in dense.parameters()) / 1e6:.2f}M parameters")
        print(f"padded vs alone max loss difference: {check_padding(dense, enc):.2e}")
    s1 = train_stage("stage1-dense", dense, enc, args, 1, seconds, args.steps1, args.lr1, val, ckpt, resume, report)
    s1["val"] = evaluate(dense, enc, val[: args.quick_val], moe=False)
    print(f"stage 1 done: {s1['steps']} steps, val {json.dumps(s1['val'])}")
    return dense, s1


def stage2(args, model: MetisHomeForConditionalGeneration, enc: Encoder, val: list, ckpt: Checkpoints,
           resume: dict | None, report: dict, seconds: float) -> None:
    """The upcycled model learns to think, answer directly and route; then calibration and the final val."""
    s2 = train_stage("stage2-moe", model, enc, args, 2, seconds, args.steps2, args.lr2, val, ckpt, resume, report)
    report["stage2"] = s2
    report["calibration"] = calibrate(model, enc, args.calibration)
    print(f"calibration: {json.dumps(report['calibration'])}")
    report["final_val"] = evaluate(model.eval(), enc, val[: args.final_val], moe=True)
    report["final_val_samples"] = args.final_val
    print(f"stage 2 done: {s2['steps']} steps, final val {json.dumps(report['final_val'])}")


def save(args, out: Path, model: MetisHomeForConditionalGeneration, tok, image_processor, report: dict,
         t0: float) -> None:
    """The checkpoint folder, then the router stage on it, then training.json."""
    out.mkdir(parents=True, exist_ok=True)
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    model.generation_config.eos_token_id = eos
    model.generation_config.pad_token_id = tok.pad_token_id
    model.config.text_config.eos_token_id = eos
    model.save_pretrained(out)
    tok.save_pretrained(out)
    image_processor.save_pretrained(out)
    if args.router_minutes > 0:
        report["router_stage"] = router_stage.run(out, out, args.router_minutes, args.router_examples,
                                                  args.calibration, args.seed)
        print(f"router stage: val agreement {json.dumps(report['router_stage']['val_agreement_after'])}")
    report["total_seconds"] = round(time.time() - t0, 1)
    (out / "training.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"saved to {out} in {report['total_seconds'] / 60:.1f} min")


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(2)
    torch.manual_seed(args.seed)
    out = Path(args.out)
    ckpt = Checkpoints(out)
    resume = ckpt.state() if args.resume else None
    t0 = time.time() - (resume["seconds"] + resume.get("stage1", {}).get("seconds", 0.0) if resume else 0.0)
    tok = build_tokenizer(args.seed)
    image_processor = build_image_processor()
    enc = Encoder(tok, image_processor)
    val = world.generate("val", max(args.quick_val, args.final_val), wording="val")
    total = args.minutes * 60
    report = {"settings": {k: v for k, v in vars(args).items() if k not in ("out", "resume")}}

    if resume and resume["stage"] == 2:
        report["stage1"] = resume["stage1"]
    else:
        dense, report["stage1"] = stage1(args, tok, enc, val, ckpt, resume, report, total * args.stage1_share)
        resume = None

    if resume:
        model = ckpt.load(MetisHomeForConditionalGeneration)
    else:
        model = upcycle(dense, thinking_expert=0, system_prompt=world.SYSTEM_PROMPT)
        del dense
    print(f"Metis-HOME model: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters")
    # two minutes for calibration and the final val, then the router stage
    budget = total * (1 - args.stage1_share) - 120 - args.router_minutes * 60
    stage2(args, model, enc, val, ckpt, resume, report, budget)
    save(args, out, model, tok, image_processor, report, t0)


if __name__ == "__main__":
    main()
