"""Plotly figures of every tab: the router's gate probabilities for this query against the
threshold and the session's decisions so far (chat), a fine-tuning run's curves and threshold
sweep, and an evaluation's trade-off curve. Built from traces, records and reports only."""

from __future__ import annotations

from typing import TYPE_CHECKING

import plotly.graph_objects as go

from ..routing import RoutingTrace
from .session import Record

if TYPE_CHECKING:  # the chat's figures do not need the trainer (torch, accelerate) imported
    from ..finetune.trainer import EpochMetrics

THINK, DIRECT, MUTED = "#7c3aed", "#0891b2", "#cbd5e1"


def _layout(fig: go.Figure, title: str) -> go.Figure:
    fig.update_layout(
        title={"text": title, "font": {"size": 14}},
        height=260,
        margin={"l": 40, "r": 10, "t": 40, "b": 40},
        template=None,  # a named template is ~6.5 KB of JSON in every figure, page and session
        paper_bgcolor="white", plot_bgcolor="white", font={"color": "#2a3f5f"},
        showlegend=False,
    )
    fig.update_xaxes(gridcolor="#ebf0f8", zeroline=False)
    fig.update_yaxes(gridcolor="#ebf0f8", zeroline=False)
    return fig


def empty(title: str, hint: str) -> go.Figure:
    fig = go.Figure()
    fig.add_annotation(text=hint, showarrow=False, x=0.5, y=0.5, xref="paper", yref="paper")
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False)
    return _layout(fig, title)


def routing_figure(trace: RoutingTrace | None) -> go.Figure:
    """Thinking probability per MoE layer; the first layer's gate decides for the whole query
    (it is highlighted in the chosen expert's colour), the others are shown for insight."""
    if trace is None:
        return empty("Router", "Ask a question to see the router's decision")
    layers = [f"L{i + 1}" for i in range(len(trace.per_layer))]
    chosen = THINK if trace.decision == "think" else DIRECT
    colours = [chosen] + [MUTED] * (len(layers) - 1)
    fig = go.Figure(go.Bar(x=layers, y=trace.per_layer, marker_color=colours,
                           hovertemplate="%{x}: p(think)=%{y:.3f}<extra></extra>"))
    fig.add_hline(y=trace.threshold, line_dash="dash", line_color="#475569",
                  annotation_text=f"threshold {trace.threshold:.2f}", annotation_position="top left")
    fig.update_yaxes(range=[0, 1], title="p(think)")
    if trace.mode == "auto":
        verdict = "≥" if trace.decision == "think" else "<"
        title = f"p(think) = {trace.p_think:.2f} {verdict} {trace.threshold:.2f} → {_expert(trace.decision)}"
    else:
        title = f"p(think) = {trace.p_think:.2f} · forced {trace.mode}: {_expert(trace.decision)}"
    return _layout(fig, title)


def history_figure(records: list[Record]) -> go.Figure:
    """Each answer's p(think) in order (filled: decided by the router, open: forced), with the
    running thinking ratio of the routed ones."""
    if not records:
        return empty("Session", "Decisions of this session appear here")
    x = list(range(1, len(records) + 1))
    fig = go.Figure(go.Scatter(
        x=x, y=[r.p_think for r in records], mode="markers",
        marker={"size": 11, "color": [THINK if r.decision == "think" else DIRECT for r in records],
                "symbol": ["circle" if r.mode == "auto" else "circle-open" for r in records],
                "line": {"width": 2, "color": [THINK if r.decision == "think" else DIRECT for r in records]}},
        text=[f"{_expert(r.decision)} ({r.mode}) · {r.tokens} tokens" for r in records],
        hovertemplate="#%{x}: p(think)=%{y:.2f}<br>%{text}<extra></extra>",
    ))
    ratio, seen, thought = [], 0, 0
    for r in records:
        if r.mode == "auto":
            seen, thought = seen + 1, thought + (r.decision == "think")
        ratio.append(thought / seen if seen else None)
    fig.add_trace(go.Scatter(x=x, y=ratio, mode="lines", line={"color": "#94a3b8", "dash": "dot"},
                             hovertemplate="thinking ratio %{y:.0%}<extra></extra>"))
    fig.update_yaxes(range=[-0.05, 1.05], title="p(think)")
    fig.update_xaxes(title="answer", dtick=1)
    share = f"{ratio[-1]:.0%}" if ratio[-1] is not None else "—"
    return _layout(fig, f"Session: thinking ratio {share} (dotted)")


