"""How many CPU threads each rank's kernels use (trainer.num_threads).

torch's default is one thread per core of the machine, whatever else runs on it: N ranks on one
node then run N x cores threads, and on a shared machine a busy neighbour makes every
synchronising kernel wait for its slowest thread (2 threads fell to 0.16x of 1 thread's speed on
the 2-core development machine with a busy neighbour). The default here is this process's share
of the cores it may run on: the CPU affinity set (taskset, cgroups, Slurm's --cpus-per-task)
divided by the ranks of this node (LOCAL_WORLD_SIZE, which torchrun sets).
"""

from __future__ import annotations

import os
from typing import Optional

import torch


def available_cores() -> int:
    """Cores this process may run on (its affinity set where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def threads_per_rank() -> int:
    """This rank's share of the cores: available cores // ranks on this node (at least 1)."""
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    return max(1, available_cores() // max(1, local_world))


def set_num_threads(num_threads: Optional[int]) -> int:
    """Applies trainer.num_threads: null = threads_per_rank(), 0 = leave torch's setting,
    n > 0 = n. Returns the number of threads torch now uses."""
    if num_threads is not None and num_threads < 0:
        raise ValueError(
            f"trainer.num_threads ({num_threads}) must be >= 0 (0: torch's default; null: "
            "the cores of this node divided by its ranks)"
        )
    if num_threads is None:
        num_threads = threads_per_rank()
    if num_threads > 0:
        torch.set_num_threads(num_threads)
    return torch.get_num_threads()
