"""Why the router chose: each prompt token's exact share of the decision.

The query decision pools the deciding gate's per-token logits with a mean over the prompt, so
token i contributes `(logit_think_i - logit_direct_i) / (N * T)` to logit(p_think), and the
contributions add up to it exactly (T is the calibration temperature; 1 where none was fitted).
No gradients, no sampling: the same arithmetic on the tiny model and on the real checkpoint.
"""

from __future__ import annotations

import dataclasses

import torch

from .routing import Routing, RoutingTrace


def explain(trace: RoutingTrace, routing: Routing, input_ids: torch.Tensor, tokenizer, *, image_token_id: int,
            image_grid_thw: torch.Tensor | None, merge: int, sample: int = 0) -> RoutingTrace:
    """`trace` with `contributions`, per-image score grids and the span of the user's question."""
    if routing.record.token_logits is None:  # a model without MoE layers routed nothing
        return trace
    ids = input_ids[sample]
    if routing.prompt_mask is not None:
        ids = ids[routing.prompt_mask[sample].to(ids.device)]
    ids = ids.tolist()
    scores = routing.token_scores(sample).tolist()
    tokens = tokenizer.convert_ids_to_tokens(ids)
    contributions = [
        {"token": "<image>" if i == image_token_id else _readable(tokenizer, t),
         "kind": "image" if i == image_token_id else "text", "score": s}
        for i, t, s in zip(ids, tokens, scores)
    ]
    return dataclasses.replace(
        trace, contributions=contributions,
        image_grids=_image_grids(ids, scores, image_token_id, image_grid_thw, merge),
        question=_question_span(ids, tokenizer, image_token_id),
    )


def strongest(trace: RoutingTrace, k: int = 5) -> dict[str, list[dict]]:
    """The k text tokens that pushed hardest toward each expert."""
    text = [c for c in trace.contributions or [] if c["kind"] == "text"]
    ranked = sorted(text, key=lambda c: c["score"])
    return {"think": [c for c in reversed(ranked[-k:]) if c["score"] > 0],
            "direct": [c for c in ranked[:k] if c["score"] < 0]}


def _readable(tokenizer, token: str) -> str:
    """A byte-level BPE piece ('Ġcircles') as the text it stands for (' circles')."""
    return tokenizer.convert_tokens_to_string([token])


def _image_grids(ids: list[int], scores: list[float], image_token_id: int, grid_thw: torch.Tensor | None,
                 merge: int) -> list[list[list[float]]]:
    """Image tokens come in the vision tower's output order, one per merged patch, row-major."""
    if grid_thw is None:
        return []
    image_scores = iter(s for i, s in zip(ids, scores) if i == image_token_id)
    grids = []
    for t, h, w in grid_thw.tolist():
        rows, cols = h // merge, w // merge
        grids.append([[next(image_scores) for _ in range(cols)] for _ in range(rows * t)])
    return grids


def _question_span(ids: list[int], tokenizer, image_token_id: int) -> tuple[int, int] | None:
    """Positions of the last user turn's text: after its role line and images, before <|im_end|>."""
    im_start, im_end = tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    starts = [i for i, t in enumerate(ids) if t == im_start]
    if len(starts) < 2:
        return None
    begin = starts[-2] + 1 + len(tokenizer("user\n", add_special_tokens=False)["input_ids"])
    vision_end = tokenizer.convert_tokens_to_ids("<|vision_end|>")
    end = next((i for i in range(begin, len(ids)) if ids[i] == im_end), len(ids))
    last_vision = max((i for i in range(begin, end) if ids[i] in (vision_end, image_token_id)), default=begin - 1)
    return (last_vision + 1, end)
