"""The multi-task ranker, built unsharded (distributed/ parallelises it from outside).

Legend: B = examples, F = dense features, S = sparse features, E = embedding width,
D = MoE input width, T = tasks, N = experts, O = expert output width.

    sparse KJT -> EmbeddingBagCollection -> [B, S*E] --+
                                                       +-> x [B, D] -> MoE (T gates, N experts)
    dense [B, F] -> bottom MLP -> [B, bottom[-1]] -----+      -> y [T, B, O] -> tower_t -> head_t
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recsys_moe.config.schema import DataConfig, ModelConfig
from recsys_moe.modules.embeddings import build_embedding_bags
from recsys_moe.modules.mlp import MLP, TaskTowers
from recsys_moe.moe.experts import ExpertBank
from recsys_moe.moe.gates import GateOutput, build_gate
from recsys_moe.moe.layer import MultiTaskMoE


class RankerOutput(NamedTuple):
    """What the ranker computes for a batch (a NamedTuple: TorchRec's pipeline traces through it).

    raw:       [B, T] logits (binary tasks) or values (regression tasks).
    aux_loss:  scalar sum of the gates' regularisers (0 outside training).
    gates:     each task's GateOutput (weights [B, N] and stats).
    moe_stats: the MoE layer's stats (active_fraction, sparse, ep/...), detached.
    """

    raw: torch.Tensor
    aux_loss: torch.Tensor
    gates: list[GateOutput]
    moe_stats: dict[str, torch.Tensor]


class MultiTaskRanker(nn.Module):
    """model(dense [B, F], sparse KJT) -> RankerOutput with raw [B, T]: per-task logits (binary
    tasks) or values (regression tasks). No labels, no loss (those are in models/training.py,
    as TorchRec keeps DLRM apart from DLRMTrain), so an inference model is this module alone.

    Example:
        >>> model = MultiTaskRanker(cfg.data, cfg.model)
        >>> out = model(batch.dense, batch.sparse)          # out.raw: [B, T]
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
        self.sparse_features = (
            [f for t in self.sparse_arch.embedding_bag_configs() for f in t.feature_names]
            if self.sparse_arch is not None
            else []
        )
        self.bottom = MLP(len(data.dense), model.bottom_mlp) if data.dense else None
        in_dim = len(data.sparse) * model.embedding_dim + (
            self.bottom.out_dim if self.bottom is not None else 0  # an empty MLP has len 0
        )
        self.moe = MultiTaskMoE(
            ExpertBank(
                model.num_experts,
                in_dim,
                model.expert_hidden,
                model.expert_dim,
                model.dropout,
                model.expert_kernel,
            ),
            [build_gate(model.gate, model.num_experts, in_dim) for _ in data.tasks],
            compute=model.expert_compute,
            sparse_max_active_fraction=model.sparse_max_active_fraction,
        )
        # every task's tower and head, stacked: [T, I, O] weights, the heads the last layer
        self.towers = TaskTowers(len(data.tasks), model.expert_dim, model.tower, model.dropout)

    @property
    def num_tasks(self) -> int:
        return len(self.task_types)

    def set_train_progress(self, step: int, total_steps: int) -> None:
        """The trainer calls this once per training step, before the forward: the run is at
        optimizer step `step` (0-based) of `total_steps`. Schedules that follow the run (the
        DSelect-k entropy regulariser) read it; it lives in buffers saved with the model."""
        self.moe.set_train_progress(step, total_steps)

    def forward(self, dense: torch.Tensor, sparse: KeyedJaggedTensor) -> RankerOutput:
        # TorchRec's TrainPipelineSparseDist traces this with torch.fx to find the tables' input
        # (sparse): keep it straight-line; the MoE and the towers are opaque (leaf) calls.
        parts = []
        if self.sparse_arch is not None:
            # By name, in the order of the unsharded tables: a sharded collection returns its
            # features grouped by shard, an order that changes with the number of ranks.
            pooled = self.sparse_arch(sparse).to_dict()
            parts += [pooled[f] for f in self.sparse_features]  # S x [B, E]
        if self.bottom is not None:
            parts.append(self.bottom(dense))  # [B, bottom[-1]]
        x_BD = torch.cat(parts, dim=1)
        moe = self.moe(x_BD)
        raw_BT = self.towers(moe.y)  # every task's tower and head at once
        return RankerOutput(raw_BT, moe.aux_loss, moe.gates, moe.stats)
