"""Gradio tab: fine-tune the router on an uploaded (or the sample) dataset and chat with the result.

Handlers return `FinetuneUpdate` records (wiring.py). One run at a time per server
(`concurrency_id="finetune"`, limit 1); queued users see their position. The trained router is an
opaque object to this module: it is stored as-is in the session's router weights state, which the
chat tab hands to the engine, so only this browser session uses it.
"""

from __future__ import annotations

import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import gradio as gr
import plotly.graph_objects as go

from ..finetune.data import DatasetError, load_dataset, unpack_upload
from ..finetune.features import Cancelled, collect_features
from ..finetune.sample import SAMPLE_FILE
from ..finetune.trainer import RouterTrainer, TrainResult, TrainSettings, TrainSummary
from .plots import curves_figure, sweep_figure
from .runtime import Runner, failure_text
from .session import Job
from .wiring import KEEP, PRIVATE, Keep, Outputs

# (minimum, maximum, step, default) of each slider, kept inside TrainSettings.LIMITS
SLIDERS = {
    "epochs": (1, 200, 1, TrainSettings.epochs),
    "lr": (1e-4, 0.1, 1e-4, TrainSettings.lr),
    "batch_size": (4, 256, 4, TrainSettings.batch_size),
    "val_fraction": (0.1, 0.5, 0.05, TrainSettings.val_fraction),
    "patience": (0, 50, 1, TrainSettings.patience),
    "target_ratio": (0.0, 1.0, 0.05, 0.5),
}


def summary_markdown(s: TrainSummary) -> str:
    lines = [
        f"**Validation accuracy** {s.val_accuracy_before:.1%} → **{s.val_accuracy_after:.1%}** "
        f"(threshold {s.threshold}); AUC {s.val_auc_before:.3f} → {s.val_auc_after:.3f}",
        f"{s.examples['train']} training / {s.examples['val']} validation queries, best epoch "
        f"{s.best_epoch}{' (cancelled)' if s.cancelled else ''}",
        f"Time: features {s.feature_seconds:.1f} s{' (cached)' if s.features_cached else ''}, "
        f"training {s.train_seconds:.1f} s",
    ]
    if s.target_threshold is not None:
        lines.append(f"Threshold for {s.target_ratio:.0%} thinking: {s.target_threshold:.3f}")
    return "\n\n".join(lines)


def confusion_rows(s: TrainSummary) -> list[list]:
    return [[key.replace("->", " → "), s.confusion_before[key], s.confusion_after[key]]
            for key in s.confusion_after]


# -- handlers: plain values in, FinetuneUpdate records out -----------------------------------------


@dataclass(frozen=True)
class FinetuneUpdate:
    """New values of the tab's outputs; a field left KEEP leaves its component as it is."""

    status: str | Keep = KEEP
    curves: go.Figure | Keep = KEEP
    summary: str | Keep = KEEP
    sweep: go.Figure | Keep = KEEP
    confusion: list[list] | Keep = KEEP
    result: TrainResult | None | Keep = KEEP
    download: dict | Keep = KEEP  # a gr.update of the download button
    router_weights: dict | Keep = KEEP  # the chat's (this session's) router


def enqueue(job: Job) -> FinetuneUpdate:
    """Runs at click time, ahead of the queue, so Cancel reaches a run that is still waiting."""
    job.queue()
    return FinetuneUpdate(status="Waiting for the fine-tuning slot (one run at a time)…")


def start(runner: Runner, files, use_sample, epochs, lr, batch_size, val_fraction, seed, patience, target_ratio,
          job: Job, progress=gr.Progress()) -> Iterator[FinetuneUpdate]:
    """Check the settings and the dataset, then run (`_run`). The run's one folder (its uploads,
    then its router file) is removed when the run ends, however it ends; Gradio has copied the
    router file to its own cache by the time the generator resumes."""
    with job.running() as cancel, tempfile.TemporaryDirectory(prefix="metis-finetune-run-") as folder:
        if cancel.is_set():
            yield FinetuneUpdate(status="Cancelled before it started.")
            return
        try:
            settings = TrainSettings(epochs=int(epochs), lr=float(lr), batch_size=int(batch_size),
                                     val_fraction=float(val_fraction), seed=int(seed), patience=int(patience),
                                     target_ratio=float(target_ratio))
            if files:
                data = unpack_upload(files, Path(folder) / "data")  # one budget for all uploads
            elif use_sample:
                data = SAMPLE_FILE
            else:
                raise DatasetError(["upload a dataset (.jsonl/.csv with its images, or a zip) or tick the sample"])
            examples = load_dataset(data)
        except DatasetError as exc:
            yield FinetuneUpdate(status="### The dataset cannot be used\n" + "\n".join(f"- {p}" for p in exc.problems))
            return
        except ValueError as exc:
            yield FinetuneUpdate(status=f"### Invalid settings\n{exc}")
            return
        try:
            yield from _run(runner, examples, settings, cancel, progress, Path(folder) / "router")
        except Exception as exc:  # the server and the chat's router carry on as they were
            yield FinetuneUpdate(status=f"### The run failed\n{failure_text(exc, 'fine-tuning run')}\n\n"
                                        "The chat's router is unchanged.")


