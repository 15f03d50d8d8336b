"""What is loaded: which backend serves, checkpoint, device, sizes and how it routes (`describe()`)."""

from __future__ import annotations

import gradio as gr

from ..serving.interface import ModelDescription

LOCAL_BACKEND = "local: the whole MoE in this process"
LABELS = {
    "backend": "Backend",
    "router": "Router checkpoint",
    "think_endpoint": "Thinking expert's server",
    "direct_endpoint": "Direct expert's server",
    "params_router": "Parameters (router)",
    "timeouts": "Client timeouts and retries",
    "checkpoint": "Checkpoint",
    "device": "Device",
    "dtype": "Weights dtype",
    "attn_implementation": "Attention",
    "num_experts": "Experts",
    "thinking_expert": "Thinking expert index",
    "params_total": "Parameters (total)",
    "params_shared": "Parameters shared (attention, vision, embeddings)",
    "params_per_expert": "Parameters per expert (FFN copies)",
    "memory_bytes": "Weights in memory",
    "routing": "Routing",
    "cpu_threads": "CPU threads (torch intra-op)",
    "notice": "Why not the published model",
}


def _format(key: str, value) -> str:
    if key == "memory_bytes":
        return f"{value / 2**20:,.1f} MiB"
    if key.startswith("params"):
        return f"{value:,}"
    return f"`{value}`" if key in ("checkpoint", "router", "think_endpoint", "direct_endpoint") else str(value)


def info_markdown(info: dict | None, error: str | None = None) -> str:
    if info is None:
        return f"### ⚠️ No model loaded\n\n{error or 'unknown reason'}"
    info = {"backend": LOCAL_BACKEND, **info}  # a remote engine's info names its own backend
    rows = [f"| {LABELS.get(k, k)} | {_format(k, v)} |" for k, v in info.items() if v is not None]
    return "\n".join(["| Loaded model | |", "|---|---|", *rows])


def limits_markdown(limits, batch=None) -> str:
    """What one request may cost here (metis/budget.py, serving/scheduler.py; set by METIS_*
    environment variables and --max-batch)."""
    action = "refused" if limits.overflow == "refuse" else "trimmed: the oldest turns are dropped, with a note"
    text = (f"**Limits per request**: prompts of at most {limits.max_prompt_tokens:,} tokens, images included "
            f"(or the model's context, if smaller); longer ones are {action}. No answer holds the model "
            f"longer than {limits.max_seconds:g} s.")
    if batch is not None:
        text += (f" Up to {batch.max_batch} answers are decoded together, in batches of at most "
                 f"{batch.max_batch_tokens:,} padded prompt tokens.")
        if batch.max_kv_tokens is not None:
            text += (f" A batch's KV cache holds at most {batch.max_kv_tokens:,} tokens (rows x (longest prompt + "
                     "longest answer allowed)); a request that could not fit even alone is refused.")
    return text


def build(description: ModelDescription | None, error: str | None) -> None:
    """`description` None: nothing loaded, and `error` says why. Limits are shown only where the
    backend reports them (a remote backend's are its servers' own)."""
    gr.Markdown(info_markdown(description and description.info, error))
    if description is not None and description.limits is not None:
        gr.Markdown(limits_markdown(description.limits, description.batch))
    gr.Markdown(
        "Metis-HOME duplicates only the feed-forward layers of Qwen2.5-VL into a **thinking** and a "
        "**direct** expert; attention, embeddings and the vision tower are shared. A router looks at "
        "the whole question once, before the first token, and the chosen expert writes the entire "
        "answer. Paper: [arXiv 2510.20519](https://arxiv.org/abs/2510.20519) · weights: "
        "[mmthinking/Metis-HOME](https://huggingface.co/mmthinking/Metis-HOME)."
    )
