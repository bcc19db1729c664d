"""StepScalars: the training loop's per-step losses and label sums, reduced when read."""

from __future__ import annotations

import math

import torch

from recsys_moe.metrics.steps import StepScalars
from recsys_moe.metrics.tasks import LabelMeans
from recsys_moe.models.training import StepOutput

T = 3


def _out(step: int, bad: dict[int, float] | None = None) -> StepOutput:
    """A step's output with values that depend on the step (slot T: the regularisers)."""
    task_losses = torch.tensor([0.1 * step + t for t in range(T)])
    aux = torch.tensor(0.01 * step)
    for slot, value in (bad or {}).items():
        if slot == T:
            aux = torch.tensor(value)
        else:
            task_losses[slot] = value
    return StepOutput(
        loss=task_losses.sum() + aux,
        raw=torch.zeros(2, T),
        task_losses=task_losses,
        aux_loss=aux,
        gates=[],
        moe_stats={},
        label_sums=torch.tensor([float(step), 2.0 * step, 1.0]),
        label_weights=torch.tensor([2.0, 2.0, float(step % 2)]),
    )


def test_folded_sums_equal_the_step_by_step_sums_whatever_the_fold_points():
    steps = range(1, 12)
    expected_loss = torch.zeros(T + 1, dtype=torch.float64)
    sums, weights = torch.zeros(T, dtype=torch.float64), torch.zeros(T, dtype=torch.float64)
    for s in steps:
        out = _out(s)
        expected_loss += torch.cat([out.loss.reshape(1), out.task_losses]).double()
        sums += out.label_sums.double()
        weights += out.label_weights.double()
    # max_pending 1: every add folds first
    for max_pending, folds in ((4, {3, 7}), (11, set()), (1, {5})):
        means = LabelMeans(T, torch.device("cpu"))
        scalars = StepScalars(T, max_pending, means, torch.device("cpu"))
        for s in steps:
            scalars.add(_out(s), s)
            if s in folds:
                scalars.fold()
        scalars.fold()
        assert scalars.steps == len(steps)
        torch.testing.assert_close(scalars.loss_sums, expected_loss)
        torch.testing.assert_close(means.sums, sums)
        torch.testing.assert_close(means.counts, weights)
        assert scalars.first_nonfinite() is None


def test_reset_losses_starts_a_window_and_keeps_the_label_means():
    means = LabelMeans(T, torch.device("cpu"))
    scalars = StepScalars(T, 8, means, torch.device("cpu"))
    for s in (1, 2):
        scalars.add(_out(s), s)
    scalars.fold()
    scalars.reset_losses()
    scalars.add(_out(3), 3)
    scalars.fold()
    assert scalars.steps == 1
    out = _out(3)
    torch.testing.assert_close(
        scalars.loss_sums, torch.cat([out.loss.reshape(1), out.task_losses]).double()
    )
    assert means.sums.tolist() == [6.0, 12.0, 3.0]


def test_the_first_non_finite_step_is_named_with_its_slots_across_folds():
    means = LabelMeans(T, torch.device("cpu"))
    scalars = StepScalars(T, 4, means, torch.device("cpu"))
    bad = {6: {1: math.nan, T: math.inf}, 9: {0: math.nan}, 10: {1: -math.inf}}
    for s in range(1, 12):
        scalars.add(_out(s, bad.get(s)), s)
        if s == 7:  # a fold between the first bad step and the later ones
            scalars.fold()
    scalars.fold()
    assert scalars.first_nonfinite() == (6, [1, T])
    assert scalars.first_bad.tolist() == [9, 6, -1, 6]


def test_a_bad_step_in_the_first_row_after_a_fold_keeps_its_own_step():
    means = LabelMeans(T, torch.device("cpu"))
    scalars = StepScalars(T, 3, means, torch.device("cpu"))
    for s in range(1, 4):
        scalars.add(_out(s), s)
    scalars.fold()
    scalars.add(_out(4, {2: math.nan}), 4)
    scalars.fold()
    assert scalars.first_nonfinite() == (4, [2])


def test_a_step_that_does_not_follow_the_last_folds_first_and_keeps_its_own_number():
    """Resumed runs and skipped numbers: the rows kept are consecutive steps, so a gap folds."""
    means = LabelMeans(T, torch.device("cpu"))
    scalars = StepScalars(T, 10, means, torch.device("cpu"))
    for s in (1, 2):
        scalars.add(_out(s), s)
    scalars.add(_out(7, {0: math.inf}), 7)
    scalars.add(_out(8), 8)
    scalars.add(_out(9, {T: math.nan}), 9)
    scalars.fold()
    assert scalars.steps == 5
    assert scalars.first_bad.tolist() == [7, -1, -1, 9]
    assert scalars.first_nonfinite() == (7, [0])
