"""Several ranks on this machine, for benchmarks and tests of the distributed paths (gloo on CPU;
`cpu:gloo,cuda:nccl` where there are GPUs)."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

# parallel_dims, imported here before any group exists, also imports torch.distributed.optim
# early (see there): a rank function importing TorchRec only inside the rank binds no group
from recsys_moe.distributed.parallel_dims import free_process_groups


def run_gloo_ranks(fn: Callable[..., Any], world: int, *args: Any) -> list[Any]:
    """Runs fn(rank, *args) in `world` spawned processes joined in one gloo process group;
    returns what each rank's call returned, by rank. fn must be a module-level function."""
    return run_ranks(fn, world, "gloo", *args)


def run_ranks(fn: Callable[..., Any], world: int, backend: str, *args: Any) -> list[Any]:
    """run_gloo_ranks with another backend (e.g. "cpu:gloo,cuda:nccl"; rank r uses GPU r)."""
    out = mp.Manager().dict()
    mp.spawn(_rank, args=(world, backend, free_port(), fn, args, out), nprocs=world, join=True)
    return [out[rank] for rank in range(world)]


def _rank(rank: int, world: int, backend: str, port: int, fn, args: tuple, out) -> None:
    # LOCAL_WORLD_SIZE as torchrun sets it: the trainer's default threads are a rank's share
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), LOCAL_WORLD_SIZE=str(world))
    # the ranks share this machine's cores: more threads than cores makes every rank crawl
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    if "nccl" in backend:
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, rank=rank, world_size=world)
    try:
        out[rank] = fn(rank, *args)
    finally:
        # what fn built (trainers, models) can hold process groups in reference cycles
        free_process_groups()


def free_port() -> int:
    """A TCP port on localhost that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
