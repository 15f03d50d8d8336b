"""What the three runs say: per mode, per category, and the trade-off curve of auto routing.

The curve needs no more generation: auto routing at threshold t answers a question with the
thinking expert where its p_think >= t and with the direct one otherwise (routing.py), and with
greedy decoding those answers are the think and direct runs' own. So the point at t takes each
question's outcome from the think run or the direct run by the p_think the auto run recorded.
t = 0 is always thinking; t above every p_think is always answering directly.
"""

from __future__ import annotations

from collections import defaultdict

from .dataset import LABELS
from .runner import MODES, Outcome, Results

GRID = tuple(i / 20 for i in range(21))  # thresholds of the curve, with the one in use added


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else 0.0


def summary(outcomes: list[Outcome]) -> dict:
    """Accuracy, mean tokens, mean seconds and the share answered by the thinking expert."""
    return {"questions": len(outcomes),
            "accuracy": _mean(o.correct for o in outcomes),
            "mean_tokens": _mean(o.tokens for o in outcomes),
            "mean_seconds": _mean(o.seconds for o in outcomes),
            "think_share": _mean(o.decision == "think" for o in outcomes),
            "errors": sum(o.error is not None for o in outcomes)}


def p_think(results: Results, index: int) -> float:
    """The router's p_think of a question: the auto run's, else a forced run's (same prefill)."""
    for mode in MODES:
        if (p := results.outcomes[mode][index].p_think) is not None:
            return p
    return 0.0  # every run of it failed: it counts as answered directly


def routed(results: Results, threshold: float) -> list[Outcome]:
    """Auto routing at `threshold`, rebuilt from the think and direct runs."""
    think, direct = results.outcomes["think"], results.outcomes["direct"]
    return [think[i] if p_think(results, i) >= threshold else direct[i] for i in range(len(results.questions))]


def curve(results: Results) -> list[dict]:
    thresholds = sorted(set(GRID) | {results.settings.threshold})
    return [{"threshold": t} | {k: v for k, v in summary(routed(results, t)).items() if k != "questions"}
            for t in thresholds]


def _category(results: Results, indices: list[int], label: str | None) -> dict:
    out = {"questions": len(indices), "label": label,
           "modes": {m: summary([results.outcomes[m][i] for i in indices]) for m in MODES}}
    if label:
        out["routing_agreement"] = _mean(results.outcomes["auto"][i].decision == label for i in indices)
    return out


def categories(results: Results) -> dict:
    """Each category, then `think` and `direct` for all questions labelled so (when categories
    carry labels: `think/…`, `direct/…`)."""
    groups: dict[str, list[int]] = defaultdict(list)
    for i, q in enumerate(results.questions):
        if q.category:
            groups[q.category].append(i)
    labels = {q.category: q.label for q in results.questions if q.category}
    for label in LABELS:
        members = [i for i, q in enumerate(results.questions) if q.label == label]
        if members and label not in groups:
            groups[label], labels[label] = members, label
    return {name: _category(results, indices, labels[name]) for name, indices in sorted(groups.items())}


def report(results: Results) -> dict:
    """The JSON report: `modes`, `categories`, `curve` and what the runs were."""
    return {"questions": len(results.questions), "threshold": results.settings.threshold,
            "max_new_tokens": results.settings.max_new_tokens, "wall_seconds": results.seconds,
            "modes": {m: summary(list(results.outcomes[m])) for m in MODES},
            "categories": categories(results), "curve": curve(results)}


ROW_HEADERS = ("line", "question", "category", "mode", "answer", "expected", "correct", "tokens", "seconds",
               "p_think", "expert", "error")


def rows(results: Results) -> list[list]:
    """Per question and mode, for the download."""
    return [[q.line, q.prompt(), q.category or "", o.mode, o.answer, q.answer, o.correct, o.tokens,
             round(o.seconds, 3), None if o.p_think is None else round(o.p_think, 4), o.decision or "", o.error or ""]
            for mode in MODES for q, o in zip(results.questions, results.outcomes[mode])]


MODE_HEADERS = ("mode", "accuracy", "mean tokens", "mean seconds", "think share")
CATEGORY_HEADERS = ("category", "questions", "auto accuracy", "think accuracy", "direct accuracy",
                    "auto mean tokens", "think mean tokens", "auto think share", "routing agreement")


def mode_table(rep: dict) -> list[list]:
    return [[m, round(s["accuracy"], 4), round(s["mean_tokens"], 2), round(s["mean_seconds"], 3),
             round(s["think_share"], 4)] for m, s in rep["modes"].items()]


def category_table(rep: dict) -> list[list]:
    def row(name: str, c: dict) -> list:
        auto, think, direct = (c["modes"][m] for m in MODES)
        agreement = c.get("routing_agreement")
        return [name, c["questions"], round(auto["accuracy"], 4), round(think["accuracy"], 4),
                round(direct["accuracy"], 4), round(auto["mean_tokens"], 2), round(think["mean_tokens"], 2),
                round(auto["think_share"], 4), None if agreement is None else round(agreement, 4)]

    return [row(name, c) for name, c in rep["categories"].items()]
