"""TorchRec sharding of the embedding tables, with their optimizer fused into backward.

The model is built unsharded (tables on the meta device); this module applies the fused sparse
optimizer, plans the sharding with TorchRec's planner and wraps the model in
DistributedModelParallel. Dense parameters are returned for the dense optimizer.
"""

from __future__ import annotations

import logging

import torch
from torch import nn
from torchrec import EmbeddingBagCollection
from torchrec.distributed.model_parallel import DefaultDataParallelWrapper, DistributedModelParallel
from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints
from torchrec.distributed.planner.storage_reservations import FixedPercentageStorageReservation
from torchrec.distributed.planner.types import KernelConfig, TopologyFactory
from torchrec.distributed.planner.types import TrainerConfig as PlannerTrainerConfig
from torchrec.distributed.types import ShardingEnv, ShardingType
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
from torchrec.optim.optimizers import in_backward_optimizer_filter

from recsys_moe.config.schema import SparseOptimConfig
from recsys_moe.distributed.env import DistEnv

log = logging.getLogger(__name__)


def _sparse_optimizer(cfg: SparseOptimConfig) -> tuple[type, dict[str, float]]:
    import torchrec.optim as trec_optim

    kinds = {
        "rowwise_adagrad": (
            trec_optim.RowWiseAdagrad,
            {"lr": cfg.lr, "eps": cfg.eps, "weight_decay": cfg.weight_decay},
        ),
        "adagrad": (
            torch.optim.Adagrad,
            {"lr": cfg.lr, "eps": cfg.eps, "weight_decay": cfg.weight_decay},
        ),
        "adam": (
            torch.optim.Adam,
            {"lr": cfg.lr, "eps": cfg.eps, "weight_decay": cfg.weight_decay},
        ),
        "sgd": (torch.optim.SGD, {"lr": cfg.lr}),
    }
    if cfg.name not in kinds:
        raise ValueError(f"optim.sparse.name ({cfg.name}) must be one of {sorted(kinds)}")
    return kinds[cfg.name]


def shard_model(
    model: nn.Module, env: DistEnv, sparse: SparseOptimConfig
) -> DistributedModelParallel:
    """Fuses the sparse optimizer into the tables' backward and shards them over env.group.

    On CPU the planner may only use table_wise sharding (it rejects row_wise there, and
    data_parallel tables would leave the fused optimizer); on CUDA it chooses freely.
    """
    ebcs = [m for m in model.modules() if isinstance(m, EmbeddingBagCollection)]
    optim_cls, optim_kwargs = _sparse_optimizer(sparse)
    constraints: dict[str, ParameterConstraints] = {}
    for ebc in ebcs:
        apply_optimizer_in_backward(optim_cls, ebc.parameters(), optim_kwargs)
        if env.device.type == "cpu":
            for table in ebc.embedding_bag_configs():
                constraints[table.name] = ParameterConstraints(
                    sharding_types=[ShardingType.TABLE_WISE.value]
                )
    local = (
        min(env.world_size, torch.cuda.device_count())
        if env.device.type == "cuda"
        else env.world_size
    )
    topology = TopologyFactory.create_topology(
        trainer_config=PlannerTrainerConfig(world_size=env.world_size, local_world_size=local),
        kernel_config=KernelConfig(compute_device=env.device.type),
    )
    planner = EmbeddingShardingPlanner(
        topology=topology,
        constraints=constraints,
        # TorchRec's recommended reservation (the heuristic default over-estimates in dry runs).
        storage_reservation=FixedPercentageStorageReservation(0.15),
    )
    plan = planner.collective_plan(model, None, env.group)
    dmp = DistributedModelParallel(
        model,
        env=ShardingEnv.from_process_group(env.group),
        device=env.device,
        plan=plan,
        # One process needs no gradient all-reduce. Over many, DDP averages dense gradients;
        # unused parameters are allowed because sparse MoE paths may skip experts in a step.
        init_data_parallel=env.world_size > 1,
        data_parallel_wrapper=DefaultDataParallelWrapper(
            static_graph=False, find_unused_parameters=True
        ),
    )
    return dmp


def dense_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """Parameters not updated by a fused in-backward optimizer (those go to the dense optimizer)."""
    return list(in_backward_optimizer_filter(model.named_parameters()))
