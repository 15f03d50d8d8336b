"""Router metrics on plain arrays: `p` is the thinking probability, `y` is True where the label is think.

The router routes `think` when `p >= threshold` (see routing.Routing.decide); every function here
uses the same rule so the numbers match what chat will do.
"""

from __future__ import annotations

import numpy as np


def accuracy(p, y, threshold: float = 0.5) -> float:
    p, y = np.asarray(p), np.asarray(y, bool)
    return float(((p >= threshold) == y).mean()) if len(y) else float("nan")


def roc_auc(p, y) -> float:
    """Rank-based (Mann-Whitney) AUC with tied scores sharing their mean rank; NaN for one class."""
    p, y = np.asarray(p, float), np.asarray(y, bool)
    positives, negatives = int(y.sum()), int((~y).sum())
    if not positives or not negatives:
        return float("nan")
    order = np.argsort(p, kind="mergesort")
    ranks = np.empty(len(p))
    ranks[order] = np.arange(1, len(p) + 1)
    _, inverse, counts = np.unique(p, return_inverse=True, return_counts=True)
    mean_rank = np.bincount(inverse, weights=ranks) / counts
    ranks = mean_rank[inverse]
    return float((ranks[y].sum() - positives * (positives + 1) / 2) / (positives * negatives))


def confusion(p, y, threshold: float = 0.5) -> dict[str, int]:
    """Counts keyed "label->routed", e.g. "direct->think" is a perception query sent to think."""
    p, y = np.asarray(p), np.asarray(y, bool)
    routed = p >= threshold
    name = {True: "think", False: "direct"}
    return {f"{name[a]}->{name[b]}": int(((y == a) & (routed == b)).sum())
            for a in (True, False) for b in (True, False)}


def threshold_sweep(p, y, steps: int = 21) -> list[dict[str, float]]:
    """Thinking ratio and accuracy at evenly spaced thresholds: the cost/quality trade-off."""
    p = np.asarray(p)
    return [
        {"threshold": round(float(t), 4), "think_ratio": float((p >= t).mean()), "accuracy": accuracy(p, y, t)}
        for t in np.linspace(0.0, 1.0, steps)
    ]


def threshold_for_ratio(p, ratio: float) -> float:
    """The threshold sending (as near as ties allow) `ratio` of the queries to the thinking expert."""
    p = np.sort(np.asarray(p, float))[::-1]
    k = int(round(ratio * len(p)))
    if k <= 0:
        return float(np.nextafter(p[0], np.inf)) if p[0] < 1.0 else 1.0
    return float(p[min(k, len(p)) - 1])
