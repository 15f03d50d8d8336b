"""The router's reasons, drawn: the question's words coloured by their push toward thinking
(positive) or answering directly (negative), and a heat map over the uploaded image.
Built from the trace's plain lists only (see metis/explain.py)."""

from __future__ import annotations

from PIL import Image

from ..routing import RoutingTrace

THINK_RGB, DIRECT_RGB = (124, 58, 237), (8, 145, 178)  # the router plot's think/direct colours


def question_scores(trace: RoutingTrace | None) -> list[tuple[str, float]] | None:
    """The user's question as (piece, score in [-1, 1]) for gr.HighlightedText: scaled by the
    strongest push of the question, so the colours compare words within one question."""
    if trace is None or not trace.contributions or trace.question is None:
        return None
    start, end = trace.question
    pieces = trace.contributions[start:end]
    scale = max((abs(c["score"]) for c in pieces), default=0.0) or 1.0
    return [(c["token"], round(c["score"] / scale, 3)) for c in pieces]


def heatmap(image: Image.Image, grid: list[list[float]], opacity: float = 0.55) -> Image.Image:
    """`image` with each merged patch tinted by its score: purple toward think, teal toward direct."""
    rows, cols = len(grid), len(grid[0])
    scale = max(abs(v) for row in grid for v in row) or 1.0
    tint = Image.new("RGBA", (cols, rows))
    tint.putdata([
        (*(THINK_RGB if v > 0 else DIRECT_RGB), int(255 * opacity * abs(v) / scale)) for row in grid for v in row
    ])
    base = image.convert("RGBA")
    return Image.alpha_composite(base, tint.resize(base.size, Image.NEAREST)).convert("RGB")


def last_image_heatmap(trace: RoutingTrace | None, images: list[Image.Image]) -> Image.Image | None:
    """The heat map of the conversation's last image (the grids come in the same order)."""
    if trace is None or not trace.image_grids or not images or len(images) != len(trace.image_grids):
        return None
    return heatmap(images[-1], trace.image_grids[-1])
