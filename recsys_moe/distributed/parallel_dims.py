"""The parallel layout: one object owns the degrees, checks them once and builds the groups.

Ranks sit on a (dp, ep) grid, ep innermost: rank = dp_rank * ep + ep_rank, so the ranks of
one expert-parallel group are consecutive (the GPUs of one node while ep <= GPUs per node,
where the all-to-all stays on NVLink).

- world (every rank): the global batch is split over all of them (each reads its data shards);
  dense parameters are averaged over all of them (DDP); TorchRec shards the tables over them.
- ep group (`ep` ranks): together they hold all n experts, n / ep each, and exchange examples
  by all-to-all.
- dp group (`dp` = world / ep ranks): the replicas of one expert shard; expert gradients are
  reduced over them.

GPU jobs get one process group for both kinds of tensors (`cpu:gloo,cuda:nccl`): the loader and
the metrics reduce host tensors, the model reduces device tensors. Every group gets the job's
collective timeout (trainer.collective_timeout_s): a peer that dies or hangs ends the wait with
an error instead of torch's 30-minute default (which new groups would otherwise get).

Example:
    >>> dims = ParallelDims.from_env(ParallelConfig(ep_size=2), num_experts=8)   # checks only
    >>> dims.init(device_pref="auto", timeout_s=600)                            # joins, groups
    >>> dims.ep_group, dims.dp_group, dims.world_group
"""

from __future__ import annotations

import atexit
import datetime
import functools
import gc
import logging
import os
import sys
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

# Imported before any process group exists, on purpose: its ZeroRedundancyOptimizer module binds
# dist.group.WORLD as a default argument when first imported. Imported later (TorchRec's
# apply_optimizer_in_backward does so in shard_model), it holds the default group past
# destroy_process_group, to be freed in the interpreter's teardown, where gloo's threads can abort
# the process ("terminate called without an active exception", SIGABRT): torchrun then takes a
# finished run for a failed one.
import torch.distributed.optim  # noqa: F401

from recsys_moe.config.schema import ParallelConfig

log = logging.getLogger(__name__)


def free_process_groups() -> None:
    """Frees the process groups now: collects the reference cycles that still hold destroyed
    ones (a closed trainer's), then destroys the default group, and with it every group, if it
    is still up. For the end of a process, while its interpreter is whole: a gloo group freed
    in the interpreter's teardown can abort the process."""
    gc.collect()
    if dist.is_initialized():
        dist.destroy_process_group()


@functools.cache
def _free_groups_before_teardown() -> None:
    """Registers, once per process, an exit hook that frees what is left of the process groups
    while the interpreter is whole (atexit runs before its teardown, where freeing a gloo group
    can abort the process). A closed trainer still holds its destroyed groups in reference
    cycles, which only the collector frees; after an error, its traceback kept them alive until
    then, or still does (sys.last_traceback, when it was not caught). Measured on `python -m
    recsys_moe.train`: a gloo group's 3 threads alive at exit without this hook, whether the run
    finished or failed; none with it."""

    def free() -> None:
        # an error that reached the top level keeps its traceback (and through it the trainer)
        # in sys.last_*: printed by now, it would only keep the groups alive
        for name in ("last_type", "last_value", "last_traceback", "last_exc"):
            if getattr(sys, name, None) is not None:
                setattr(sys, name, None)
        free_process_groups()

    atexit.register(free)


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


def backend_for(device: torch.device) -> str:
    """gloo on CPU; on CUDA one group that reduces host tensors (gloo) and device tensors (nccl)."""
    return "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"


