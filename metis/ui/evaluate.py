"""Gradio tab: the hybrid trade-off on an uploaded dataset or a built-in sample.

Every question is answered in think, direct and auto mode (metis/evaluation), through the same
`Runner` as the chat, so ZeroGPU reservations and the session's fine-tuned router apply here too.
One evaluation at a time per server (`concurrency_id="evaluate"`, limit 1), each within
fine-tuning's upload bounds and MAX_QUESTIONS; its events are not API endpoints. This module only
renders: the dataset, the runs, the report and the curve come from the library.
"""

from __future__ import annotations

import csv
import logging
import tempfile
from dataclasses import dataclass, fields
from pathlib import Path

import gradio as gr

from ..evaluation.dataset import DatasetError, load_questions, load_upload
from ..evaluation.report import CATEGORY_HEADERS, MODE_HEADERS, ROW_HEADERS, category_table, mode_table, report, rows
from ..evaluation.runner import Cancelled, Results, RunSettings, evaluate
from ..evaluation.samples import SAMPLES, sample_for
from .plots import empty, tradeoff_figure
from .runtime import USER_ERRORS, Runner
from .session import Session

log = logging.getLogger(__name__)
MAX_QUESTIONS = 500  # per evaluation, each answered three times
PRIVATE = {"api_visibility": "private"}  # the tab's events are no API endpoints


@dataclass(frozen=True)
class EvaluateOutputs:
    """What a run updates, made unrendered; handlers key their updates by these components."""

    status: gr.Markdown
    modes: gr.Dataframe
    categories: gr.Dataframe
    curve: gr.Plot
    download: gr.DownloadButton

    @classmethod
    def create(cls) -> "EvaluateOutputs":
        return cls(
            status=gr.Markdown(render=False, elem_id="evaluate-status"),
            modes=gr.Dataframe(headers=list(MODE_HEADERS), label="Per mode", interactive=False, render=False),
            categories=gr.Dataframe(headers=list(CATEGORY_HEADERS), label="Per category", interactive=False,
                                    render=False),
            curve=gr.Plot(empty("Trade-off", "Run an evaluation to see accuracy against tokens"),
                          label="Trade-off curve", render=False, elem_id="evaluate-curve"),
            download=gr.DownloadButton("Download per-question results (CSV)", visible=False, render=False),
        )

    def components(self) -> list:
        return [getattr(self, f.name) for f in fields(self)]


def _csv(results: Results, folder: Path) -> Path:
    path = folder / "evaluation.csv"
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(ROW_HEADERS)
        writer.writerows(rows(results))
    return path


class EvaluateTab:
    """Handlers of the tab (tests call them directly). Cancel is the per-session `Session` event,
    made fresh at click time so it reaches a run still waiting for the slot."""

    def __init__(self, runner: Runner):
        self.runner = runner
        self.out = EvaluateOutputs.create()

    @staticmethod
    def prepare(state: Session) -> str:
        state.new_turn()
        return "Waiting for the evaluation slot (one at a time)…"

    @staticmethod
    def cancel(state: Session) -> str:
        state.cancel.set()
        return "Cancelling…"

    def _status(self, text: str) -> dict:
        return {self.out.status: text}

    def start(self, files, sample, threshold, max_new_tokens, limit, state: Session, router,
              progress=gr.Progress()):
        """Generator of updates keyed by `self.out`'s components; uploads and the CSV live in one
        folder removed when the run ends (Gradio has copied the CSV by then)."""
        cancel = state.cancel
        with tempfile.TemporaryDirectory(prefix="metis-eval-run-") as folder:
            try:
                questions = (load_upload(files, Path(folder) / "data") if files
                             else load_questions(SAMPLES[sample]))[: int(limit)]
                settings = RunSettings(float(threshold), int(max_new_tokens), self.runner.backend.concurrency)
            except DatasetError as exc:
                yield self._status("### The dataset cannot be used\n" + "\n".join(f"- {p}" for p in exc.problems))
                return
            except (KeyError, ValueError) as exc:
                yield self._status(f"### Invalid settings\n{exc}")
                return
            yield self._status(f"Answering {len(questions)} questions in think, direct and auto mode…")
            try:
                results = evaluate(lambda messages, s: self.runner.events(messages, s, router), questions,
                                   settings, cancel, lambda done, total: progress((done, total), desc="answers"))
            except Cancelled:
                yield self._status("Cancelled.")
                return
            except USER_ERRORS as exc:
                yield self._status(f"### The evaluation failed\n{exc}")
                return
            except Exception as exc:  # the server goes on; the person learns why
                log.exception("evaluation failed")
                yield self._status(f"### The evaluation failed\n{type(exc).__name__}: {exc}")
                return
            yield self._shown(results, Path(folder))

    def _shown(self, results: Results, folder: Path) -> dict:
        rep, o = report(results), self.out
        modes = rep["modes"]
        status = (f"**{rep['questions']} questions** in {rep['wall_seconds']:.1f} s. Auto at threshold "
                  f"{rep['threshold']:.2f}: {modes['auto']['accuracy']:.1%} correct with "
                  f"{modes['auto']['mean_tokens']:.1f} tokens per answer, "
                  f"{modes['auto']['think_share']:.0%} sent to thinking (always think: "
                  f"{modes['think']['accuracy']:.1%} with {modes['think']['mean_tokens']:.1f} tokens).")
        return {o.status: status, o.modes: mode_table(rep), o.categories: category_table(rep),
                o.curve: tradeoff_figure(rep), o.download: gr.update(value=str(_csv(results, folder)), visible=True)}


def build_evaluate_tab(runner: Runner, session_router: gr.State, threshold: float) -> EvaluateTab:
    """Lay the tab out in the current Blocks/Tab context and wire its handlers."""
    tab, state = EvaluateTab(runner), gr.State(Session())
    o = tab.out
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
        start = gr.Button("Evaluate", variant="primary", elem_id="evaluate-start")
        stop = gr.Button("Cancel", variant="stop")
    o.status.render()
    o.curve.render()
    o.modes.render()
    o.categories.render()
    o.download.render()
    start.click(tab.prepare, state, o.status, queue=False, **PRIVATE).then(
        tab.start, [files, sample, threshold_slider, max_new_tokens, limit, state, session_router], o.components(),
        concurrency_limit=1, concurrency_id="evaluate", show_progress="full", **PRIVATE)
    stop.click(tab.cancel, state, o.status, queue=False, **PRIVATE)
    return tab
