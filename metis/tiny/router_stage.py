"""Router stage of Metis-HOME-Tiny: re-fit only the gates, in minutes, after the experts are trained.

Stage 2 learns the router together with the experts, and a router learned that way keys on the
phrasings it saw most. The gates are linear in each MoE layer's pooled input, and those inputs do
not depend on the gates (`metis/finetune/features.py`), so the router can be fitted afresh on many
train-pool questions for the cost of one prefill each, without touching the answers. Candidates
(learning rates, and steps from the current router toward each fitted one) are chosen by routing
agreement on the val pools, with no val source routed worse than before; the router temperature
is re-fitted there, and the test pools stay for `python -m metis eval`.

    python -m metis.tiny.router_stage --model assets/metis-home-tiny --out /tmp/copy --minutes 4
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from metis.calibration import expected_calibration_error, fit_temperature
from metis.finetune.data import Example
from metis.finetune.export import apply_router
from metis.finetune.features import Features, extract_features
from metis.finetune.trainer import RouterTrainer, TrainSettings
from metis.routing import RouterWeights, expert_index
from metis.tiny import corpus, world
from metis.tiny.data import picture

SOURCES = ("shapes", "natural_text", "natural_image")
LEARNING_RATES = (3e-3, 1e-2, 3e-2)
MIXES = (0.25, 0.5, 0.75, 1.0)  # steps from the current router toward a fitted one
NOISE_RATE = 0.5  # share of train-pool questions that lose a few words or gain unknown ones


def _noisy(rng: random.Random, text: str) -> str:
    """The question with a few words dropped, or with one or two made-up words put in: a question
    in new words differs from the train templates in both ways, and the router should then rely on
    all the words it knows rather than on one template word or on a word it never read."""
    words = text.split(" ")
    if rng.random() < 0.5:
        kept = [w for w in words if rng.random() >= 0.15]
        return " ".join(kept or words[:1])
    for _ in range(rng.randint(1, 2)):
        made_up = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 8)))
        words.insert(rng.randrange(len(words) + 1), made_up)
    return " ".join(words)


def build_examples(pool: str, n: int, folder: Path, seed: int = 0) -> tuple[list[Example], list[str]]:
    """`n` shapes questions and `n` natural questions worded from `pool`, labelled think/direct, with
    each one's source. Shapes questions come with their image as in the world. In the train pool a
    natural question gets no image, a shapes image or another picture (as stage 2 mixes them); in the
    val pool each natural question is asked once without and once with an image (as the eval does).
    Images are written to `folder` so the examples are ordinary fine-tuning examples."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(f"router-stage-{pool}-{seed}")
    split = pool  # images from the pool's own seed range of the world
    offset = seed * 1_000_003  # another seed, other images (train pool only: val images stay fixed)

    def saved(image, name: str) -> tuple[Path, ...]:
        path = folder / f"{pool}-{name}.png"
        image.save(path)
        return (path,)

    base = world.SPLIT_BASE[split] + (0 if pool == "val" else offset)
    examples, sources = [], []
    for i in range(n):
        s = world.sample(base + i, ("direct", "reasoning")[i % 2], pool)
        label = "think" if s.family == "reasoning" else "direct"
        text = _noisy(rng, s.question) if pool == "train" and rng.random() < NOISE_RATE else s.question
        examples.append(Example(text, saved(s.image, f"shape-{i}"), label, i))
        sources.append("shapes")
    images = world.generate(split, n) if pool == "val" else None
    for i, q in enumerate(corpus.generate(pool, n, seed)):
        text = _noisy(rng, q.text) if pool == "train" and rng.random() < NOISE_RATE else q.text
        if pool == "val":
            attached = [(), saved(images[i].image if i % 2 else picture(rng), f"nat-{i}")]
        else:
            r = rng.random()
            attached = [() if r < 0.4 else saved(
                world.sample(base + n + i).image if r < 0.7 else picture(rng), f"nat-{i}")]
        for images_of in attached:
            examples.append(Example(text, images_of, q.label, len(examples)))
            sources.append("natural_image" if images_of else "natural_text")
    return examples, sources


def margins(features: Features, gates: torch.Tensor, think: int) -> torch.Tensor:
    """Pooled think-minus-direct margin of the deciding (first MoE) layer's gate, per example."""
    logits = features.inputs[:, 0] @ gates[0].float().T
    return logits[:, expert_index("think", think)] - logits[:, expert_index("direct", think)]


def agreement(m: torch.Tensor, labels: torch.Tensor, sources: list[str]) -> dict:
    """Share of examples routed to their label's expert, per source and their mean."""
    right = (m >= 0) == labels.bool()
    out = {src: right[[s == src for s in sources]].float().mean().item() for src in SOURCES if src in sources}
    out["mean"] = sum(out.values()) / len(out)
    return out


def stacked(router: RouterWeights) -> torch.Tensor:
    return torch.stack([w.float() for w in router.values()])


@dataclass(frozen=True)
class Candidate:
    """A router the stage may keep: its mean val agreement, its gates, and how it was made."""

    agreement: float
    router: RouterWeights
    choice: dict  # {"lr": ..., "mix": ...}; lr None is the router it started from