@dataclass
class ParallelDims:
    """World size, expert-parallel degree and the derived expert-replica degree, validated once.

    Build it with `from_env` (no communication: fails before anything is built when the degrees
    do not fit), then `init` joins the job and builds its groups.
    """

    world_size: int
    ep: int
    rank: int = 0
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    groups: dict[str, dist.ProcessGroup] = field(default_factory=dict)  # "ep", "dp" (by init)
    # every group init() made (this rank's and the others', which every rank creates too)
    made_groups: list[dist.ProcessGroup] = field(default_factory=list)
    owns_default_group: bool = False  # init() created the default group (close() destroys it)

    def __post_init__(self) -> None:
        if self.world_size < 1:
            raise ValueError(f"world size ({self.world_size}) must be >= 1")
        if self.ep < 1:
            raise ValueError(f"parallel.ep_size ({self.ep}) must be >= 1")
        if self.world_size % self.ep:
            raise ValueError(
                f"parallel.ep_size ({self.ep}) must divide the world size ({self.world_size})"
            )

    @classmethod
    def from_env(cls, cfg: ParallelConfig, num_experts: int) -> ParallelDims:
        """The layout of the job torchrun started (WORLD_SIZE, RANK, LOCAL_RANK), or of a single
        process, checked against the model: nothing is communicated or built yet."""
        if dist.is_initialized():  # tests spawn their own ranks
            world, rank = dist.get_world_size(), dist.get_rank()
        else:
            world = int(os.environ.get("WORLD_SIZE", "1"))
            rank = int(os.environ.get("RANK", "0"))
        dims = cls(world, cfg.ep_size, rank, int(os.environ.get("LOCAL_RANK", "0")))
        dims.check_experts(num_experts)
        return dims

    def check_experts(self, num_experts: int) -> None:
        if num_experts % self.ep:
            raise ValueError(
                f"model.num_experts ({num_experts}) must be divisible by parallel.ep_size "
                f"({self.ep})"
            )

    # -- degrees and coordinates ---------------------------------------------------------------

    @property
    def dp(self) -> int:
        """Replicas of each expert shard (world / ep)."""
        return self.world_size // self.ep

    @property
    def ep_rank(self) -> int:
        return self.rank % self.ep

    @property
    def dp_rank(self) -> int:
        return self.rank // self.ep

    def layout(self) -> dict[str, list[list[int]]]:
        """The ranks of every group along each axis: "ep" groups are consecutive ranks, "dp"
        groups (replicas of one expert shard) take every ep-th rank."""
        return {
            "ep": [list(range(d * self.ep, (d + 1) * self.ep)) for d in range(self.dp)],
            "dp": [list(range(e, self.world_size, self.ep)) for e in range(self.ep)],
        }

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def ep_enabled(self) -> bool:
        return self.ep > 1

    # -- groups --------------------------------------------------------------------------------

    def init(self, device_pref: str = "auto", timeout_s: float = 600.0) -> ParallelDims:
        """Joins the job (or makes a one-process group, so that TorchRec's sharding runs the same
        way for one process or many) and builds this rank's ep and dp groups. Reuses an already
        initialised default group (tests spawn their own ranks)."""
        if not timeout_s > 0:
            raise ValueError(f"trainer.collective_timeout_s ({timeout_s}) must be > 0")
        self.device = pick_device(device_pref, self.local_rank)
        backend = backend_for(self.device)
        timeout = datetime.timedelta(seconds=timeout_s)
        if not dist.is_initialized():
            if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
                # torchrun's store outlives a restart of the workers (--max-restarts): keys of
                # the dead attempt's gloo group would point the new one at its closed sockets,
                # so every attempt gets keys of its own
                store, rank, world = next(dist.rendezvous("env://", timeout=timeout))
                attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
                dist.init_process_group(
                    backend,
                    store=dist.PrefixStore(f"recsys_moe/attempt{attempt}", store),
                    rank=rank,
                    world_size=world,
                    timeout=timeout,
                )
            else:
                dist.init_process_group(
                    backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout
                )
            self.owns_default_group = True
            _free_groups_before_teardown()
        if dist.get_world_size() != self.world_size or dist.get_rank() != self.rank:
            raise RuntimeError(
                f"the process group (rank {dist.get_rank()} of {dist.get_world_size()}) is not "
                f"the job this layout was checked for (rank {self.rank} of {self.world_size})"
            )
        # every rank creates every group, in the same order (torch.distributed requires it)
        for axis, ranks in self.layout().items():
            mine, every = dist.new_subgroups_by_enumeration(ranks, timeout=timeout)
            self.groups[axis] = mine
            self.made_groups += every
        log.info(
            "rank %d/%d on %s (%s): ep %d (rank %d in its group), expert replicas %d",
            self.rank,
            self.world_size,
            self.device,
            backend,
            self.ep,
            self.ep_rank,
            self.dp,
        )
        return self

    def _group(self, axis: str) -> dist.ProcessGroup:
        if axis not in self.groups:
            raise RuntimeError("ParallelDims.init() has not built the groups yet")
        return self.groups[axis]

    @property
    def world_group(self) -> dist.ProcessGroup:
        return dist.group.WORLD  # type: ignore[return-value]

    @property
    def ep_group(self) -> dist.ProcessGroup:
        return self._group("ep")

    @property
    def dp_group(self) -> dist.ProcessGroup:
        return self._group("dp")

    def close(self) -> None:
        """Destroys what init() made: the default group where it created it (and with it every
        group), else only its own groups, so that a process that outlives many trainers (a
        benchmark, a notebook, a test) does not accumulate them."""
        if dist.is_initialized():
            if self.owns_default_group:
                dist.destroy_process_group()
            else:
                for group in self.made_groups:  # a rank's non-member placeholders are skipped
                    dist.destroy_process_group(group)
        self.made_groups.clear()
        self.groups.clear()
        self.owns_default_group = False
