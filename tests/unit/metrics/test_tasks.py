"""Per-task metric state: masks, weights and the mean baseline."""

from __future__ import annotations

import math

import pytest
import torch

from recsys_moe.config.schema import TaskType
from recsys_moe.metrics import functional as M
from recsys_moe.metrics.tasks import LabelMeans, TaskMetrics
from recsys_moe.modules.heads import task_loss_terms


def test_masked_rows_are_ignored_even_when_they_hold_garbage():
    torch.manual_seed(0)
    B = 64
    raw = torch.randn(B, 2)
    labels = torch.stack([(torch.rand(B) < 0.5).float(), torch.randn(B)], dim=1)
    masks = torch.ones(B, 2, dtype=torch.bool)
    masks[::3, 1] = False
    garbage = labels.clone()
    garbage[~masks] = float("nan")

    m = TaskMetrics(["click", "rating"], [TaskType.binary, TaskType.regression])
    m.update(raw[:40], garbage[:40], masks[:40])
    m.update(raw[40:], garbage[40:], masks[40:])  # two updates == one over all rows
    out = m.compute(train_means=[0.0, 0.25])

    keep = masks[:, 1]
    assert out["rating/rows"] == keep.sum().item()
    assert out["rating/rmse"] == pytest.approx(M.rmse(raw[keep, 1], labels[keep, 1]))
    assert out["rating/mae"] == pytest.approx(M.mae(raw[keep, 1], labels[keep, 1]))
    assert out["rating/rmse_baseline"] == pytest.approx(
        M.rmse(torch.full((int(keep.sum()),), 0.25), labels[keep, 1])
    )
    assert out["click/rows"] == B
    assert out["click/auc"] == pytest.approx(M.auc(raw[:, 0], labels[:, 0]))
    assert out["loss"] == pytest.approx(out["click/log_loss"] + out["rating/rmse"] ** 2)
    assert all(math.isfinite(v) for v in out.values())


def test_label_means_follow_masks_and_weights():
    lm = LabelMeans(2, torch.device("cpu"))
    labels = torch.tensor([[1.0, 10.0], [0.0, float("nan")], [1.0, 4.0]])
    masks = torch.tensor([[True, True], [True, False], [True, True]])
    weights = torch.tensor([[1.0, 1.0], [1.0, 1.0], [2.0, 3.0]])
    raw = torch.zeros(3)
    for _ in range(2):  # two batches: the sums accumulate
        terms = [
            task_loss_terms(kind, raw, labels[:, t], masks[:, t], weights[:, t])
            for t, kind in enumerate((TaskType.binary, TaskType.regression))
        ]
        lm.update(torch.stack([y for _, _, y in terms]), torch.stack([w for _, w, _ in terms]))
    assert lm.means() == pytest.approx([3.0 / 4.0, (10.0 + 12.0) / 4.0])
