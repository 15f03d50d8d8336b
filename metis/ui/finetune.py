"""Gradio tab: fine-tune the router on an uploaded (or the sample) dataset and chat with the result.

The handlers live on `FinetuneTab` so tests can call them directly. One run at a time per server
(`concurrency_id="finetune"`, limit 1); queued users see their position. The trained router is an
opaque object to this module: it is stored as-is in the session's router state, which the chat
tab hands to the engine, so only this browser session uses it.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
import threading
from dataclasses import dataclass, fields
from pathlib import Path

import gradio as gr
import plotly.graph_objects as go

from ..finetune.data import DatasetError, load_dataset, unpack_upload
from ..finetune.features import Cancelled, collect_features
from ..finetune.sample import SAMPLE_FILE
from ..finetune.trainer import RouterTrainer, TrainSettings
from .runtime import Runner

log = logging.getLogger(__name__)

# (minimum, maximum, step, default) of each slider, kept inside TrainSettings.LIMITS
SLIDERS = {
    "epochs": (1, 200, 1, TrainSettings.epochs),
    "lr": (1e-4, 0.1, 1e-4, TrainSettings.lr),
    "batch_size": (4, 256, 4, TrainSettings.batch_size),
    "val_fraction": (0.1, 0.5, 0.05, TrainSettings.val_fraction),
    "patience": (0, 50, 1, TrainSettings.patience),
    "target_ratio": (0.0, 1.0, 0.05, 0.5),
}


def curves_figure(history) -> go.Figure:
    epochs = [m.epoch for m in history]
    fig = go.Figure(layout={"template": None})  # see plots._layout: no template in the page's state
    fig.add_scatter(x=epochs, y=[m.train_loss for m in history], name="train loss")
    fig.add_scatter(x=epochs, y=[m.val_loss for m in history], name="validation loss")
    fig.add_scatter(x=epochs, y=[m.val_accuracy for m in history], name="validation accuracy", yaxis="y2")
    fig.update_layout(xaxis_title="epoch", yaxis=dict(title="loss"), height=320,
                      yaxis2=dict(title="accuracy", overlaying="y", side="right", range=[0, 1]),
                      margin=dict(t=30, b=30), legend=dict(orientation="h"))
    return fig


def sweep_figure(sweep: list[dict]) -> go.Figure:
    fig = go.Figure(layout={"template": None})
    x = [row["threshold"] for row in sweep]
    fig.add_scatter(x=x, y=[row["accuracy"] for row in sweep], name="accuracy")
    fig.add_scatter(x=x, y=[row["think_ratio"] for row in sweep], name="share sent to thinking")
    fig.update_layout(xaxis_title="routing threshold", yaxis=dict(range=[0, 1]), height=300,
                      margin=dict(t=30, b=30), legend=dict(orientation="h"))
    return fig


def summary_markdown(s: dict) -> str:
    lines = [
        f"**Validation accuracy** {s['val_accuracy_before']:.1%} → **{s['val_accuracy_after']:.1%}** "
        f"(threshold {s['threshold']}); AUC {s['val_auc_before']:.3f} → {s['val_auc_after']:.3f}",
        f"{s['examples']['train']} training / {s['examples']['val']} validation queries, best epoch "
        f"{s['best_epoch']}{' (cancelled)' if s['cancelled'] else ''}",
        f"Time: features {s['feature_seconds']:.1f} s{' (cached)' if s['features_cached'] else ''}, "
        f"training {s['train_seconds']:.1f} s",
    ]
    if s["target_threshold"] is not None:
        lines.append(f"Threshold for {s['target_ratio']:.0%} thinking: {s['target_threshold']:.3f}")
    return "\n\n".join(lines)


def confusion_rows(s: dict) -> list[list]:
    return [[key.replace("->", " → "), s["confusion_before"][key], s["confusion_after"][key]]
            for key in s["confusion_after"]]


@dataclass(frozen=True)
class FinetuneOutputs:
    """What a run updates, made unrendered: the handlers key their updates by these components
    (a Gradio dict update leaves the others as they are) and the layout places them."""

    status: gr.Markdown
    curves: gr.Plot
    summary: gr.Markdown
    sweep: gr.Plot
    confusion: gr.Dataframe
    result: gr.State  # the TrainResult, opaque here
    download: gr.DownloadButton

    @classmethod
    def create(cls) -> FinetuneOutputs:
        return cls(
            status=gr.Markdown(render=False),
            curves=gr.Plot(label="Training curves", render=False),
            summary=gr.Markdown(render=False),
            sweep=gr.Plot(label="Threshold sweep (validation)", render=False),
            confusion=gr.Dataframe(headers=["label → routed", "before", "after"], label="Confusion (validation)",
                                   interactive=False, render=False),
            result=gr.State(None, render=False),
            download=gr.DownloadButton("Download router", visible=False, render=False),
        )

    def components(self) -> list:
        return [getattr(self, f.name) for f in fields(self)]


class FinetuneTab:
    """Handlers of the tab; `cancels` maps a browser session to its run's cancel event. The model
    is reached through the same `Runner` as chat, so on ZeroGPU feature extraction runs on the GPU.
    Every update is a dict keyed by `out`'s components."""

    def __init__(self, runner: Runner):
        self.runner = runner
        self.out = FinetuneOutputs.create()
        self.cancels: dict[str, threading.Event] = {}

    def _status(self, text: str) -> dict:
        return {self.out.status: text}

    def enqueue(self, request: gr.Request) -> str:
        """Runs at click time, ahead of the queue, so Cancel reaches a run that is still waiting."""
        self.cancels[request.session_hash] = threading.Event()
        return "Waiting for the fine-tuning slot (one run at a time)…"

    def start(self, files, use_sample, epochs, lr, batch_size, val_fraction, seed, patience, target_ratio,
              request: gr.Request, progress=gr.Progress()):
        """Generator of updates keyed by `self.out`'s components."""
        # the run's one folder (its uploads, then its router file) is removed when the run ends, however
        # it ends; Gradio has copied the router file to its own cache by the time the generator resumes
        with self._registered(request.session_hash) as cancel, \
                tempfile.TemporaryDirectory(prefix="metis-finetune-run-") as folder:
            if cancel.is_set():
                yield self._status("Cancelled before it started.")
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
                yield self._status("### The dataset cannot be used\n" + "\n".join(f"- {p}" for p in exc.problems))
                return
            except ValueError as exc:
                yield self._status(f"### Invalid settings\n{exc}")
                return
            try:
                yield from self._run(examples, settings, cancel, progress, Path(folder) / "router")
            except Exception as exc:  # the server and the chat's router carry on as they were
                log.exception("fine-tuning run failed")
                yield self._status(f"### The run failed\n{type(exc).__name__}: {exc}\n\n"
                                   "The chat's router is unchanged.")

    @contextlib.contextmanager
    def _registered(self, session: str):
        """This session's cancel event for the length of its run (API calls skip `enqueue`)."""
        cancel = self.cancels.setdefault(session, threading.Event())
        try:
            yield cancel
        finally:
            self.cancels.pop(session, None)

    def _run(self, examples, settings: TrainSettings, cancel: threading.Event, progress, out: Path):
        yield self._status(f"Extracting router features of {len(examples)} queries…")
        try:
            features = collect_features(
                self.runner.features(examples), len(examples), cancel=cancel,
                progress=lambda i, n: progress((i, n), desc="features (one prefill per query)"))
        except Cancelled:
            yield self._status("Cancelled.")
            return
        trainer = RouterTrainer(features, settings, cancel)
        o = self.out
        for m in progress.tqdm(trainer, total=settings.epochs, desc="epochs"):
            yield {o.status: f"Epoch {m.epoch}/{settings.epochs}: validation accuracy {m.val_accuracy:.1%}",
                   o.curves: curves_figure(trainer.history)}
        result = trainer.result()
        s = result.summary
        router_file = result.save(out)
        yield {o.status: "Cancelled: showing the best epoch so far." if s["cancelled"] else "Done.",
               o.curves: curves_figure(result.history), o.summary: summary_markdown(s),
               o.sweep: sweep_figure(s["threshold_sweep"]), o.confusion: confusion_rows(s), o.result: result,
               o.download: gr.update(value=str(router_file), visible=True)}

    def cancel(self, request: gr.Request) -> str:
        event = self.cancels.get(request.session_hash)
        if event is None:
            return "Nothing to cancel."
        event.set()
        return "Cancelling…"

    @staticmethod
    def use_in_chat(result):
        """Hand the router to this session's chat (the opaque object travels unopened)."""
        if result is None:
            return gr.update(), "Train a router first."
        return result.router, "The chat tab now uses the fine-tuned router (this browser session only)."


def build_finetune_tab(runner: Runner, session_router: gr.State) -> FinetuneTab:
    """Lay the tab's components out in the current Blocks/Tab context and wire the handlers."""
    tab = FinetuneTab(runner)
    o = tab.out
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
        start = gr.Button("Start", variant="primary")
        stop = gr.Button("Cancel", variant="stop")
    for component in (o.status, o.curves, o.summary):
        component.render()
    with gr.Row():
        o.sweep.render()
        o.confusion.render()
    o.result.render()
    with gr.Row():
        use = gr.Button("Use in chat")
        o.download.render()
    s = sliders
    # the page's own events, not API endpoints: a script must not hold the one fine-tuning slot
    private = dict(api_visibility="private")
    start.click(tab.enqueue, None, o.status, queue=False, **private).then(
                tab.start,
                [files, use_sample, s["epochs"], s["lr"], s["batch_size"], s["val_fraction"], seed, s["patience"],
                 s["target_ratio"]],
                o.components(),
                concurrency_limit=1, concurrency_id="finetune", show_progress="full", **private)
    stop.click(tab.cancel, None, o.status, queue=False, **private)
    use.click(tab.use_in_chat, o.result, [session_router, o.status], **private)
    return tab