def _expert(decision: str) -> str:
    return {"think": "thinking expert", "direct": "direct expert"}.get(decision, "per-token routing")


def tradeoff_figure(report: dict) -> go.Figure:
    """Accuracy against mean tokens of auto routing at every threshold of the report's curve
    (computed from the think and direct runs), with always-think and always-direct as its end
    points and the threshold in use marked."""
    curve, modes = report["curve"], report["modes"]
    fig = go.Figure(go.Scatter(
        x=[p["mean_tokens"] for p in curve], y=[p["accuracy"] for p in curve], mode="lines+markers",
        line={"color": "#94a3b8"}, marker={"size": 7, "color": MUTED}, name="auto at threshold t",
        customdata=[[p["threshold"], p["think_share"]] for p in curve],
        hovertemplate="t=%{customdata[0]:.2f}: %{y:.1%} correct, %{x:.1f} tokens, "
                      "%{customdata[1]:.0%} thinking<extra></extra>"))
    for mode, colour, label in (("think", THINK, "always think"), ("direct", DIRECT, "always direct")):
        fig.add_scatter(x=[modes[mode]["mean_tokens"]], y=[modes[mode]["accuracy"]], mode="markers+text",
                        marker={"size": 13, "color": colour, "symbol": "square"}, text=[label],
                        textposition="top center", name=label, hoverinfo="skip")
    used = next(p for p in curve if p["threshold"] == report["threshold"])
    fig.add_scatter(x=[used["mean_tokens"]], y=[used["accuracy"]], mode="markers+text",
                    marker={"size": 16, "color": "#f59e0b", "symbol": "star"}, textposition="bottom center",
                    text=[f"threshold {used['threshold']:.2f}"], name="threshold in use", hoverinfo="skip")
    fig.update_xaxes(title="mean tokens per answer")
    fig.update_yaxes(title="accuracy", range=[-0.1, 1.15], tickformat=".0%")
    _layout(fig, f"Trade-off: auto at threshold {used['threshold']:.2f} is {used['accuracy']:.1%} correct "
                 f"with {used['mean_tokens']:.1f} tokens")
    fig.update_layout(height=360)
    return fig


def curves_figure(history: list[EpochMetrics]) -> go.Figure:
    """A fine-tuning run's losses and validation accuracy per epoch."""
    epochs = [m.epoch for m in history]
    fig = go.Figure(layout={"template": None})  # see _layout: no template in the page's state
    fig.add_scatter(x=epochs, y=[m.train_loss for m in history], name="train loss")
    fig.add_scatter(x=epochs, y=[m.val_loss for m in history], name="validation loss")
    fig.add_scatter(x=epochs, y=[m.val_accuracy for m in history], name="validation accuracy", yaxis="y2")
    fig.update_layout(xaxis_title="epoch", yaxis=dict(title="loss"), height=320,
                      yaxis2=dict(title="accuracy", overlaying="y", side="right", range=[0, 1]),
                      margin=dict(t=30, b=30), legend=dict(orientation="h"))
    return fig


def sweep_figure(sweep: list[dict]) -> go.Figure:
    """Validation accuracy and the share sent to thinking at each routing threshold."""
    fig = go.Figure(layout={"template": None})
    x = [row["threshold"] for row in sweep]
    fig.add_scatter(x=x, y=[row["accuracy"] for row in sweep], name="accuracy")
    fig.add_scatter(x=x, y=[row["think_ratio"] for row in sweep], name="share sent to thinking")
    fig.update_layout(xaxis_title="routing threshold", yaxis=dict(range=[0, 1]), height=300,
                      margin=dict(t=30, b=30), legend=dict(orientation="h"))
    return fig
