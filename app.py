"""Metis-HOME demo: `python app.py [--model PATH_OR_HUB_ID] [--host HOST] [--port PORT]`.

Wiring only: the tabs live in `metis/ui/`. The model loads once, at import, as ZeroGPU expects;
if it cannot load, the app starts anyway and shows the reason instead of crash-looping.
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

# ZeroGPU: `spaces` must be imported before torch (which metis imports) touches CUDA; only then do
# CUDA and its memory queries appear as the Space's GPU. An import failure stops the app here.
if os.environ.get("SPACES_ZERO_GPU", "").lower() in ("1", "t", "true"):
    import spaces  # noqa: F401

from metis.generation import Engine
from metis.ui import CSS, THEME, build_demo

EXAMPLES_DIR = Path(__file__).resolve().parent / "assets" / "examples"
log = logging.getLogger("metis.app")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=os.environ.get("METIS_MODEL"),
                        help="checkpoint folder or Hub id (env METIS_MODEL; default: the embedded tiny model)")
    parser.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", 7860)))
    # known args only: Spaces and `gradio app.py` reload mode may pass their own
    return parser.parse_known_args(argv)[0]


def load_engine(spec: str | None) -> Engine | Exception:
    """The engine, or the exception that stopped it (logged once here, shown in the UI)."""
    try:
        return Engine.load(spec)
    except Exception as exc:
        log.error("could not load the model %r: %s: %s", spec or "embedded", type(exc).__name__, exc)
        return exc


logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s")
args = parse_args()
engine = load_engine(args.model)
demo = build_demo(engine)
demo.queue(default_concurrency_limit=1)  # one model: answers take turns, queued users see their place

if __name__ == "__main__":
    demo.launch(server_name=args.host, server_port=args.port, max_file_size="10mb",
                allowed_paths=[str(EXAMPLES_DIR)], theme=THEME, css=CSS)
