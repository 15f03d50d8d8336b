"""Gradio tab: the hybrid trade-off on an uploaded dataset or a built-in sample.

Every question is answered in think, direct and auto mode (metis/evaluation), through the same
`Runner` as the chat, so ZeroGPU reservations and the session's fine-tuned router apply here too.
One evaluation at a time per server (`concurrency_id="evaluate"`, limit 1), each within
fine-tuning's upload bounds and MAX_QUESTIONS; its events are not API endpoints. Handlers return
`EvaluateUpdate` records (wiring.py). This module only renders: the dataset, the runs, the report
and the curve come from the library.
"""

from __future__ import annotations

import csv
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import gradio as gr
import plotly.graph_objects as go

from ..evaluation.dataset import DatasetError, load_questions, load_upload
from ..evaluation.report import CATEGORY_HEADERS, MODE_HEADERS, ROW_HEADERS, category_table, mode_table, report, rows
from ..evaluation.runner import Cancelled, Results, RunSettings, evaluate
from ..evaluation.samples import SAMPLES, sample_for
from .plots import empty, tradeoff_figure
from .runtime import Runner, failure_text
from .session import Job
from .wiring import KEEP, PRIVATE, Keep, Outputs

MAX_QUESTIONS = 500  # per evaluation, each answered three times


@dataclass(frozen=True)
class EvaluateUpdate:
    """New values of the tab's outputs; a field left KEEP leaves its component as it is."""

    status: str | Keep = KEEP
    modes: list[list] | Keep = KEEP
    categories: list[list] | Keep = KEEP
    curve: go.Figure | Keep = KEEP
    download: dict | Keep = KEEP  # a gr.update of the download button


def _csv(results: Results, folder: Path) -> Path:
    path = folder / "evaluation.csv"
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(ROW_HEADERS)
        writer.writerows(rows(results))
    return path


def prepare(job: Job) -> EvaluateUpdate:
    """Runs at click time, ahead of the queue, so Cancel reaches a run that is still waiting."""
    job.queue()
    return EvaluateUpdate(status="Waiting for the evaluation slot (one at a time)…")


def cancel(job: Job) -> EvaluateUpdate:
    return EvaluateUpdate(status="Cancelling…" if job.stop() else "Nothing to cancel.")


def start(runner: Runner, files, sample, threshold, max_new_tokens, limit, job: Job, router_weights,
          progress=gr.Progress()) -> Iterator[EvaluateUpdate]:
    """Uploads and the CSV live in one folder removed when the run ends (Gradio has copied the
    CSV by then)."""
    with job.running() as cancelled, tempfile.TemporaryDirectory(prefix="metis-eval-run-") as folder:
        try:
            questions = (load_upload(files, Path(folder) / "data") if files
                         else load_questions(SAMPLES[sample]))[: int(limit)]
            settings = RunSettings(float(threshold), int(max_new_tokens), runner.backend.concurrency)
        except DatasetError as exc:
            problems = "\n".join(f"- {p}" for p in exc.problems)
            yield EvaluateUpdate(status=f"### The dataset cannot be used\n{problems}")
            return
        except (KeyError, ValueError) as exc:
            yield EvaluateUpdate(status=f"### Invalid settings\n{exc}")
            return
        yield EvaluateUpdate(status=f"Answering {len(questions)} questions in think, direct and auto mode…")
        try:
            results = evaluate(lambda messages, s: runner.events(messages, s, router_weights), questions,
                               settings, cancelled, lambda done, total: progress((done, total), desc="answers"))
        except Cancelled:
            yield EvaluateUpdate(status="Cancelled.")
            return
        except Exception as exc:  # the server goes on; the person learns why
            yield EvaluateUpdate(status=f"### The evaluation failed\n{failure_text(exc, 'evaluation')}")
            return
        yield _shown(results, Path(folder))


def _shown(results: Results, folder: Path) -> EvaluateUpdate:
    rep = report(results)
    modes = rep["modes"]
    status = (f"**{rep['questions']} questions** in {rep['wall_seconds']:.1f} s. Auto at threshold "
              f"{rep['threshold']:.2f}: {modes['auto']['accuracy']:.1%} correct with "
              f"{modes['auto']['mean_tokens']:.1f} tokens per answer, "
              f"{modes['auto']['think_share']:.0%} sent to thinking (always think: "
              f"{modes['think']['accuracy']:.1%} with {modes['think']['mean_tokens']:.1f} tokens).")
    download = gr.update(value=str(_csv(results, folder)), visible=True)
    return EvaluateUpdate(status=status, modes=mode_table(rep), categories=category_table(rep),
                          curve=tradeoff_figure(rep), download=download)


# -- layout and wiring ----------------------------------------------------------------------------


def build(runner: Runner, router_weights: gr.State, threshold: float) -> None:
    """Lay the tab out in the current Blocks/Tab context and wire its handlers."""
    job = gr.State(Job())
    gr.Markdown("Answer every question in **think**, **direct** and **auto** mode and see what routing "
                "buys: accuracy against tokens at every threshold. Upload a `.jsonl` (one question a line: "
                "`question`, `images`, `answer`, optional `category` and `choices`) with its images, or a zip "
                "of its folder; or run a built-in sample. See the README for the format and matching rules.")
    with gr.Row():
        files = gr.File(label="Dataset", file_count="multiple", type="filepath", elem_id="evaluate-files",
                        file_types=[".jsonl", ".json", ".zip", ".png", ".jpg", ".jpeg", ".webp"])
        with gr.Column():
            description = runner.backend.describe()
            sample = gr.Dropdown(list(SAMPLES), value=sample_for(description.info if description else None),
                                 label="Built-in sample (used when nothing is uploaded)")
            limit = gr.Slider(1, MAX_QUESTIONS, value=MAX_QUESTIONS, step=1, label="questions (the first N)")
    with gr.Row():
        threshold_slider = gr.Slider(0, 1, value=threshold, step=0.01, label="auto mode's threshold")
        max_new_tokens = gr.Slider(16, 4096, value=1024, step=16, label="max new tokens per answer")
    with gr.Row():
        start_button = gr.Button("Evaluate", variant="primary", elem_id="evaluate-start")
        stop = gr.Button("Cancel", variant="stop")
    out = Outputs(
        EvaluateUpdate,
        status=gr.Markdown(elem_id="evaluate-status"),
        curve=gr.Plot(empty("Trade-off", "Run an evaluation to see accuracy against tokens"),
                      label="Trade-off curve", elem_id="evaluate-curve"),
        modes=gr.Dataframe(headers=list(MODE_HEADERS), label="Per mode", interactive=False),
        categories=gr.Dataframe(headers=list(CATEGORY_HEADERS), label="Per category", interactive=False),
        download=gr.DownloadButton("Download per-question results (CSV)", visible=False),
    )
    start_button.click(**out.event(prepare, "status"), inputs=job, queue=False, **PRIVATE).then(
        **out.event(partial(start, runner), "status", "modes", "categories", "curve", "download"),
        inputs=[files, sample, threshold_slider, max_new_tokens, limit, job, router_weights],
        concurrency_limit=1, concurrency_id="evaluate", show_progress="full", **PRIVATE)
    stop.click(**out.event(cancel, "status"), inputs=job, queue=False, **PRIVATE)
