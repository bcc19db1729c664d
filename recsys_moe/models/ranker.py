"""The multi-task ranker, built unsharded (distributed/ parallelises it from outside).

Legend: B = examples, F = dense features, S = sparse features, E = embedding width,
D = MoE input width, T = tasks, N = experts, O = expert output width.

    sparse KJT -> EmbeddingBagCollection -> [B, S*E] --+
                                                       +-> x [B, D] -> MoE (T gates, N experts)
    dense [B, F] -> bottom MLP -> [B, bottom[-1]] -----+      -> y [T, B, O] -> tower_t -> head_t
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from recsys_moe.config.schema import DataConfig, ModelConfig, TaskType
from recsys_moe.data.batch import Batch
from recsys_moe.modules.embeddings import build_embedding_bags
from recsys_moe.modules.heads import predict, task_loss
from recsys_moe.modules.mlp import MLP
from recsys_moe.moe.experts import ExpertBank
from recsys_moe.moe.gates import GateOutput, build_gate
from recsys_moe.moe.layer import MultiTaskMoE


@dataclass
class RankerOutput:
    """Everything a step produces besides the loss (all detached except task_losses/aux_loss).

    raw:         [B, T] logits (binary tasks) or values (regression tasks).
    predictions: [B, T] probabilities (binary) or values (regression).
    task_losses: [T] each task's masked, weighted mean loss (before loss weights).
    aux_loss:    scalar sum of the gates' regularisers.
    gates:       each task's GateOutput (weights [B, N] and stats), detached.
    moe_stats:   the MoE layer's stats (active_fraction, sparse), detached.
    """

    raw: torch.Tensor
    predictions: torch.Tensor
    task_losses: torch.Tensor
    aux_loss: torch.Tensor
    gates: list[GateOutput]
    moe_stats: dict[str, torch.Tensor]


class MultiTaskRanker(nn.Module):
    """model(batch) -> (loss, RankerOutput).

    loss = sum_t loss_weight_t * task_loss_t + sum of gate regularisers.

    Example:
        >>> model = MultiTaskRanker(cfg.data, cfg.model)
        >>> loss, out = model(batch)          # out.predictions: [B, T]
    """

    def __init__(
        self,
        data: DataConfig,
        model: ModelConfig,
        embedding_device: Optional[torch.device] = None,
    ) -> None:
        super().__init__()
        if not data.tasks:
            raise ValueError("data.tasks is empty: declare at least one task")
        if not data.dense and not data.sparse:
            raise ValueError("data.dense and data.sparse are both empty: declare some features")
        names = [t.name for t in data.tasks]
        if len(set(names)) != len(names):
            raise ValueError(f"data.tasks: task names must be unique, got {names}")
        for key in model.loss_weights:
            if key not in names:
                raise ValueError(
                    f"model.loss_weights.{key}: no task named '{key}' (tasks: {names})"
                )
        for key, value in (
            ("model.expert_dim", model.expert_dim),
            ("model.num_experts", model.num_experts),
        ):
            if value < 1:
                raise ValueError(f"{key} ({value}) must be >= 1")
        if not 0.0 <= model.dropout < 1.0:
            raise ValueError(f"model.dropout ({model.dropout}) must be in [0, 1)")

        self.task_types = [t.type for t in data.tasks]
        self.task_names = names
        self.sparse_arch = (
            build_embedding_bags(
                data.sparse, model.embedding_dim, embedding_device or torch.device("cpu")
            )
            if data.sparse
            else None
        )
        self.bottom = MLP(len(data.dense), model.bottom_mlp) if data.dense else None
        in_dim = len(data.sparse) * model.embedding_dim + (
            self.bottom.out_dim if self.bottom is not None else 0  # an empty MLP has len 0
        )
        self.moe = MultiTaskMoE(
            ExpertBank(
                model.num_experts, in_dim, model.expert_hidden, model.expert_dim, model.dropout
            ),
            [build_gate(model.gate, model.num_experts, in_dim) for _ in data.tasks],
            compute=model.expert_compute,
            sparse_max_active_fraction=model.sparse_max_active_fraction,
        )
        self.towers = nn.ModuleList(
            MLP(model.expert_dim, model.tower, model.dropout) for _ in data.tasks
        )
        self.heads = nn.ModuleList(nn.Linear(t.out_dim, 1) for t in self.towers)
        self.register_buffer(
            "loss_weights",
            torch.tensor([model.loss_weights.get(n, 1.0) for n in names], dtype=torch.float32),
            persistent=False,
        )

    @property
    def num_tasks(self) -> int:
        return len(self.task_types)

    def set_train_progress(self, step: int, total_steps: int) -> None:
        """The trainer calls this once per training step, before the forward: the run is at
        optimizer step `step` (0-based) of `total_steps`. Schedules that follow the run (the
        DSelect-k entropy regulariser) read it; it lives in buffers saved with the model."""
        self.moe.set_train_progress(step, total_steps)

    def features(self, batch: Batch) -> torch.Tensor:
        """The MoE input x [B, D]: pooled embeddings, then the bottom MLP's output."""
        parts = []
        if self.sparse_arch is not None:
            parts.append(self.sparse_arch(batch.sparse).values())  # [B, S*E]
        if self.bottom is not None:
            parts.append(self.bottom(batch.dense))  # [B, bottom[-1]]
        return torch.cat(parts, dim=1)

    def forward(self, batch: Batch) -> tuple[torch.Tensor, RankerOutput]:
        x_BD = self.features(batch)
        moe = self.moe(x_BD)
        raw_BT = torch.cat(
            [head(tower(moe.y[t])) for t, (tower, head) in enumerate(zip(self.towers, self.heads))],
            dim=1,
        )
        losses = []
        for t, kind in enumerate(self.task_types):
            losses.append(
                task_loss(
                    kind,
                    raw_BT[:, t],
                    batch.labels[:, t],
                    None if batch.masks is None else batch.masks[:, t],
                    None if batch.weights is None else batch.weights[:, t],
                )
            )
        task_losses_T = torch.stack(losses)
        aux = moe.aux_loss
        loss = (self.loss_weights * task_losses_T).sum() + aux
        raw = raw_BT.detach()
        preds = torch.stack([predict(k, raw[:, t]) for t, k in enumerate(self.task_types)], dim=1)
        gates = [g.detach() for g in moe.gates]
        return loss, RankerOutput(raw, preds, task_losses_T, aux, gates, moe.stats)

    def is_binary(self, t: int) -> bool:
        return self.task_types[t] == TaskType.binary
