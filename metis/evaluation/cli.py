"""`python -m metis eval --data FILE [--json OUT] [--limit N]`: your questions in the three
modes on any backend (the embedded model, `--model`, or the remote one with `--router`,
`--think-url`, `--direct-url`), printed as tables; the JSON holds the whole report."""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

from .dataset import load_questions, load_upload
from .report import CATEGORY_HEADERS, MODE_HEADERS, category_table, mode_table, report
from .runner import RunSettings, evaluate


def add_arguments(p) -> None:
    p.add_argument("--data", default=None, help="an evaluation .jsonl (or a zip of its folder): "
                   "questions run in think, direct and auto mode; without it, the tiny world's splits")
    p.add_argument("--threshold", type=float, default=None, help="auto mode's threshold (default: the model's)")
    p.add_argument("--max-new-tokens", type=int, default=1024)
    remote = p.add_argument_group("remote backend (with --data)")
    remote.add_argument("--router", default=None, help="router checkpoint of the remote backend")
    remote.add_argument("--think-url", default=None)
    remote.add_argument("--direct-url", default=None)


def _backend(args):
    if args.router or args.think_url or args.direct_url:
        from ..serving.remote import RemoteEngine

        return RemoteEngine.load(args.router, args.think_url, args.direct_url)
    from ..serving.engine import Engine
    from ..settings import Settings

    return Engine.load(args.model, allow_pickle=args.allow_pickle, **Settings.from_env().engine_options())


def _cell(header: str, value) -> str:
    if value is None:
        return ""
    if any(word in header for word in ("accuracy", "share", "agreement")):
        return f"{value:.1%}"
    return str(value)


def _markdown(headers, rows) -> list[str]:
    return (["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
            + ["| " + " | ".join(_cell(h, v) for h, v in zip(headers, row)) + " |" for row in rows])


def table(rep: dict) -> str:
    """The report as Markdown: modes, categories, and the curve's points."""
    lines = [f"{rep['questions']} questions, threshold {rep['threshold']:.2f}, {rep['wall_seconds']:.1f} s in all", ""]
    lines += _markdown(MODE_HEADERS, mode_table(rep)) + [""] + _markdown(CATEGORY_HEADERS, category_table(rep))
    lines += ["", "| threshold | accuracy | mean tokens | think share |", "|---|---|---|---|"]
    lines += [f"| {p['threshold']:.2f} | {p['accuracy']:.1%} | {p['mean_tokens']:.1f} | {p['think_share']:.0%} |"
              for p in rep["curve"]]
    return "\n".join(lines)


def _progress(done: int, total: int) -> None:
    if done == total or done % max(1, total // 10) == 0:
        print(f"{done}/{total} answers", file=sys.stderr)


def main(args) -> int:
    with tempfile.TemporaryDirectory(prefix="metis-eval-") as folder:
        data = Path(args.data)
        questions = load_upload([data], folder) if data.suffix.lower() == ".zip" else load_questions(data)
        questions = questions[: args.limit] if args.limit else questions
        backend = _backend(args)
        threshold = backend.default_threshold if args.threshold is None else args.threshold
        settings = RunSettings(threshold, args.max_new_tokens, backend.concurrency)
        results = evaluate(backend.stream, questions, settings, progress=_progress)
    rep = report(results)
    print(table(rep))
    if args.json:
        Path(args.json).write_text(json.dumps(rep, indent=2))
    return 0
