"""Collectives for code that runs the same way on one process or many.

The group is always passed in. Each helper is a no-op on a group of one rank (or when no
process group exists, as in single-process unit tests), so callers need no guards of their own.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Optional

import torch
import torch.distributed as dist


def spans_ranks(group: Optional[dist.ProcessGroup]) -> bool:
    """True when `group` has more than one rank (collectives over it do something)."""
    return group is not None and dist.is_initialized() and dist.get_world_size(group) > 1


def all_reduce_(
    t: torch.Tensor,
    group: Optional[dist.ProcessGroup],
    op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM,
) -> torch.Tensor:
    """Reduces `t` in place over `group` and returns it."""
    if spans_ranks(group):
        dist.all_reduce(t, op=op, group=group)
    return t


def all_reduce_int(
    value: int,
    group: Optional[dist.ProcessGroup],
    op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM,
) -> int:
    """A host integer reduced over `group` (a host tensor: gloo, or the gloo half of a mixed group)."""
    return int(all_reduce_(torch.tensor([value], dtype=torch.int64), group, op).item())


def all_gather_objects(obj: Any, group: Optional[dist.ProcessGroup]) -> list[Any]:
    """Every rank's `obj`, by rank in `group` ([obj] on one rank)."""
    if not spans_ranks(group):
        return [obj]
    out: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


def mean_over(group: dist.ProcessGroup) -> Callable[[torch.Tensor], torch.Tensor]:
    """A function that returns the mean of a tensor over `group` (a new tensor; every rank of
    the group must call it, in the same order)."""
    size = dist.get_world_size(group)

    def mean(t: torch.Tensor) -> torch.Tensor:
        return all_reduce_(t.clone(), group) / size

    return mean
