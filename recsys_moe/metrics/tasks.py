"""Per-task metric state (accumulation kept apart from the formulas and from the sinks).

Legend: B = examples, T = tasks.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Optional

import torch
import torch.distributed as dist

from recsys_moe.config.schema import TaskType
from recsys_moe.distributed.comm import all_gather_objects, all_reduce_, spans_ranks
from recsys_moe.metrics import functional as M


class LabelMeans:
    """Running weighted mean of each task's existing labels over the training rows seen.

    Lives on the training device and never syncs the host in update(); `rmse_baseline` at eval is
    the RMSE of predicting this mean (over the rows of all ranks).
    """

    def __init__(self, num_tasks: int, device: torch.device) -> None:
        self.sums = torch.zeros(num_tasks, dtype=torch.float64, device=device)
        self.counts = torch.zeros(num_tasks, dtype=torch.float64, device=device)

    def update(self, sums_T: torch.Tensor, weights_T: torch.Tensor) -> None:
        """Adds one batch's per-task weighted label sums and label weights (StepOutput has them)."""
        self.sums += sums_T.detach().double()
        self.counts += weights_T.detach().double()

    def means(self, group: Optional[dist.ProcessGroup] = None) -> list[float]:
        """The means over the training rows of every rank (a collective over `group`)."""
        both = all_reduce_(torch.stack([self.sums, self.counts]), group)
        return (both[0] / both[1].clamp_min(1e-12)).tolist()

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"sums": self.sums, "counts": self.counts}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.sums.copy_(state["sums"])
        self.counts.copy_(state["counts"])


class TaskMetrics:
    """Collects eval outputs of every task and computes exact metrics over all of them.

    binary tasks: auc, log_loss, accuracy (threshold 0.5); regression tasks: rmse, mae, rmse_baseline; every task: rows
    (the number of rows whose label exists). compute() returns flat keys "<task>/<metric>" plus
    "loss" (sum over tasks of loss_weight x the task's loss: log loss or mean squared error).

    Example:
        >>> m = TaskMetrics(["click"], [TaskType.binary])
        >>> m.update(raw_BT, labels_BT)
        >>> m.compute()["click/auc"]
    """

    def __init__(
        self,
        names: Sequence[str],
        types: Sequence[TaskType],
        loss_weights: Optional[Sequence[float]] = None,
    ) -> None:
        self.names = list(names)
        self.types = list(types)
        self.loss_weights = (
            list(loss_weights) if loss_weights is not None else [1.0] * len(self.names)
        )
        self.reset()

    def reset(self) -> None:
        T = len(self.names)
        self._raw: list[list[torch.Tensor]] = [[] for _ in range(T)]
        self._labels: list[list[torch.Tensor]] = [[] for _ in range(T)]
        self._weights: list[list[torch.Tensor]] = [[] for _ in range(T)]

    def update(
        self,
        raw_BT: torch.Tensor,
        labels_BT: torch.Tensor,
        masks_BT: Optional[torch.Tensor] = None,
        weights_BT: Optional[torch.Tensor] = None,
    ) -> None:
        """raw: logits (binary) or values (regression). Only rows whose label exists are kept."""
        raw_BT, labels_BT = raw_BT.detach().cpu(), labels_BT.detach().cpu()
        masks = None if masks_BT is None else masks_BT.cpu()
        weights = None if weights_BT is None else weights_BT.detach().cpu()
        for t in range(len(self.names)):
            keep = slice(None) if masks is None else masks[:, t]
            self._raw[t].append(raw_BT[keep, t])
            self._labels[t].append(labels_BT[keep, t])
            w = torch.ones_like(labels_BT[:, t]) if weights is None else weights[:, t]
            self._weights[t].append(w[keep])

    def gather(self, group: Optional[dist.ProcessGroup] = None) -> None:
        """Collects every rank's rows on every rank (exact metrics need all of them)."""
        if not spans_ranks(group):
            return
        mine = [
            [torch.cat(x) if x else torch.zeros(0) for x in lists]
            for lists in (self._raw, self._labels, self._weights)
        ]
        everyone = all_gather_objects(mine, group)
        self._raw, self._labels, self._weights = (
            [[rank_state[i][t] for rank_state in everyone] for t in range(len(self.names))]
            for i in range(3)
        )

    def compute(self, train_means: Optional[Sequence[float]] = None) -> dict[str, float]:
        out: dict[str, float] = {}
        total = 0.0
        for t, (name, kind) in enumerate(zip(self.names, self.types)):
            raw = torch.cat(self._raw[t]) if self._raw[t] else torch.zeros(0)
            y = torch.cat(self._labels[t]) if self._labels[t] else torch.zeros(0)
            w = torch.cat(self._weights[t]) if self._weights[t] else torch.zeros(0)
            out[f"{name}/rows"] = float(raw.numel())
            if raw.numel() == 0:
                continue
            if kind == TaskType.binary:
                out[f"{name}/auc"] = M.auc(raw, y, w)
                out[f"{name}/log_loss"] = task_loss = M.log_loss(raw, y, w)
                out[f"{name}/accuracy"] = M.accuracy(raw, y, w)
            else:
                out[f"{name}/rmse"] = r = M.rmse(raw, y, w)
                out[f"{name}/mae"] = M.mae(raw, y, w)
                task_loss = r * r
                if train_means is not None:
                    out[f"{name}/rmse_baseline"] = M.rmse(
                        torch.full_like(y, train_means[t], dtype=torch.float64), y, w
                    )
            total += self.loss_weights[t] * task_loss
        out["loss"] = total if math.isfinite(total) else math.nan
        return out
