"""`python -m metis eval`: the embedded model through the engine, on data it never trained on.

Three held-out sets, each answered by the same `Engine` the app uses:
- the template split: test-seed images, questions worded from the training pool of phrasings;
- the unseen-wording split: test-seed images, questions from the held-out test pool of frames,
  prefixes and synonyms (see `phrasing.py`), never trained on and never tuned against;
- natural questions outside the shapes world from the corpus's test templates, routed text-only and
  with an image attached, scored against their think/direct labels.
It measures what the paper claims at miniature scale: the router sends reasoning to the thinking
expert, auto mode keeps forced thinking's accuracy with far fewer tokens, and p_think is calibrated.
"""

from __future__ import annotations

import json
import random
import time
from collections import defaultdict

import torch
from tqdm import tqdm

from ..calibration import expected_calibration_error
from ..prompting import Message
from ..routing import QUERY_MODES
from ..serving.engine import Engine, GenerationSettings
from . import corpus, world
from .data import picture

MODES = QUERY_MODES  # per query; token routing picks no one expert
FAMILIES = ("direct", "reasoning")


def evaluate_shapes(engine: Engine, samples: list[world.Sample], modes=MODES, max_new_tokens: int = 96,
                    progress: bool = True, desc: str = "eval") -> dict:
    """Answers in every mode; routing, accuracy and length per question type, p_think per sample."""
    correct = {m: defaultdict(int) for m in modes}
    per_type = defaultdict(lambda: defaultdict(list))  # qtype -> measure -> values
    tokens = {m: 0 for m in modes}
    seconds = {m: 0.0 for m in modes}
    p_think, labels, failures = [], [], []
    for sample in tqdm(samples, desc=desc, disable=not progress):
        messages = [Message("user", sample.question, [sample.image])]
        for mode in modes:
            start = time.perf_counter()
            result = engine.run(messages, GenerationSettings(mode=mode, max_new_tokens=max_new_tokens))
            seconds[mode] += time.perf_counter() - start
            tokens[mode] += result.stats.tokens
            ok = world.answers_match(result.answer, sample.answer)
            correct[mode][sample.family] += ok
            per_type[sample.qtype][f"correct_{mode}"].append(ok)
            if mode == "auto":
                thinking = result.trace.decision == "think"
                per_type[sample.qtype]["routed_right"].append(thinking == (sample.family == "reasoning"))
                p_think.append(result.trace.p_think)
                labels.append(sample.family == "reasoning")
                if not ok and len(failures) < 10:
                    failures.append(dict(question=sample.question, gold=sample.answer, got=result.answer,
                                         reasoning=result.reasoning, routed=result.trace.decision))
    count = {f: sum(s.family == f for s in samples) for f in FAMILIES}
    mean = lambda values: sum(values) / max(len(values), 1)  # noqa: E731
    return dict(
        samples=len(samples),
        router_accuracy=mean([r for t in per_type.values() for r in t["routed_right"]]),
        accuracy={m: {**{f: correct[m][f] / max(count[f], 1) for f in FAMILIES},
                      "all": sum(correct[m].values()) / len(samples)} for m in modes},
        mean_tokens={m: tokens[m] / len(samples) for m in modes},
        seconds_per_query={m: seconds[m] / len(samples) for m in modes},
        per_type={q: {k: mean(v) for k, v in sorted(t.items())} | {"n": len(t["routed_right"])}
                  for q, t in sorted(per_type.items())},
        auto_token_saving_vs_think=1 - tokens["auto"] / max(tokens["think"], 1) if "think" in modes else None,
        ece=expected_calibration_error(torch.tensor(p_think), torch.tensor(labels)),
        examples_of_errors=failures,
    )


