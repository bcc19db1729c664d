"""Task heads: what a task's raw output means, its loss and its prediction.

Legend: B = examples.
"""

from __future__ import annotations

from collections.abc import Sequence
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

    One task, the plain formula: the reference of tasks_loss_terms (which the training loss
    uses, every task at once) and the terms of task_loss.
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


def tasks_loss_terms(
    kinds: Sequence[TaskType],
    raw_BT: torch.Tensor,
    labels_BT: torch.Tensor,
    masks_BT: Optional[torch.Tensor] = None,
    weights_BT: Optional[torch.Tensor] = None,
    binary_T: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """task_loss_terms of every task at once, column t of [B, T] being task t of kind
    kinds[t]: the three sums as [T] vectors. binary_T: kinds as a bool tensor on raw's device
    (True: binary), which a caller may keep to save a copy per call where kinds are mixed.

    A few operators over [B, T] instead of a dozen per task. Where kinds are mixed, both losses
    are computed on every column (each finite on any finite input) and each column keeps its
    own kind's, so the other kind's gradient there is exactly zero."""
    binary = [TaskType(k) == TaskType.binary for k in kinds]
    if masks_BT is not None:
        labels_BT = torch.where(masks_BT, labels_BT, torch.zeros_like(labels_BT))
    if all(binary):
        per_row = F.binary_cross_entropy_with_logits(raw_BT, labels_BT, reduction="none")
    elif not any(binary):
        per_row = (raw_BT - labels_BT) ** 2
    else:
        if binary_T is None:
            binary_T = torch.tensor(binary, device=raw_BT.device)
        bce = F.binary_cross_entropy_with_logits(raw_BT, labels_BT, reduction="none")
        per_row = torch.where(binary_T, bce, (raw_BT - labels_BT) ** 2)
    w = None if weights_BT is None else weights_BT.to(per_row.dtype)
    if masks_BT is not None:
        mask = masks_BT.to(per_row.dtype)
        w = mask if w is None else w * mask
    if w is None:  # every row counts once
        rows = per_row.new_full((per_row.shape[1],), float(per_row.shape[0]))
        return per_row.sum(0), rows, labels_BT.detach().sum(0)
    return (per_row * w).sum(0), w.sum(0), (labels_BT.detach() * w).sum(0)


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
