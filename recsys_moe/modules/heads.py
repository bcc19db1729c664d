"""Task heads: what a task's raw output means, its loss and its prediction.

Legend: B = examples.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from recsys_moe.config.schema import TaskType


def task_loss_terms(
    kind: TaskType,
    raw_B: torch.Tensor,
    label_B: torch.Tensor,
    mask_B: Optional[torch.Tensor] = None,
    weight_B: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(sum of weighted row losses, sum of row weights, sum of weighted labels) over the rows
    where the label exists.

    binary: raw is a logit, loss is binary cross-entropy; regression: raw is the value, loss is
    squared error. Rows where mask is False contribute neither to the sum nor to the weights,
    so a task's loss does not shrink when most of its labels are missing. Kept as two terms so
    that data-parallel ranks can divide by the weight of the whole global batch.
    """
    if mask_B is not None:
        # A missing label may hold anything (NaN included). Replace it before the loss: masking
        # the loss afterwards would still send NaN * 0 = NaN into the gradient.
        label_B = torch.where(mask_B, label_B, torch.zeros_like(label_B))
    if kind == TaskType.binary:
        per_row = F.binary_cross_entropy_with_logits(raw_B, label_B, reduction="none")
    else:
        per_row = (raw_B - label_B) ** 2
    w = torch.ones_like(per_row) if weight_B is None else weight_B.to(per_row.dtype)
    if mask_B is not None:
        w = w * mask_B.to(per_row.dtype)
    return (per_row * w).sum(), w.sum(), (label_B.detach() * w).sum()


def task_loss(
    kind: TaskType,
    raw_B: torch.Tensor,
    label_B: torch.Tensor,
    mask_B: Optional[torch.Tensor] = None,
    weight_B: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Weighted mean loss over the rows where the label exists (0 when none does)."""
    total, weight, _ = task_loss_terms(kind, raw_B, label_B, mask_B, weight_B)
    return total / weight.clamp_min(1e-12)


def predict(kind: TaskType, raw: torch.Tensor) -> torch.Tensor:
    """Probability for binary tasks, the value itself for regression tasks."""
    return torch.sigmoid(raw) if kind == TaskType.binary else raw