def evaluate_natural(engine: Engine, n: int, answers: int = 40, progress: bool = True) -> dict:
    """Router agreement with the think/direct labels of held-out natural questions, text-only and
    with a picture attached (a shapes image or a random non-shapes picture), and how often the
    model gives its one honest sentence instead of an invented answer."""
    questions = corpus.generate("test", n)
    rng = random.Random("natural-eval-images")
    shapes = world.generate("test", n)
    attachments = {"text_only": [[] for _ in questions],
                   "with_image": [[shapes[i].image] if i % 2 else [picture(rng)] for i in range(n)]}
    report, p_think, labels = {}, [], []
    for setting, images in attachments.items():
        agree, per_kind = 0, defaultdict(list)
        for q, imgs in tqdm(list(zip(questions, images)), desc=f"natural {setting}", disable=not progress):
            trace = engine.route([Message("user", q.text, imgs)])
            agree += trace.decision == q.label
            per_kind[q.kind].append(trace.decision == "think")
            p_think.append(trace.p_think)
            labels.append(q.label == "think")
        report[setting] = agree / n
        report[f"thinking_ratio_{setting}"] = {k: sum(v) / len(v) for k, v in sorted(per_kind.items())}
    refused = sum(engine.run([Message("user", q.text)], GenerationSettings(max_new_tokens=64)).answer == corpus.REFUSAL
                  for q in questions[:answers])
    report.update(samples=n, refusal_rate=refused / max(min(answers, n), 1),
                  ece=expected_calibration_error(torch.tensor(p_think), torch.tensor(labels)))
    return report


def evaluate(engine: Engine, limit: int = 300, natural: int = 400, progress: bool = True) -> dict:
    template = evaluate_shapes(engine, world.generate("test", limit, wording="train"), progress=progress,
                               desc="template split")
    unseen = evaluate_shapes(engine, world.generate("test", limit, wording="test"), progress=progress,
                             desc="unseen wordings")
    return dict(template=template, unseen_wording=unseen, natural=evaluate_natural(engine, natural, progress=progress),
                router_temperature=engine.model.config.router_temperature)


def _split_table(name: str, r: dict) -> list[str]:
    acc = r["accuracy"]
    lines = [f"### {name}: {r['samples']} questions, routing {r['router_accuracy']:.1%}, ECE {r['ece']:.3f}", "",
             "| mode | direct family | reasoning family | all | mean tokens | s/query |", "|---|---|---|---|---|---|"]
    lines += [f"| {m} | {acc[m]['direct']:.1%} | {acc[m]['reasoning']:.1%} | {acc[m]['all']:.1%} "
              f"| {r['mean_tokens'][m]:.1f} | {r['seconds_per_query'][m]:.3f} |" for m in acc]
    if r["auto_token_saving_vs_think"] is not None:
        lines += ["", f"auto generates {r['auto_token_saving_vs_think']:.1%} fewer tokens than forced think"]
    lines += ["", "| question type | n | routed right | auto correct | think correct | direct correct |",
              "|---|---|---|---|---|---|"]
    lines += [f"| {q} | {t['n']} | {t['routed_right']:.0%} | {t.get('correct_auto', 0):.0%} "
              f"| {t.get('correct_think', 0):.0%} | {t.get('correct_direct', 0):.0%} |"
              for q, t in r["per_type"].items()]
    return lines + [""]


def table(report: dict) -> str:
    nat = report["natural"]
    lines = _split_table("Template split", report["template"]) + _split_table("Unseen-wording split",
                                                                             report["unseen_wording"])
    lines += [f"### Natural questions outside the world: {nat['samples']} held-out questions", "",
              f"router agreement with think/direct labels: text only {nat['text_only']:.1%}, "
              f"with an image {nat['with_image']:.1%}; ECE {nat['ece']:.3f}; "
              f"honest refusal {nat['refusal_rate']:.0%}", "",
              "| kind | thinking ratio, text only | with an image |", "|---|---|---|"]
    lines += [f"| {k} | {v:.0%} | {nat['thinking_ratio_with_image'][k]:.0%} |"
              for k, v in nat["thinking_ratio_text_only"].items()]
    lines += ["", f"router temperature (calibration): {report['router_temperature']:.3f}"]
    return "\n".join(lines)


def main(args) -> int:
    engine = Engine.load(args.model)
    report = evaluate(engine, limit=args.limit or 300, natural=args.natural)
    print(table(report))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return 0
