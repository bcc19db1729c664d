"""Streaming Parquet reader: row groups in, `Batch`es out, with bounded memory.

Work units are row groups (`RowGroup`): the reader holds at most one decoded row group plus the
unfinished tail of the previous one, whatever the file sizes. Tensors are built from Arrow
buffers column by column (numpy views and copies, no per-row Python loop).

The unit list is an argument, so a caller can split units over ranks and workers, shuffle them
per epoch and resume from a cursor without the reader knowing about any of it.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch.utils.data import IterableDataset
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recsys_moe.config.schema import DataConfig
from recsys_moe.data.batch import Batch
from recsys_moe.data.files import DataError


@dataclass(frozen=True)
class RowGroup:
    """One work unit: row group `index` of the Parquet file `path`."""

    path: str
    index: int
    num_rows: int


def list_row_groups(files: Sequence[str]) -> list[RowGroup]:
    """All row groups of the files, in file order (reads footers only)."""
    units: list[RowGroup] = []
    for path in files:
        meta = pq.read_metadata(path)
        units.extend(
            RowGroup(path, i, meta.row_group(i).num_rows) for i in range(meta.num_row_groups)
        )
    return units


class BatchBuilder:
    """Converts an Arrow table holding the configured columns into a `Batch`.

    Example:
        >>> builder = BatchBuilder(cfg.data)
        >>> batch = builder(pq.read_table(path, columns=builder.columns))
    """

    def __init__(self, cfg: DataConfig) -> None:
        self.cfg = cfg
        self.keys = [f.name for f in cfg.sparse]
        cols = list(cfg.dense) + [f.column_name for f in cfg.sparse]
        for t in cfg.tasks:
            cols.append(t.label_column)
            cols += [c for c in (t.mask, t.weight) if c]
        self.columns = list(dict.fromkeys(cols))  # deduplicated, order kept
        self.has_masks = any(t.mask for t in cfg.tasks)
        self.has_weights = any(t.weight for t in cfg.tasks)

    def __call__(self, table: pa.Table, where: str = "") -> Batch:
        n = table.num_rows
        dense = np.empty((n, len(self.cfg.dense)), dtype=np.float32)
        for j, c in enumerate(self.cfg.dense):
            dense[:, j] = _numeric(table, c, where)

        values, lengths = [], []
        for f in self.cfg.sparse:
            col = table.column(f.column_name)
            if col.null_count:
                raise DataError(
                    f"{where}column '{f.column_name}' (sparse feature {f.name}) has {col.null_count} null rows"
                )
            if pa.types.is_list(col.type) or pa.types.is_large_list(col.type):
                arr = col.combine_chunks() if col.num_chunks != 1 else col.chunk(0)
                offsets = arr.offsets.to_numpy()
                lengths.append(np.diff(offsets).astype(np.int32))
                values.append(
                    arr.flatten().to_numpy(zero_copy_only=False).astype(np.int64, copy=False)
                )
            else:
                lengths.append(np.ones(n, dtype=np.int32))
                values.append(col.to_numpy().astype(np.int64, copy=False))
        sparse = KeyedJaggedTensor(
            keys=self.keys,
            values=torch.from_numpy(np.concatenate(values) if values else np.zeros(0, np.int64)),
            lengths=torch.from_numpy(np.concatenate(lengths) if lengths else np.zeros(0, np.int32)),
            stride=n,
        )

        T = len(self.cfg.tasks)
        labels = np.empty((n, T), dtype=np.float32)
        masks = np.ones((n, T), dtype=bool) if self.has_masks else None
        weights = np.ones((n, T), dtype=np.float32) if self.has_weights else None
        for t, task in enumerate(self.cfg.tasks):
            labels[:, t] = _numeric(table, task.label_column, where)
            if task.mask:
                masks[:, t] = _numeric(table, task.mask, where) != 0  # type: ignore[index]
            if task.weight:
                weights[:, t] = _numeric(table, task.weight, where)  # type: ignore[index]
        return Batch(
            dense=torch.from_numpy(dense),
            sparse=sparse,
            labels=torch.from_numpy(labels),
            masks=None if masks is None else torch.from_numpy(masks),
            weights=None if weights is None else torch.from_numpy(weights),
        )


def _numeric(table: pa.Table, column: str, where: str) -> np.ndarray:
    col = table.column(column)
    if col.null_count:
        raise DataError(f"{where}column '{column}' has {col.null_count} null rows")
    return col.to_numpy()


class ParquetBatchReader(IterableDataset):
    """Streams `Batch`es of `batch_size` rows from row groups, in the order given.

    A batch may span row groups (and files); the last batch is smaller unless `drop_last`.

    Example:
        >>> units = list_row_groups(resolve_split(cfg.data.path, cfg.data.train, "data.train"))
        >>> for batch in ParquetBatchReader(units, BatchBuilder(cfg.data), batch_size=512): ...
    """

    def __init__(
        self,
        units: Sequence[RowGroup],
        builder: BatchBuilder,
        batch_size: int,
        drop_last: bool = False,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size ({batch_size}) must be >= 1")
        self.units = list(units)
        self.builder = builder
        self.batch_size = batch_size
        self.drop_last = drop_last

    def __len__(self) -> int:
        rows = sum(u.num_rows for u in self.units)
        return rows // self.batch_size if self.drop_last else -(-rows // self.batch_size)

    def _tables(self) -> Iterator[tuple[pa.Table, str]]:
        current, current_path = None, None  # keep the file open across its row groups
        for unit in self.units:
            try:
                if current_path != unit.path:
                    current, current_path = pq.ParquetFile(unit.path), unit.path
                table = current.read_row_group(unit.index, columns=self.builder.columns)
            except Exception as e:  # noqa: BLE001 - corrupt pages raise several pyarrow errors
                raise DataError(
                    f"{unit.path}: row group {unit.index} could not be read ({e})"
                ) from e
            yield table, f"{unit.path}: row group {unit.index}: "

    def __iter__(self) -> Iterator[Batch]:
        pending: Optional[pa.Table] = None
        where = ""
        for table, where in self._tables():
            pending = table if pending is None else pa.concat_tables([pending, table])
            while pending.num_rows >= self.batch_size:
                yield self.builder(pending.slice(0, self.batch_size), where)
                pending = pending.slice(self.batch_size)
        if pending is not None and pending.num_rows and not self.drop_last:
            yield self.builder(pending, where)