def train_candidates(train: Features, val: Features, val_sources: list[str], deadline: float,
                     settings: TrainSettings) -> tuple[dict[str, torch.Tensor], list[dict], dict]:
    """Fits one router per learning rate (until `deadline`) and scores, on the val pools, the steps
    from the current router toward each (`MIXES`). Returns the best mean agreement among those
    that route no val source worse than the current router (else the current one), every
    candidate's figures, and the choice."""
    think = train.thinking_expert
    labels = val.targets == think
    current = {k: w.float() for k, w in train.router.items()}

    def score(router: RouterWeights) -> dict:
        return agreement(margins(val, stacked(router), think), labels, val_sources)

    floor = score(current)
    report = [{"lr": None, "mix": 0.0, "val": floor}]
    best = Candidate(floor["mean"], train.router, {"lr": None, "mix": 0.0})
    for lr in LEARNING_RATES:
        if len(report) > 1 and time.time() >= deadline:  # the first one always gets a chance
            break
        cancel = threading.Event()
        timer = threading.Timer(max(deadline - time.time(), 10.0), cancel.set)
        timer.start()
        try:
            trainer = RouterTrainer(train, replace(settings, lr=lr), cancel)
            for _ in trainer:
                pass
            result = trainer.result()
        finally:
            timer.cancel()
        fit = {"best_epoch": result.summary.best_epoch, "cancelled": result.summary.cancelled,
               "train_seconds": round(result.summary.train_seconds, 1)}
        for mix in MIXES:
            router = {k: (w + mix * (result.router[k].float() - w)).to(train.router[k].dtype)
                      for k, w in current.items()}
            scores = score(router)
            report.append({"lr": lr, "mix": mix, **fit, "val": scores})
            if scores["mean"] > best.agreement and all(scores[src] >= floor[src] for src in floor):
                best = Candidate(scores["mean"], router, {"lr": lr, "mix": mix})
    return best.router, report, best.choice


def run(model_dir: str | Path, out: str | Path, minutes: float = 4.0, examples: int = 3000,
        val_examples: int = 400, seed: int = 0, settings: TrainSettings | None = None,
        cache_dir: str | Path | None = None) -> dict:
    """Fit the gates of the checkpoint in `model_dir` and write it to `out` (may be the same
    folder): only the gate weights and `config.router_temperature` change. Returns the report."""
    from metis.modeling import MetisHomeForConditionalGeneration
    from metis.serving.engine import Engine

    start = time.time()
    settings = settings or TrainSettings(epochs=60, batch_size=64, val_fraction=0.1, patience=8, seed=seed)
    engine = Engine.load(str(model_dir))
    think = engine.model.config.thinking_expert
    with tempfile.TemporaryDirectory(prefix="metis-router-stage-") as tmp:
        train_ex, _ = build_examples("train", examples, Path(tmp), seed)
        val_ex, val_sources = build_examples("val", val_examples, Path(tmp))
        train = extract_features(engine, train_ex, cache_dir)
        val = extract_features(engine, val_ex, cache_dir)
    feature_seconds = time.time() - start
    deadline = start + minutes * 60
    router, candidates, chosen = train_candidates(train, val, val_sources, deadline, settings)

    labels = (val.targets == think).float()
    before, after = margins(val, stacked(train.router), think), margins(val, stacked(router), think)
    old_t = engine.model.config.router_temperature
    temperature = fit_temperature(after, labels)

    model = MetisHomeForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32)
    apply_router(model, router)
    model.config.router_temperature = temperature
    out = Path(out)
    if out.resolve() != Path(model_dir).resolve():
        shutil.copytree(model_dir, out, dirs_exist_ok=True)
    model.save_pretrained(out)
    # the config as it was but for the temperature (loading adds keys such as sub-config dtypes)
    config = json.loads((Path(model_dir) / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "router_temperature": temperature}, indent=2,
                                                sort_keys=True) + "\n")
    return {
        "examples": {"train": len(train_ex), "val": len(val_ex)},
        "settings": {**asdict(settings), "learning_rates": list(LEARNING_RATES), "mixes": list(MIXES),
                     "noise_rate": NOISE_RATE, "minutes": minutes},
        "candidates": candidates,
        "chosen": chosen,
        "val_agreement_before": agreement(before, labels, val_sources),
        "val_agreement_after": agreement(after, labels, val_sources),
        "temperature_before": old_t,
        "temperature": temperature,
        "val_ece_before": expected_calibration_error(torch.sigmoid(before / old_t), labels),
        "val_ece_after": expected_calibration_error(torch.sigmoid(after / temperature), labels),
        "feature_seconds": round(feature_seconds, 1),
        "seconds": round(time.time() - start, 1),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="Metis-HOME checkpoint folder")
    ap.add_argument("--out", help="where to write the checkpoint (default: over --model)")
    ap.add_argument("--minutes", type=float, default=4.0, help="time budget for fitting the candidates")
    ap.add_argument("--examples", type=int, default=3000, help="shapes and natural train-pool questions, each")
    ap.add_argument("--val-examples", type=int, default=400, help="shapes and natural val-pool questions, each")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cache-dir", help="keep the extracted features here (re-runs skip the prefills)")
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    out = Path(args.out or args.model)
    report = run(args.model, out, args.minutes, args.examples, args.val_examples, args.seed, cache_dir=args.cache_dir)
    training = out / "training.json"
    if training.exists():
        record = json.loads(training.read_text())
        record["router_stage"] = report
        training.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps({k: report[k] for k in ("val_agreement_before", "val_agreement_after", "temperature",
                                             "val_ece_after", "seconds")}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
