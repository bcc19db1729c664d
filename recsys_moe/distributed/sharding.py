"""TorchRec sharding of the embedding tables, with their optimizer fused into backward.

The model is built unsharded (tables on the meta device); this module applies the fused sparse
optimizer, plans the sharding with TorchRec's planner and wraps the model in
DistributedModelParallel. Dense parameters are returned for the dense optimizer.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence

import torch
from torch import nn
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torch.distributed.tensor import DTensor
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig
from torchrec.distributed.model_parallel import DefaultDataParallelWrapper, DistributedModelParallel
from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints
from torchrec.distributed.planner.storage_reservations import FixedPercentageStorageReservation
from torchrec.distributed.planner.types import KernelConfig, TopologyFactory
from torchrec.distributed.planner.types import TrainerConfig as PlannerTrainerConfig
from torchrec.distributed.types import ShardingEnv, ShardingType
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
from torchrec.optim.optimizers import in_backward_optimizer_filter

from recsys_moe.config.schema import SparseOptimConfig
from recsys_moe.distributed.parallel_dims import ParallelDims

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
    model: nn.Module,
    dims: ParallelDims,
    sparse: SparseOptimConfig,
    sharding_types: Sequence[str] = (),
    ddp_ignore: Sequence[str] = (),
) -> DistributedModelParallel:
    """Fuses the sparse optimizer into the tables' backward and shards them over all ranks.

    sharding_types: what the planner may use (parallel.embedding_sharding_types); empty:
    table_wise on CPU (the planner rejects row_wise there, and data_parallel tables would leave
    the fused optimizer), its free choice on CUDA.
    ddp_ignore: parameter names DDP must leave alone (expert-parallel experts: they differ
    between ranks and are reduced by ExpertGradSync).
    """
    valid = {t.value for t in ShardingType}
    for t in sharding_types:
        if t not in valid:
            raise ValueError(
                f"parallel.embedding_sharding_types: {t!r} is not one of {sorted(valid)}"
            )
    types = list(sharding_types) or (
        [ShardingType.TABLE_WISE.value] if dims.device.type == "cpu" else []
    )
    ebcs = [m for m in model.modules() if isinstance(m, EmbeddingBagCollection)]
    optim_cls, optim_kwargs = _sparse_optimizer(sparse)
    constraints: dict[str, ParameterConstraints] = {}
    for ebc in ebcs:
        apply_optimizer_in_backward(optim_cls, ebc.parameters(), optim_kwargs)
        if types:
            for table in ebc.embedding_bag_configs():
                constraints[table.name] = ParameterConstraints(sharding_types=types)
    local = (
        min(dims.world_size, torch.cuda.device_count())
        if dims.device.type == "cuda"
        else dims.world_size
    )
    topology = TopologyFactory.create_topology(
        trainer_config=PlannerTrainerConfig(world_size=dims.world_size, local_world_size=local),
        kernel_config=KernelConfig(compute_device=dims.device.type),
    )
    planner = EmbeddingShardingPlanner(
        topology=topology,
        constraints=constraints,
        # TorchRec's recommended reservation (the heuristic default over-estimates in dry runs).
        storage_reservation=FixedPercentageStorageReservation(0.15),
    )
    group = dims.world_group
    plan = planner.collective_plan(model, None, group)
    return DistributedModelParallel(
        model,
        env=ShardingEnv.from_process_group(group),
        device=dims.device,
        plan=plan,
        # One process needs no gradient all-reduce. Over many, DDP averages dense gradients.
        # Every path uses every DDP parameter in every step (the grouped expert kernels write
        # full, zero-filled gradients), so DDP need not search the graph for unused ones.
        init_data_parallel=dims.world_size > 1,
        data_parallel_wrapper=DefaultDataParallelWrapper(
            static_graph=False, find_unused_parameters=False, params_to_ignore=list(ddp_ignore)
        ),
    )


def init_tables(model: nn.Module, configs: Sequence[EmbeddingBagConfig], seed: int) -> None:
    """Re-initialises every table's rows from (seed, table, row block) alone, whatever rank and
    shard holds them: TorchRec initialises each shard with its owner's RNG, so the same job on
    another number of ranks would start from other embeddings. Values follow TorchRec's default,
    U(-sqrt(1 / rows), sqrt(1 / rows)) (or the config's weight_init_min/max)."""
    by_name = {c.name: c for c in configs}
    done = set()
    with torch.no_grad():
        for name, t in model.state_dict().items():
            parts = name.split(".")
            if len(parts) < 3 or parts[-3] != "embedding_bags" or parts[-1] != "weight":
                continue
            if parts[-2] not in by_name:
                continue
            cfg = by_name[parts[-2]]
            done.add(cfg.name)
            for offsets, local in local_blocks(t):
                local.copy_(_table_rows(cfg, seed, offsets, local.shape).to(local))
    if done != set(by_name):
        raise RuntimeError(f"tables {sorted(set(by_name) - done)} not found in the state dict")


def local_blocks(t: torch.Tensor) -> list[tuple[tuple[int, int], torch.Tensor]]:
    """(global (row, column) offset, local tensor) of each piece of a table this rank holds."""
    if isinstance(t, ShardedTensor):
        return [(tuple(s.metadata.shard_offsets), s.tensor) for s in t.local_shards()]
    if isinstance(t, DTensor):
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        _, offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
        return [(tuple(offset), t.to_local())]
    return [((0, 0), t)]


_ROW_BLOCK = 4096


def _table_rows(cfg, seed: int, offsets: tuple[int, int], shape: torch.Size) -> torch.Tensor:
    """Rows [r0, r0 + shape[0]) and columns [c0, c0 + shape[1]) of the table's initial values:
    each block of 4096 rows drawn from its own generator, seeded by (seed, table, block)."""
    r0, c0 = offsets
    rows, cols = shape
    lo, hi = cfg.get_weight_init_min(), cfg.get_weight_init_max()
    out = torch.empty(rows, cols, dtype=torch.float32)
    first, last = r0 // _ROW_BLOCK, (r0 + rows - 1) // _ROW_BLOCK
    for block in range(first, last + 1):
        b0 = block * _ROW_BLOCK
        n = min(_ROW_BLOCK, cfg.num_embeddings - b0)
        key = hashlib.sha256(f"{seed}/{cfg.name}/{block}".encode()).digest()[:8]
        g = torch.Generator().manual_seed(int.from_bytes(key, "little") >> 1)
        values = torch.empty(n, cfg.embedding_dim).uniform_(lo, hi, generator=g)
        a, b = max(r0, b0), min(r0 + rows, b0 + n)
        out[a - r0 : b - r0] = values[a - b0 : b - b0, c0 : c0 + cols]
    return out


def dense_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """Parameters not updated by a fused in-backward optimizer (those go to the dense optimizer)."""
    return list(in_backward_optimizer_filter(model.named_parameters()))
