"""Checks during and after training Metis-HOME-Tiny: answers, router margins, calibration, padding.

These run on model tensors directly (left-padded batches through `generate`), which is faster than
the engine's one-request path; `python -m metis eval` measures the shipped model through the engine.
"""

from __future__ import annotations

import torch

from metis.calibration import expected_calibration_error, fit_temperature
from metis.prompting import left_pad
from metis.routing import expert_index
from metis.streaming import parse_output
from metis.tiny import corpus, world
from metis.tiny.data import MODEL_INPUTS, Encoder, collate, lm_loss


@torch.no_grad()
def image_spread(model, enc: Encoder, samples: list[world.Sample]) -> float:
    """Mean distance of each image's features from the mean image, relative to their norm.
    Near 0 means the vision tower maps every image to the same vector (collapse)."""
    prompts = [enc.prompt(s.question, [s.image]) for s in samples]
    pv = torch.cat([p["pixel_values"] for p in prompts])
    grid = torch.cat([p["image_grid_thw"] for p in prompts])
    feats = torch.stack(model.model.get_image_features(pv, grid).pooler_output).flatten(1)  # [N, 16*hidden]
    return ((feats - feats.mean(0)).norm(dim=1).mean() / feats.norm(dim=1).mean()).item()


@torch.no_grad()
def evaluate(model, enc: Encoder, samples: list[world.Sample], moe: bool, batch_size: int = 32) -> dict:
    """Greedy answers on left-padded batches: exact match per family, router accuracy, length."""
    was_training = model.training
    model.eval()
    tok = enc.tok
    think_idx = model.config.thinking_expert if moe else 0
    stats = {f: [0, 0] for f in ("direct", "reasoning")}
    routed, gen_tokens = 0, 0
    for i in range(0, len(samples), batch_size):
        chunk = samples[i: i + batch_size]
        kwargs = left_pad([enc.prompt(s.question, [s.image]) for s in chunk], tok.pad_token_id)
        T = kwargs["input_ids"].shape[1]
        kwargs.update(max_new_tokens=80, do_sample=False, use_cache=True, pad_token_id=tok.pad_token_id,
                      eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"))
        routing = None
        if moe:
            routing = kwargs["routing"] = model.new_routing("auto", prompt_mask=kwargs["attention_mask"].bool())
        out = model.generate(**kwargs)[:, T:]
        for b, s in enumerate(chunk):
            _, answer, closed = parse_output(tok.decode(out[b], skip_special_tokens=False))
            stats[s.family][0] += closed and world.answers_match(answer.strip(), s.answer)
            stats[s.family][1] += 1
            gen_tokens += int((out[b] != tok.pad_token_id).sum())
            if moe:
                routed += (int(routing.record.expert[b]) == think_idx) == (s.family == "reasoning")
    model.train(was_training)
    result = {f"acc_{f}": c / max(n, 1) for f, (c, n) in stats.items()}
    result["mean_tokens"] = gen_tokens / len(samples)
    if moe:
        result["router_acc"] = routed / len(samples)
    return result


@torch.no_grad()
def router_margins(model, enc: Encoder, items: list[tuple[str, list]], batch_size: int = 64) -> torch.Tensor:
    """Pooled think-minus-direct gate margin of the deciding layer for each (question, images)."""
    was_training = model.training
    model.eval()
    think = model.config.thinking_expert
    margins = []
    for i in range(0, len(items), batch_size):
        inputs = left_pad([enc.prompt(q, imgs) for q, imgs in items[i: i + batch_size]], enc.tok.pad_token_id)
        routing = model.new_routing("auto", prompt_mask=inputs["attention_mask"].bool())
        model(**inputs, routing=routing, use_cache=False)
        logits = routing.query_logits.float()
        margins.append(logits[:, expert_index("think", think)] - logits[:, expert_index("direct", think)])
    model.train(was_training)
    return torch.cat(margins)


def calibration_set(pool: str, n: int) -> tuple[list[tuple[str, list]], torch.Tensor]:
    """Shapes questions and natural questions (half with a shapes image) worded from `pool`, with
    their think (1) / direct (0) labels."""
    shapes = world.generate("val", n, wording=pool)
    natural = corpus.generate(pool, n)
    images = world.generate("val", n)
    items = [(s.question, [s.image]) for s in shapes]
    items += [(q.text, [images[i].image] if i % 2 else []) for i, q in enumerate(natural)]
    labels = [s.family == "reasoning" for s in shapes] + [q.label == "think" for q in natural]
    return items, torch.tensor(labels, dtype=torch.float)


def check_padding(model, enc: Encoder) -> float:
    """A right-padded batch must give each sample the loss it gets alone (3D rope + masks)."""
    model.eval()
    samples = [world.sample(i, f) for i, f in ((1, "direct"), (2, "reasoning"), (3, "reasoning"))]
    examples = [enc.shapes(s, True, 0, 1.0) for s in samples]
    examples.append(enc.example(corpus.generate("train", 1)[0].text, [], corpus.target(True), 0, 1.0))
    pad, image_id = enc.tok.pad_token_id, model.config.image_token_id

    def inputs(batch):
        return {k: batch[k] for k in MODEL_INPUTS if batch[k] is not None}

    with torch.no_grad():
        b = collate(examples, pad, image_id)
        batched = lm_loss(model(**inputs(b)).logits, b["labels"], per_sample=True)
        singles = (collate([e], pad, image_id) for e in examples)
        alone = [lm_loss(model(**inputs(s)).logits, s["labels"]) for s in singles]
    model.train()
    return (batched - torch.stack(alone)).abs().max().item()


def calibrate(model, enc: Encoder, n: int) -> dict:
    """Temperature scaling of the deciding gate on the val wordings (never trained on), so p_think
    means what it says; the test wordings stay untouched for evaluation."""
    items, labels = calibration_set("val", n)
    margins = router_margins(model, enc, items)
    temperature = fit_temperature(margins, labels)
    model.config.router_temperature = temperature
    return {"temperature": temperature, "samples": len(items),
            "ece_before": expected_calibration_error(torch.sigmoid(margins), labels),
            "ece_after": expected_calibration_error(torch.sigmoid(margins / temperature), labels),
            "router_acc": ((margins >= 0).float() == labels).float().mean().item()}
