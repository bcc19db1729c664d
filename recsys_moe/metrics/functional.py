"""Exact metric formulas on 1-D tensors (pure functions; no state, no reduction, no names).

All take an optional per-row weight and compute in float64.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F


def _w(x: torch.Tensor, weights: Optional[torch.Tensor]) -> torch.Tensor:
    return torch.ones_like(x, dtype=torch.float64) if weights is None else weights.to(torch.float64)


def auc(
    scores: torch.Tensor, labels: torch.Tensor, weights: Optional[torch.Tensor] = None
) -> float:
    """Exact ROC AUC: P(score of a positive > score of a negative), ties counted one half.

    Weighted Mann-Whitney statistic over all (positive, negative) pairs, computed by sorting once
    and grouping tied scores: O(n log n). NaN when either class is absent.
    """
    w = _w(scores, weights)
    s, order = torch.sort(scores.to(torch.float64))
    pos = labels.to(torch.float64)[order] > 0.5
    w = w[order]
    _, counts = torch.unique_consecutive(s, return_counts=True)
    group = torch.repeat_interleave(torch.arange(len(counts)), counts)
    pos_g = torch.zeros(len(counts), dtype=torch.float64).index_add_(
        0, group, torch.where(pos, w, 0.0)
    )
    neg_g = torch.zeros(len(counts), dtype=torch.float64).index_add_(
        0, group, torch.where(pos, 0.0, w)
    )
    total_pos, total_neg = pos_g.sum().item(), neg_g.sum().item()
    if total_pos <= 0 or total_neg <= 0:
        return math.nan
    neg_below = torch.cumsum(neg_g, 0) - neg_g
    return ((pos_g * (neg_below + 0.5 * neg_g)).sum() / (total_pos * total_neg)).item()


def log_loss(
    logits: torch.Tensor, labels: torch.Tensor, weights: Optional[torch.Tensor] = None
) -> float:
    """Weighted mean binary cross-entropy, from logits (stable for saturated predictions)."""
    w = _w(logits, weights)
    per_row = F.binary_cross_entropy_with_logits(
        logits.to(torch.float64), labels.to(torch.float64), reduction="none"
    )
    return ((per_row * w).sum() / w.sum()).item()


def rmse(pred: torch.Tensor, labels: torch.Tensor, weights: Optional[torch.Tensor] = None) -> float:
    w = _w(pred, weights)
    err = pred.to(torch.float64) - labels.to(torch.float64)
    return math.sqrt(((err * err * w).sum() / w.sum()).item())


def mae(pred: torch.Tensor, labels: torch.Tensor, weights: Optional[torch.Tensor] = None) -> float:
    w = _w(pred, weights)
    err = (pred.to(torch.float64) - labels.to(torch.float64)).abs()
    return ((err * w).sum() / w.sum()).item()


def accuracy(
    logits: torch.Tensor, labels: torch.Tensor, weights: Optional[torch.Tensor] = None
) -> float:
    """Weighted fraction of rows whose thresholded prediction (probability > 0.5, i.e.
    logit > 0) equals the label (> 0.5)."""
    w = _w(logits, weights)
    hit = ((logits.to(torch.float64) > 0) == (labels.to(torch.float64) > 0.5)).to(torch.float64)
    return ((hit * w).sum() / w.sum()).item()
