"""The Gradio app, one module per tab. `build_demo` takes a loaded engine, or the error that
kept it from loading (the app then starts anyway and says why on every tab). Every tab has one
shape (wiring.py): module-level handlers that return update records, and a `build` that lays the
components out and wires them."""

from __future__ import annotations

import gradio as gr

from . import chat, compare, model_tab
from .runtime import Runner, UnavailableEngine
from .session import Session

TITLE = "Metis-HOME · hybrid thinking"
THEME = gr.themes.Soft(primary_hue="violet", secondary_hue="cyan")
CSS = """
#router-view { min-width: 320px; }
.error-banner { border: 1px solid #dc2626; border-radius: 8px; padding: 0 12px; background: #fef2f2; }
"""


def build_demo(backend_or_error, finetune: bool = True) -> gr.Blocks:
    """Blocks for a backend (serving/interface.py), or for an exception/message when loading failed.
    Everything below reads the backend through that interface only. `finetune` False leaves the
    fine-tuning and evaluation tabs out (a public deployment, METIS_FINETUNE=0)."""
    backend = (UnavailableEngine(backend_or_error) if isinstance(backend_or_error, BaseException | str)
               else backend_or_error)
    runner = Runner(backend)
    # uploads and generated files: swept hourly once a day old, so a public server's disk stays bounded
    with gr.Blocks(title=TITLE, delete_cache=(3600, 86400)) as demo:
        gr.Markdown(
            f"# {TITLE}\nA router sends each question either to a **thinking expert**, which reasons "
            "step by step before answering, or to a **direct expert**, which answers at once. "
            "The panel on the right shows what the router saw and chose."
        )
        if backend.error:
            gr.Markdown(f"⚠️ **The model could not be loaded**: {backend.error}",
                        elem_classes="error-banner", elem_id="load-error")
        description = backend.describe()
        if description is not None and description.info.get("notice"):  # a GPU host fell back (loading.load_default)
            gr.Markdown(f"⚠️ {description.info['notice']}", elem_classes="error-banner", elem_id="model-notice")
        session = gr.State(Session())  # each browser session gets its own copy
        router_weights = gr.State(None)  # this session's router (None: the model's); fine-tuning may set it
        with gr.Tab("Chat"):
            chat.build(runner, session, router_weights, backend.default_threshold)
        with gr.Tab("Compare experts"):
            compare.build(runner, session, router_weights)
        if backend.available and finetune:
            from . import evaluate
            from . import finetune as finetune_tab

            with gr.Tab("Fine-tune router"):
                finetune_tab.build(runner, router_weights)
            with gr.Tab("Evaluate"):
                evaluate.build(runner, router_weights, backend.default_threshold)
        with gr.Tab("Model"):
            model_tab.build(description, backend.error)
    return demo
