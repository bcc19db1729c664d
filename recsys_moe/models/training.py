"""The training wrapper: labels in, loss out (the ranker itself needs neither).

Legend: B = examples on this rank, T = tasks.

    loss = sum_t loss_weight_t * task_loss_t + sum of the gates' regularisers

where task_loss_t is the weighted mean of task t's row losses over the rows whose label exists
in the GLOBAL batch. On W data-parallel ranks each rank divides its own sum by the mean over
ranks of the per-rank label weights (`reduce_denominators`, installed by distributed/), so the
mean of the W rank losses is the global-batch loss, and DDP's mean of the W gradients (and
TorchRec's gradient division for the tables) is its gradient: the same step as one process
that sees the whole global batch, also when a masked task has more labels on one rank.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from recsys_moe.config.schema import TaskType
from recsys_moe.data.batch import Batch
from recsys_moe.models.ranker import MultiTaskRanker, RankerOutput
from recsys_moe.modules.heads import tasks_loss_terms
from recsys_moe.moe.gates import GateOutput


@dataclass
class StepOutput:
    """Everything a step produces besides the loss tensor itself.

    loss:        the loss, detached (this rank's; the mean over ranks is the global loss).
    raw:         [B, T] logits (binary tasks) or values (regression tasks), detached.
    task_losses: [T] this rank's share of each task's loss (the mean over ranks is the global
                 task loss; on one process, the task's weighted mean loss).
    aux_loss:    scalar sum of the gates' regularisers.
    gates:       each task's GateOutput, detached.
    moe_stats:   the MoE layer's stats, detached.
    label_sums, label_weights: [T] this batch's weighted sums of existing labels and their
                 weights (the training label means behind eval's rmse_baseline).
    """

    loss: torch.Tensor
    raw: torch.Tensor
    task_losses: torch.Tensor
    aux_loss: torch.Tensor
    gates: list[GateOutput]
    moe_stats: dict[str, torch.Tensor]
    label_sums: torch.Tensor
    label_weights: torch.Tensor


class MultiTaskLoss(nn.Module):
    """(RankerOutput, Batch) -> (loss, StepOutput). A module of its own so that TorchRec's
    pipeline tracing treats it as one opaque call (it may run a collective)."""

    def __init__(self, task_types: Sequence[TaskType], loss_weights: Sequence[float]) -> None:
        super().__init__()
        self.task_types = list(task_types)
        self.register_buffer(
            "loss_weights", torch.tensor(list(loss_weights), dtype=torch.float32), persistent=False
        )
        binary = [TaskType(k) == TaskType.binary for k in self.task_types]
        self.register_buffer("binary", torch.tensor(binary), persistent=False)
        # [T] per-rank label weights -> their mean over the data-parallel ranks (None: one rank)
        self.reduce_denominators: Optional[Callable[[torch.Tensor], torch.Tensor]] = None

    def forward(self, out: RankerOutput, batch: Batch) -> tuple[torch.Tensor, StepOutput]:
        # the loss in fp32 whatever the trunk's precision (trainer.precision)
        raw = out.raw.float() if out.raw.element_size() < 4 else out.raw  # bf16/fp16 -> fp32
        with torch.autocast(raw.device.type, enabled=False):
            return self._forward(out._replace(raw=raw), batch)

    def _forward(self, out: RankerOutput, batch: Batch) -> tuple[torch.Tensor, StepOutput]:
        sums_T, weights_T, labels_T = tasks_loss_terms(
            self.task_types, out.raw, batch.labels, batch.masks, batch.weights, self.binary
        )
        weights_T = weights_T.detach()
        den_T = weights_T
        if self.training and self.reduce_denominators is not None:
            den_T = self.reduce_denominators(den_T)  # every rank runs this: same collectives
        task_losses_T = sums_T / den_T.clamp_min(1e-12)
        loss = (self.loss_weights.to(task_losses_T.dtype) * task_losses_T).sum() + out.aux_loss
        gates = [g.detach() for g in out.gates]
        return loss, StepOutput(
            loss.detach(),
            out.raw.detach(),
            task_losses_T,
            out.aux_loss,
            gates,
            out.moe_stats,
            label_sums=labels_T,
            label_weights=weights_T,
        )


class RankerTrain(nn.Module):
    """model(batch) -> (loss, StepOutput): the ranker and its loss (torchrec's DLRMTrain).

    Example:
        >>> train_model = RankerTrain(MultiTaskRanker(cfg.data, cfg.model), cfg.model.loss_weights)
        >>> loss, out = train_model(batch)       # out.raw: [B, T]; out.task_losses: [T]
    """

    def __init__(self, model: MultiTaskRanker, loss_weights: Mapping[str, float]) -> None:
        super().__init__()
        names = model.task_names
        for key in loss_weights:
            if key not in names:
                raise ValueError(
                    f"model.loss_weights.{key}: no task named '{key}' (tasks: {names})"
                )
        self.model = model
        self.loss = MultiTaskLoss(model.task_types, [loss_weights.get(n, 1.0) for n in names])

    @property
    def task_names(self) -> list[str]:
        return self.model.task_names

    @property
    def task_types(self) -> list[TaskType]:
        return self.model.task_types

    def forward(self, batch: Batch) -> tuple[torch.Tensor, StepOutput]:
        return self.loss(self.model(batch.dense, batch.sparse), batch)
