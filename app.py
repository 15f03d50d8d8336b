"""Metis-HOME demo: `python app.py [--model PATH_OR_HUB_ID] [--host HOST] [--port PORT]`.

Remote backend (deploy/README.md): `python app.py --router DIR --think-url URL --direct-url URL`
routes here with the exported router and streams answers from two OpenAI-compatible servers.

Wiring only: the tabs live in `metis/ui/`. The model loads once, at import, as ZeroGPU expects;
if it cannot load, the app starts anyway and shows the reason instead of crash-looping.
"""

from __future__ import annotations

import argparse
import logging
import os
from dataclasses import replace
from pathlib import Path

# ZeroGPU: `spaces` must be imported before torch (which metis imports) touches CUDA; only then do
# CUDA and its memory queries appear as the Space's GPU. An import failure stops the app here.
if os.environ.get("SPACES_ZERO_GPU", "").lower() in ("1", "t", "true"):
    import spaces  # noqa: F401

from metis.serving.engine import Engine
from metis.settings import Settings
from metis.ui import CSS, THEME, build_demo
from metis.ui.gate import serve

EXAMPLES_DIR = Path(__file__).resolve().parent / "assets" / "examples"
log = logging.getLogger("metis.app")
# Gradio keeps each browser session's copy of the page's component configs (~190 KiB here,
# BENCHMARKS.md) for an hour after it closes; past this many, the oldest sessions are dropped
SESSION_CAPACITY = 2000


def parse_args(settings: Settings, argv: list[str] | None = None) -> argparse.Namespace:
    """Flags, defaulting to the environment's `settings` (metis/settings.py)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=settings.model,
                        help="checkpoint folder or Hub id (env METIS_MODEL; default: the embedded tiny model)")
    parser.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", 7860)))
    parser.add_argument("--max-batch", type=int, default=settings.batch.max_batch,
                        help="answers decoded together on the local model; 1 answers one at a time, "
                             "lower bounds memory (env METIS_MAX_BATCH; default 16, measured in BENCHMARKS.md)")
    remote = parser.add_argument_group("remote backend", "route here, answer from two OpenAI-compatible servers")
    remote.add_argument("--router", default=settings.router,
                        help="router folder written by `python -m metis export-experts` (env METIS_ROUTER)")
    remote.add_argument("--think-url", default=settings.think_url,
                        help="thinking expert's server, e.g. http://127.0.0.1:8001/v1 (env METIS_THINK_URL)")
    remote.add_argument("--direct-url", default=settings.direct_url,
                        help="direct expert's server (env METIS_DIRECT_URL)")
    # known args only: Spaces and `gradio app.py` reload mode may pass their own
    return parser.parse_known_args(argv)[0]


def uses_remote(args: argparse.Namespace) -> bool:
    return bool(args.router or args.think_url or args.direct_url)


def load_engine(args: argparse.Namespace, settings: Settings):
    """The engine (local, or remote with --router/--think-url/--direct-url), or the exception that
    stopped it (logged once here, shown in the UI)."""
    try:
        if uses_remote(args):
            from metis.serving.remote import RemoteEngine

            return RemoteEngine.load(args.router, args.think_url, args.direct_url)
        options = settings.engine_options() | {"batch": replace(settings.batch, max_batch=args.max_batch)}
        return Engine.load(args.model, **options)
    except Exception as exc:
        log.error("could not load %r: %s: %s", args.router or args.model or "embedded", type(exc).__name__, exc)
        return exc


logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s")
settings = Settings.from_env()  # every METIS_* variable, read here once
args = parse_args(settings)
engine = load_engine(args, settings)
public = settings.public
demo = build_demo(engine, finetune=public.finetune)
# as many answers in flight as the backend serves at once (the local engine: one batch); later
# ones see their place in Gradio's queue, a few per client and a bounded number in all
serve(demo, public, concurrency=getattr(engine, "concurrency", 1))

if __name__ == "__main__":
    demo.launch(server_name=args.host, server_port=args.port, max_file_size="10mb",
                state_session_capacity=SESSION_CAPACITY,
                allowed_paths=[str(EXAMPLES_DIR)], theme=THEME, css=CSS)