def _run(runner: Runner, examples, settings: TrainSettings, cancel: threading.Event, progress,
         out: Path) -> Iterator[FinetuneUpdate]:
    yield FinetuneUpdate(status=f"Extracting router features of {len(examples)} queries…")
    try:
        features = collect_features(
            runner.features(examples), len(examples), cancel=cancel,
            progress=lambda i, n: progress((i, n), desc="features (one prefill per query)"))
    except Cancelled:
        yield FinetuneUpdate(status="Cancelled.")
        return
    trainer = RouterTrainer(features, settings, cancel)
    for m in progress.tqdm(trainer, total=settings.epochs, desc="epochs"):
        yield FinetuneUpdate(status=f"Epoch {m.epoch}/{settings.epochs}: validation accuracy {m.val_accuracy:.1%}",
                             curves=curves_figure(trainer.history))
    result = trainer.result()
    s = result.summary
    router_file = result.save(out)
    yield FinetuneUpdate(status="Cancelled: showing the best epoch so far." if s.cancelled else "Done.",
                         curves=curves_figure(result.history), summary=summary_markdown(s),
                         sweep=sweep_figure(s.threshold_sweep), confusion=confusion_rows(s), result=result,
                         download=gr.update(value=str(router_file), visible=True))


def cancel(job: Job) -> FinetuneUpdate:
    return FinetuneUpdate(status="Cancelling…" if job.stop() else "Nothing to cancel.")


def use_in_chat(result: TrainResult | None) -> FinetuneUpdate:
    """Hand the router to this session's chat (the opaque object travels unopened)."""
    if result is None:
        return FinetuneUpdate(status="Train a router first.")
    return FinetuneUpdate(router_weights=result.router,
                          status="The chat tab now uses the fine-tuned router (this browser session only).")


# -- layout and wiring ----------------------------------------------------------------------------


def build(runner: Runner, router_weights: gr.State) -> None:
    """Lay the tab's components out in the current Blocks/Tab context and wire the handlers; the
    page's own events, not API endpoints: a script must not hold the one fine-tuning slot."""
    job = gr.State(Job())
    gr.Markdown("Fine-tune only the **router** on labelled queries (`think` or `direct`); the experts stay "
                "frozen. Upload a `.jsonl`/`.csv` (columns `text`, `images`, `label`) with its images, or "
                "a zip of its folder.")
    with gr.Row():
        files = gr.File(label="Dataset", file_count="multiple", type="filepath",
                        file_types=[".jsonl", ".json", ".csv", ".zip", ".png", ".jpg", ".jpeg", ".webp"])
        with gr.Column():
            use_sample = gr.Checkbox(label="Use the sample dataset when nothing is uploaded", value=True)
            seed = gr.Number(label="seed", value=TrainSettings.seed, precision=0, minimum=0, maximum=2**31 - 1)
    with gr.Row():
        sliders = {name: gr.Slider(lo, hi, value=default, step=step, label=name.replace("_", " "))
                   for name, (lo, hi, step, default) in SLIDERS.items()}
    with gr.Row():
        start_button = gr.Button("Start", variant="primary")
        stop = gr.Button("Cancel", variant="stop")
    status, curves = gr.Markdown(), gr.Plot(label="Training curves")
    summary = gr.Markdown()
    with gr.Row():
        sweep = gr.Plot(label="Threshold sweep (validation)")
        confusion = gr.Dataframe(headers=["label → routed", "before", "after"], label="Confusion (validation)",
                                 interactive=False)
    result = gr.State(None)  # the TrainResult, opaque here
    with gr.Row():
        use = gr.Button("Use in chat")
        download = gr.DownloadButton("Download router", visible=False)
    out = Outputs(FinetuneUpdate, status=status, curves=curves, summary=summary, sweep=sweep, confusion=confusion,
                  result=result, download=download, router_weights=router_weights)
    s = sliders
    run_outputs = ("status", "curves", "summary", "sweep", "confusion", "result", "download")
    start_button.click(**out.event(enqueue, "status"), inputs=job, queue=False, **PRIVATE).then(
        **out.event(partial(start, runner), *run_outputs),
        inputs=[files, use_sample, s["epochs"], s["lr"], s["batch_size"], s["val_fraction"], seed, s["patience"],
                s["target_ratio"], job],
        concurrency_limit=1, concurrency_id="finetune", show_progress="full", **PRIVATE)
    stop.click(**out.event(cancel, "status"), inputs=job, queue=False, **PRIVATE)
    use.click(**out.event(use_in_chat, "router_weights", "status"), inputs=result, **PRIVATE)
