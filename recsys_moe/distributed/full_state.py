"""The whole model's parameters as one process holds them: sharded tables assembled, each rank's
experts put back at their global indices. For comparing runs across world sizes and for
handing a trained model to a single device.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed._shard.sharded_tensor import ShardedTensor

from recsys_moe.distributed.parallel_dims import ParallelDims
from recsys_moe.moe.dispatch.all_to_all import AllToAllDispatcher
from recsys_moe.moe.layer import MultiTaskMoE


def full_state_dict(model: nn.Module, dims: ParallelDims) -> dict[str, torch.Tensor]:
    """Every parameter and buffer of `model` (DMP-wrapped or not) as unsharded CPU tensors, on
    every rank (a collective over the world group: call it on all ranks).

    Keys are those of the unwrapped model (no DMP/DDP prefixes); experts of an expert-parallel
    MultiTaskMoE are gathered over the ep group into [num_experts, ...] tensors.
    """
    state = model.state_dict()
    inner = getattr(model, "module", model)
    expert_prefixes = {
        f"{name}.experts." if name else "experts."
        for name, m in inner.named_modules()
        if isinstance(m, MultiTaskMoE) and isinstance(m.dispatcher, AllToAllDispatcher)
    }
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if isinstance(value, ShardedTensor):
            out[key] = _gather_sharded(value, dims)
        elif any(key.startswith(p) for p in expert_prefixes):
            parts: list[torch.Tensor] = [torch.empty_like(value) for _ in range(dims.ep)]
            dist.all_gather(parts, value.detach().contiguous(), group=dims.ep_group)
            out[key] = torch.cat(parts).cpu()
        elif isinstance(value, torch.Tensor):
            out[key] = value.detach().cpu().clone()
    return out


def _gather_sharded(t: ShardedTensor, dims: ParallelDims) -> torch.Tensor:
    """The full tensor from the shards of all ranks (each rank adds its shards, then a sum)."""
    full = torch.zeros(t.size(), dtype=t.dtype)
    for shard in t.local_shards():
        index = tuple(
            slice(o, o + n)
            for o, n in zip(shard.metadata.shard_offsets, shard.metadata.shard_sizes)
        )
        full[index] = shard.tensor.detach().cpu()
    if dims.world_size > 1:
        dist.all_reduce(full, group=dims.world_group)  # shards do not overlap: a sum assembles
    return full
