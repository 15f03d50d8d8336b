"""`python -m metis finetune --data FILE --out DIR`: train a router, write router.safetensors + metrics.json.

Exit status 0 on success, 2 when the dataset is invalid (every bad line listed on stderr), 130 when
interrupted. Under `accelerate launch -m metis finetune ...` each process loads the model onto its
own device, extracts the features of its own shard of the examples, and the shards are gathered
before training; one process writes the results.

The model comes from the caller (`load_engine`, `Engine.load` from `python -m metis`): fine-tuning
needs only a backend that extracts features, and serving imports fine-tuning, not the reverse.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from tqdm import tqdm

from .data import DatasetError, load_dataset
from .features import Features, extract_features
from .trainer import RouterTrainer, TrainSettings


def add_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = TrainSettings()
    parser.add_argument("--data", required=True, help="dataset: .jsonl or .csv (text, images, label)")
    parser.add_argument("--out", required=True, help="output folder for router.safetensors and metrics.json")
    parser.add_argument("--model", default=None, help="checkpoint folder or Hub id (default: embedded tiny model)")
    parser.add_argument("--epochs", type=int, default=defaults.epochs)
    parser.add_argument("--lr", type=float, default=defaults.lr)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--val-fraction", type=float, default=defaults.val_fraction)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--patience", type=int, default=defaults.patience, help="early stopping; 0 disables")
    parser.add_argument("--target-ratio", type=float, default=None,
                        help="also report the threshold that sends this share of queries to thinking")
    parser.add_argument("--cache-dir", default=None, help="keep extracted features here for later runs")
    parser.add_argument("--save-model", default=None, help="also save a full checkpoint with the new router here")


def process_device(state) -> str | None:
    """Under `accelerate launch`, this process's own device (a whole copy of the model per GPU);
    alone, None: the model spreads over every visible GPU."""
    return str(state.device) if state.num_processes > 1 else None


def process_features(engine, examples: list, cache_dir: str | None, state) -> Features:
    """The features of this process's contiguous shard of the examples (all of them when alone)."""
    with state.split_between_processes(examples) as shard, \
            tqdm(total=len(shard), desc=f"features {state.process_index}", unit="ex") as bar:
        return extract_features(engine, shard, cache_dir, lambda i, n: bar.update(i - bar.n))


def main(args: argparse.Namespace, load_engine: Callable) -> int:
    """`load_engine(model, device=...)` loads the backend once the dataset has passed its checks."""
    try:
        settings = TrainSettings(epochs=args.epochs, lr=args.lr, batch_size=args.batch_size,
                                 val_fraction=args.val_fraction, seed=args.seed, patience=args.patience,
                                 target_ratio=args.target_ratio)
        examples = load_dataset(args.data)
    except DatasetError as exc:
        print(f"error: {len(exc.problems)} problem(s) in {args.data}:", file=sys.stderr)
        for problem in exc.problems:
            print(f"  {problem}", file=sys.stderr)
        return 2
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    from accelerate import PartialState
    from accelerate.utils import gather_object

    state = PartialState()
    engine = load_engine(args.model, device=process_device(state))
    try:
        mine = process_features(engine, examples, args.cache_dir, state)
        features = Features.concat(gather_object([mine]))  # in process order: the examples' order
        trainer = RouterTrainer(features, settings)
        with tqdm(total=settings.epochs, desc="epochs", unit="ep") as bar:
            for m in trainer:
                bar.set_postfix(loss=f"{m.train_loss:.3f}", val_acc=f"{m.val_accuracy:.3f}", auc=f"{m.val_auc:.3f}")
                bar.update(1)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    result = trainer.result()
    if not trainer.accelerator.is_main_process:  # under `accelerate launch`, one process writes
        return 0
    path = result.save(args.out)
    if args.save_model:
        engine.save_model(result.router, args.save_model)
    s = result.summary
    print(f"router: {path}")
    print(f"validation accuracy {s.val_accuracy_before:.3f} -> {s.val_accuracy_after:.3f}, "
          f"AUC {s.val_auc_before:.3f} -> {s.val_auc_after:.3f} (best epoch {s.best_epoch})")
    print(f"time: features {s.feature_seconds:.1f}s, training {s.train_seconds:.1f}s")
    return 0

