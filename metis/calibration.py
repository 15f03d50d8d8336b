"""Calibration of the router's thinking probability: temperature scaling and its error measure.

A router trained to separate its training questions pushes its margins far from zero, so p_think
reads 0.000 or 1.000 on everything. One temperature T, fitted on questions the model never trained
on, rescales the pooled margin (p_think = sigmoid(margin / T)) so that a question the router is
unsure about lands near the threshold. Decisions at threshold 0.5 do not change (the sign stays).
"""

from __future__ import annotations

import torch


def fit_temperature(margins: torch.Tensor, labels: torch.Tensor, steps: int = 200) -> float:
    """The T > 0 that minimises the log-loss of sigmoid(margins / T) against 0/1 labels."""
    margins, labels = margins.detach().float(), labels.detach().float()
    log_t = torch.zeros((), requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.1, max_iter=steps)

    def loss():
        opt.zero_grad()
        value = torch.nn.functional.binary_cross_entropy_with_logits(margins / log_t.exp(), labels)
        value.backward()
        return value

    opt.step(loss)
    return float(log_t.detach().clamp(-3.0, 5.0).exp())  # T within [0.05, 148]


def expected_calibration_error(p_think: torch.Tensor, labels: torch.Tensor, bins: int = 10) -> float:
    """Mean |accuracy - confidence| over equal-width confidence bins, weighted by bin size."""
    p_think, labels = p_think.detach().float(), labels.detach().float()
    confidence = torch.maximum(p_think, 1 - p_think)
    correct = ((p_think >= 0.5).float() == labels).float()
    edges = torch.linspace(0.5, 1.0, bins + 1)
    error = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        in_bin = (confidence >= lo) & ((confidence < hi) | (hi == 1.0))
        if in_bin.any():
            gap = abs(correct[in_bin].mean().item() - confidence[in_bin].mean().item())
            error += in_bin.float().mean().item() * gap
    return error
