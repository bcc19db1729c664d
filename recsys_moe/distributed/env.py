"""Process groups and devices: the only place that initialises torch.distributed."""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


@dataclass
class DistEnv:
    """This process's place in the job. `group` is passed to whatever needs to communicate."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    group: dist.ProcessGroup
    owns_group: bool  # True when init_distributed created the default group (and must destroy it)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def pick_device(pref: str, local_rank: int) -> torch.device:
    """trainer.device: auto (CUDA when available), cpu or cuda."""
    if pref not in ("auto", "cpu", "cuda"):
        raise ValueError(f"trainer.device ({pref}) must be auto, cpu or cuda")
    if pref == "cuda" and not torch.cuda.is_available():
        raise ValueError("trainer.device (cuda): CUDA is not available on this machine")
    if pref == "cuda" or (pref == "auto" and torch.cuda.is_available()):
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def init_distributed(device_pref: str = "auto") -> DistEnv:
    """Joins the job torchrun started (RANK/WORLD_SIZE in the environment), or makes a
    single-process group, so that TorchRec's sharding runs the same way for one process or many.

    Reuses an already initialised default group (tests spawn their own gloo ranks).
    """
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(device_pref, local_rank)
    backend = "nccl" if device.type == "cuda" else "gloo"
    owns = False
    if not dist.is_initialized():
        if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
            dist.init_process_group(backend, timeout=datetime.timedelta(minutes=30))
        else:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
        owns = True
    env = DistEnv(
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        local_rank=local_rank,
        device=device,
        group=dist.group.WORLD,
        owns_group=owns,
    )
    log.info("rank %d/%d on %s (%s)", env.rank, env.world_size, device, backend)
    return env


def close_distributed(env: DistEnv) -> None:
    if env.owns_group and dist.is_initialized():
        dist.destroy_process_group()
