"""Task losses: masking, weights and NaN-safety of missing labels."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from recsys_moe.config.schema import TaskType
from recsys_moe.modules.heads import predict, task_loss


@pytest.mark.parametrize("kind", [TaskType.binary, TaskType.regression])
def test_masked_loss_equals_loss_on_the_labelled_rows(kind):
    torch.manual_seed(0)
    raw = torch.randn(32, requires_grad=True)
    label = (torch.rand(32) < 0.5).float() if kind == TaskType.binary else torch.randn(32)
    mask = torch.rand(32) < 0.6
    label_with_garbage = torch.where(mask, label, torch.full_like(label, float("nan")))

    loss = task_loss(kind, raw, label_with_garbage, mask)
    loss.backward()
    if kind == TaskType.binary:
        expected = F.binary_cross_entropy_with_logits(raw[mask], label[mask])
    else:
        expected = ((raw[mask] - label[mask]) ** 2).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert torch.isfinite(raw.grad).all()
    assert (raw.grad[~mask] == 0).all()


def test_weights_and_all_masked():
    raw = torch.tensor([0.0, 1.0, 2.0])
    label = torch.tensor([0.0, 0.0, 0.0])
    w = torch.tensor([1.0, 0.0, 3.0])
    assert task_loss(TaskType.regression, raw, label, weight_B=w).item() == pytest.approx(
        12.0 / 4.0
    )
    none = torch.zeros(3, dtype=torch.bool)
    assert task_loss(TaskType.regression, raw, label, none).item() == 0.0


def test_predict():
    raw = torch.tensor([-2.0, 0.0, 3.0])
    assert torch.allclose(predict(TaskType.binary, raw), torch.sigmoid(raw))
    assert torch.equal(predict(TaskType.regression, raw), raw)
