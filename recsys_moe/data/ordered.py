"""Reading row groups in a given order into batches: no ranks, workers or shuffling.

What prediction reads with (recsys_moe.inference.scoring), and tests. Training reads through
recsys_moe.data.loader, which deals row groups to ranks and shuffles them; both decode and check
rows with the same `UnitDecoder`, so a row is good or bad for the same reasons on both paths.

Legend: B = rows of a batch, F = dense features, T = tasks.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Iterator, Sequence
from typing import NamedTuple, Optional

import pyarrow as pa
import pyarrow.fs as pafs

from recsys_moe.config.schema import DataConfig
from recsys_moe.data.batch import Batch
from recsys_moe.data.files import REASONS, DataError, RowGroup, open_parquet
from recsys_moe.data.parquet import Chunk, UnitDecoder


class OrderedBatch(NamedTuple):
    """batch: the decoded rows; columns: the carried columns of the same rows, as stored (None
    when the reader carries none)."""

    batch: Batch
    columns: Optional[pa.Table]


class OrderedReader:
    """Batches of `batch_size` rows from `units`, in their order; a batch may span row groups
    and files, and the last one is smaller unless `drop_last`.

    labels=False reads the features and `data.row_id` only: label, mask and weight columns
    need not exist, and batches hold labels [B, 0] and no masks or weights. `carry` names
    columns (any type) returned beside each batch, row for row, as stored; every file must hold
    them, with one type. Bad rows follow `cfg.on_bad_rows` (error: DataError naming file, row
    group, row and column; skip: left out, carried columns included, and counted in `skipped`).

    Example:
        >>> scan = scan_split(fs, files, cfg)
        >>> for batch, ids in OrderedReader(cfg, fs, scan.units, 4096, carry=["request_id"]):
        ...     out = model(batch.dense, batch.sparse)
    """

    def __init__(
        self,
        cfg: DataConfig,
        fs: pafs.FileSystem,
        units: Sequence[RowGroup],
        batch_size: int,
        *,
        labels: bool = True,
        carry: Sequence[str] = (),
        drop_last: bool = False,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size ({batch_size}) must be >= 1")
        self.cfg = cfg if labels else dataclasses.replace(cfg, tasks=[])
        self.fs = fs
        self.units = list(units)
        self.batch_size = batch_size
        self.drop_last = drop_last
        self.carry = list(dict.fromkeys(carry))
        self.carried_schema = self._check_carried() if self.carry else None
        self.decoder = UnitDecoder(self.cfg)
        # Over the rows read so far: rows left out per reason (skip), ids hashed per feature.
        self.skipped: Counter = Counter()
        self.hashed: Counter = Counter()

    def _check_carried(self) -> pa.Schema:
        """The carried columns' schema; DataError naming the file and column where a file lacks
        one or stores it with another type than the first file."""
        fields: dict[str, pa.Field] = {}
        first = ""
        for path in dict.fromkeys(u.path for u in self.units):
            schema = open_parquet(self.fs, path).schema_arrow
            for c in self.carry:
                i = schema.get_field_index(c)
                if i < 0:
                    raise DataError(f"{path}: column '{c}' (a carried column) is missing")
                f = schema.field(i)
                if c not in fields:
                    fields[c], first = f, path
                elif f.type != fields[c].type:
                    raise DataError(
                        f"{path}: column '{c}' (a carried column) has type {f.type} but "
                        f"{fields[c].type} in {first}"
                    )
        return pa.schema([fields[c] for c in self.carry])

    def __len__(self) -> int:
        """Batches, if no row is left out."""
        rows = sum(u.num_rows for u in self.units)
        return rows // self.batch_size if self.drop_last else -(-rows // self.batch_size)

    def __iter__(self) -> Iterator[OrderedBatch]:
        keys = self.decoder.keys
        pending: list[tuple[Chunk, Optional[pa.Table]]] = []
        have = 0
        for unit in self.units:
            chunk, carried = self.decoder.read_columns(self.fs, unit, self.carry)
            self._count(chunk)
            if chunk.num_rows == 0:
                continue
            pending.append((chunk, carried))
            have += chunk.num_rows
            if have < self.batch_size:
                continue
            whole, columns = self._cat(pending)
            full = have // self.batch_size * self.batch_size
            for a in range(0, full, self.batch_size):
                yield self._batch(whole, columns, a, a + self.batch_size, keys)
            rest = None if columns is None else columns.slice(full)
            pending, have = [(whole.slice(full, have), rest)], have - full
        if have and not self.drop_last:
            whole, columns = self._cat(pending)
            yield self._batch(whole, columns, 0, have, keys)

    def _count(self, chunk: Chunk) -> None:
        for reason, n in zip(REASONS, chunk.skipped.tolist()):
            if n:
                self.skipped[reason] += n
        for f, n in zip(self.cfg.sparse, chunk.hashed.tolist()):
            if n:
                self.hashed[f.name] += n

    def _cat(
        self, parts: list[tuple[Chunk, Optional[pa.Table]]]
    ) -> tuple[Chunk, Optional[pa.Table]]:
        whole = Chunk.cat([c for c, _ in parts])
        if not self.carry:
            return whole, None
        tables = [t.cast(self.carried_schema) for _, t in parts if t is not None]
        return whole, pa.concat_tables(tables).combine_chunks()

    @staticmethod
    def _batch(
        whole: Chunk, columns: Optional[pa.Table], start: int, stop: int, keys: list[str]
    ) -> OrderedBatch:
        batch = whole.slice(start, stop).to_batch(keys)
        return OrderedBatch(batch, None if columns is None else columns.slice(start, stop - start))
