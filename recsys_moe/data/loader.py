"""Train and eval inputs of one rank: which row groups it reads, and how many steps it runs.

Every rank must run the same number of steps (TorchRec's sharded embeddings communicate in every
forward), so:
- train: row groups are dealt to ranks round-robin; each rank runs the global minimum of its full
  batches per epoch and the rows beyond it (the global remainder) are dropped, counted and logged;
- eval: nothing is dropped (metrics cover every row); a rank that runs out of batches keeps
  stepping on a padding batch whose rows are all masked out.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Optional

import torch
import torch.distributed as dist

from recsys_moe.config.schema import DataConfig
from recsys_moe.data.batch import Batch
from recsys_moe.data.files import ColumnKinds, check_columns, resolve_split
from recsys_moe.data.parquet import BatchBuilder, ParquetBatchReader, RowGroup, list_row_groups

log = logging.getLogger(__name__)


def _all_reduce(value: int, op: dist.ReduceOp, group: Optional[dist.ProcessGroup]) -> int:
    if group is None or dist.get_world_size(group) == 1:
        return value
    t = torch.tensor([value], dtype=torch.int64)
    dist.all_reduce(t, op=op, group=group)
    return int(t.item())


class SplitInput:
    """One split (train or eval) as seen by one rank.

    Example:
        >>> train = SplitInput(cfg.data, "train", rank=0, world_size=1)
        >>> for batch in train.batches(): ...
    """

    def __init__(
        self,
        cfg: DataConfig,
        split: str,
        rank: int = 0,
        world_size: int = 1,
        group: Optional[dist.ProcessGroup] = None,
    ) -> None:
        if split not in ("train", "eval"):
            raise ValueError(f"split ({split}) must be train or eval")
        self.split = split
        self.files = resolve_split(cfg.path, getattr(cfg, split), f"data.{split}")
        self.columns: ColumnKinds = check_columns(self.files, cfg)
        self.batch_size = cfg.batch_size if split == "train" else cfg.eval_batch_size
        key = "data.batch_size" if split == "train" else "data.eval_batch_size"
        if self.batch_size < 1:
            raise ValueError(f"{key} ({self.batch_size}) must be >= 1")
        all_units = list_row_groups(self.files)
        self.total_rows = sum(u.num_rows for u in all_units)
        if self.total_rows == 0:
            raise ValueError(
                f"data.{split}: the files at {cfg.path}/{getattr(cfg, split)} hold no rows"
            )
        self.units: list[RowGroup] = all_units[rank::world_size]
        rows = sum(u.num_rows for u in self.units)
        self.reader = ParquetBatchReader(
            self.units, BatchBuilder(cfg), self.batch_size, drop_last=split == "train"
        )
        if split == "train":
            self.steps = _all_reduce(rows // self.batch_size, dist.ReduceOp.MIN, group)
            self.dropped_rows = self.total_rows - self.steps * self.batch_size * world_size
            if self.steps == 0:
                raise ValueError(
                    f"data.batch_size ({self.batch_size}) x {world_size} rank(s) is larger than what "
                    f"some rank reads of data.train ({rows} rows on rank {rank})"
                )
        else:
            self.steps = _all_reduce(len(self.reader), dist.ReduceOp.MAX, group)
            self.dropped_rows = 0

    def batches(self) -> Iterator[tuple[Batch, bool]]:
        """Exactly `steps` batches as (batch, real); real is False for eval padding batches."""
        produced = 0
        first: Optional[Batch] = None
        for batch in self.reader:
            if produced == self.steps:
                break
            first = first or batch
            produced += 1
            yield batch, True
        while produced < self.steps:  # eval only: keep the collectives of other ranks company
            if first is None:
                raise ValueError(f"data.{self.split}: this rank has no rows to pad with")
            yield _masked_out(first), False
            produced += 1


def _masked_out(batch: Batch) -> Batch:
    return Batch(
        dense=batch.dense,
        sparse=batch.sparse,
        labels=batch.labels,
        masks=torch.zeros_like(batch.labels, dtype=torch.bool),
        weights=batch.weights,
    )
