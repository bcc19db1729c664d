"""The training loop's per-step scalars: losses, their finiteness, the label sums.

Legend: T = tasks.

Every step hands its scalars (the loss, the task losses [T], the gate regularisers, the label
sums and weights [T]) to `add`, which keeps references to them: no operator, no host sync.
`fold()` reduces the steps added since the last fold at once: it adds the losses to the
window's sums (the logged train losses), the label sums and weights to LabelMeans, and notes the
first step at which each task's loss (slot T: the gate regularisers) was not finite. The trainer
folds before it reads any of them: on logging steps, before an evaluation or a checkpoint, and
at the end; `add` folds when `max_pending` steps are pending.

Why: the same work done step by step was a dozen small operators per step after each backward
(accumulating, the finiteness check, the label means), each slowed by a cache the step had just
emptied (10-35 us each in the default job's loop against 1-6 us in a loop of its own).
"""

from __future__ import annotations

from typing import Optional

import torch

from recsys_moe.metrics.tasks import LabelMeans
from recsys_moe.models.training import StepOutput


class StepScalars:
    """Example:
    >>> scalars = StepScalars(num_tasks=4, max_pending=50, label_means=means, device=cpu)
    >>> scalars.add(out, step)          # every step (1-based: the step just trained)
    >>> scalars.fold()                  # before reading: loss_sums, steps, first_bad
    >>> mean_loss = scalars.loss_sums[0] / scalars.steps; scalars.reset_losses()
    """

    def __init__(
        self, num_tasks: int, max_pending: int, label_means: LabelMeans, device: torch.device
    ) -> None:
        T = num_tasks
        self.num_tasks = T
        self.label_means = label_means
        self.max_pending = max(max_pending, 1)
        # the steps added since the last fold, consecutive from first_pending_step: (loss, task
        # losses, regularisers, label sums, label weights), detached references
        self.pending: list[tuple[torch.Tensor, ...]] = []
        self.first_pending_step = 0
        # since the last reset_losses: the sum of the loss, then of each task's loss, over steps
        self.loss_sums = torch.zeros(T + 1, dtype=torch.float64, device=device)
        self.steps = 0
        # the first step at which each task's loss (slot T: the gate regularisers) was not
        # finite, -1 while it has been; never reset
        self.first_bad = torch.full((T + 1,), -1, dtype=torch.long, device=device)

    def add(self, out: StepOutput, step: int) -> None:
        """Step `step`'s scalars (its StepOutput), kept until the next fold (which comes first
        when max_pending steps are kept, or when `step` does not follow the last one)."""
        if len(self.pending) >= self.max_pending or (
            self.pending and step != self.first_pending_step + len(self.pending)
        ):
            self.fold()
        if not self.pending:
            self.first_pending_step = step
        self.pending.append(
            (
                out.loss.detach(),
                out.task_losses.detach(),
                out.aux_loss.detach(),
                out.label_sums.detach(),
                out.label_weights.detach(),
            )
        )

    def fold(self) -> None:
        """Reduces the steps added since the last fold into loss_sums, steps, first_bad and
        the label means: a few operators on the device whatever their number, no host sync."""
        if not self.pending:
            return
        pending, self.pending = self.pending, []
        loss, task_losses, aux, label_sums, label_weights = zip(*pending)
        # [steps, T + 2]: the loss, each task's loss, the regularisers; float64 sums
        losses = torch.cat(
            [torch.stack(loss)[:, None], torch.stack(task_losses), torch.stack(aux)[:, None]], 1
        ).double()
        sums = losses.sum(0)
        self.loss_sums += sums[: self.num_tasks + 1]
        self.label_means.update(
            torch.stack(label_sums).double().sum(0), torch.stack(label_weights).double().sum(0)
        )
        bad = ~torch.isfinite(losses[:, 1:])  # [steps, T + 1]: task losses, regularisers
        # the first bad row of each column (argmax of 0/1 is the first 1), where there is one
        first = bad.to(torch.uint8).argmax(0) + self.first_pending_step
        new = torch.where(bad.any(0), first, self.first_bad.new_full((), -1))
        self.first_bad = torch.where(self.first_bad >= 0, self.first_bad, new)
        self.steps += len(pending)

    def reset_losses(self) -> None:
        """Starts a new logging window (the label means and first_bad go on)."""
        self.loss_sums.zero_()
        self.steps = 0

    def first_nonfinite(self) -> Optional[tuple[int, list[int]]]:
        """After fold(): (the first step whose loss was not finite, the slots not finite then:
        task indices, T for the gate regularisers), or None (a host sync)."""
        bad = self.first_bad.tolist()
        steps = [s for s in bad if s >= 0]
        if not steps:
            return None
        step = min(steps)
        return step, [i for i, s in enumerate(bad) if s == step]
