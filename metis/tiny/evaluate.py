"""`python -m metis eval`: the embedded model on the tiny world's held-out split, in every mode.

Measures what the paper claims at miniature scale: the router sends reasoning questions to the
thinking expert, auto mode keeps forced thinking's accuracy with far fewer tokens, and forcing the
direct expert on reasoning questions costs accuracy.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict

from tqdm import tqdm

from ..generation import Engine, GenerationSettings
from ..prompting import Message
from . import world

MODES = ("auto", "think", "direct")
FAMILIES = ("direct", "reasoning")


def evaluate(engine: Engine, limit: int = 300, max_new_tokens: int = 96, progress: bool = True) -> dict:
    samples = world.generate("test", limit)
    correct = {m: defaultdict(int) for m in MODES}
    tokens = {m: 0 for m in MODES}
    seconds = {m: 0.0 for m in MODES}
    routed_right = 0
    thinks = defaultdict(list)
    failures = []
    for sample in tqdm(samples, desc="eval", disable=not progress):
        messages = [Message("user", sample.question, [sample.image])]
        for mode in MODES:
            start = time.perf_counter()
            result = engine.run(messages, GenerationSettings(mode=mode, max_new_tokens=max_new_tokens))
            seconds[mode] += time.perf_counter() - start
            tokens[mode] += result.stats.tokens
            ok = world.answers_match(result.answer, sample.answer)
            correct[mode][sample.family] += ok
            if mode == "auto":
                thinking = result.trace.decision == "think"
                routed_right += thinking == (sample.family == "reasoning")
                thinks[sample.qtype].append(thinking)
                if not ok and len(failures) < 10:
                    failures.append(dict(question=sample.question, gold=sample.answer, got=result.answer,
                                         reasoning=result.reasoning, routed=result.trace.decision))
    count = {f: sum(s.family == f for s in samples) for f in FAMILIES}
    accuracy = {
        m: {**{f: correct[m][f] / max(count[f], 1) for f in FAMILIES},
            "all": sum(correct[m].values()) / len(samples)}
        for m in MODES
    }
    return dict(
        split="test",
        samples=len(samples),
        router_accuracy=routed_right / len(samples),
        accuracy=accuracy,
        mean_tokens={m: tokens[m] / len(samples) for m in MODES},
        seconds_per_query={m: seconds[m] / len(samples) for m in MODES},
        thinking_ratio={q: sum(v) / len(v) for q, v in sorted(thinks.items())},
        auto_token_saving_vs_think=1 - tokens["auto"] / max(tokens["think"], 1),
        examples_of_errors=failures,
    )


def table(report: dict) -> str:
    acc = report["accuracy"]
    lines = [
        f"held-out split: {report['samples']} questions; router accuracy {report['router_accuracy']:.1%}",
        "",
        "| mode | direct family | reasoning family | all | mean tokens | s/query |",
        "|---|---|---|---|---|---|",
    ]
    for m in MODES:
        lines.append(f"| {m} | {acc[m]['direct']:.1%} | {acc[m]['reasoning']:.1%} | {acc[m]['all']:.1%} "
                     f"| {report['mean_tokens'][m]:.1f} | {report['seconds_per_query'][m]:.3f} |")
    lines += ["", f"auto generates {report['auto_token_saving_vs_think']:.1%} fewer tokens than forced think", "",
              "| question type | thinking ratio (auto) |", "|---|---|"]
    lines += [f"| {q} | {r:.0%} |" for q, r in report["thinking_ratio"].items()]
    return "\n".join(lines)


def main(args) -> int:
    engine = Engine.load(args.model)
    report = evaluate(engine, limit=args.limit or 300)
    print(table(report))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return 0
