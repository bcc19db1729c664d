"""Task losses: masking, weights and NaN-safety of missing labels."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from recsys_moe.config.schema import TaskType
from recsys_moe.modules.heads import predict, task_loss, task_loss_terms, tasks_loss_terms


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


@pytest.mark.parametrize(
    "kinds",
    [
        [TaskType.binary, TaskType.regression, TaskType.binary, TaskType.regression],
        [TaskType.binary, TaskType.binary],
        [TaskType.regression],
    ],
)
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("weighted", [False, True])
def test_all_tasks_at_once_equal_each_task_alone(kinds, masked, weighted):
    """tasks_loss_terms over [B, T] against task_loss_terms per column: the three sums and the
    gradient, with NaN in the missing labels (none may reach the gradient)."""
    g = torch.Generator().manual_seed(0)
    B, T = 64, len(kinds)
    raw = torch.randn(B, T, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.rand(B, T, generator=g, dtype=torch.float64)
    masks = torch.rand(B, T, generator=g) < 0.7 if masked else None
    if masks is not None:
        labels = torch.where(masks, labels, torch.full_like(labels, float("nan")))
    weights = torch.rand(B, T, generator=g, dtype=torch.float64) if weighted else None

    got = tasks_loss_terms(kinds, raw, labels, masks, weights)
    per_task = [
        task_loss_terms(
            kind,
            raw[:, t],
            labels[:, t],
            None if masks is None else masks[:, t],
            None if weights is None else weights[:, t],
        )
        for t, kind in enumerate(kinds)
    ]
    want = [torch.stack(terms) for terms in zip(*per_task)]
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    up = torch.rand(T, generator=g, dtype=torch.float64)
    (grad,) = torch.autograd.grad((got[0] * up).sum(), raw)
    (want_grad,) = torch.autograd.grad((want[0] * up).sum(), raw)
    assert torch.isfinite(grad).all()
    torch.testing.assert_close(grad, want_grad, rtol=1e-12, atol=1e-12)
    if masks is not None:
        assert (grad[~masks] == 0).all()
