"""Decoding work units: one row group in, one validated `Chunk` of tensors out.

Tensors are built from Arrow buffers column by column (numpy views and vectorised checks, no
per-row Python loop). Every row is checked for the bad-input cases of `files.REASONS`; a bad row
raises DataError naming file, row group, column and row (data.on_bad_rows=error) or is left out
and counted per reason (skip). Ids outside a table of a feature with id_policy=hash are mapped
into range by `hash_ids` and counted per feature.

Legend: n = rows, F = dense features, T = tasks.
"""

from __future__ import annotations

import threading
import warnings
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recsys_moe.config.schema import BadRows, DataConfig, IdPolicy, TaskType
from recsys_moe.data.batch import Batch
from recsys_moe.data.files import REASONS, DataError, RowGroup, expected_columns, open_parquet

__all__ = ["Chunk", "RowGroup", "UnitDecoder", "hash_ids"]

_REASON_INDEX = {r: i for i, r in enumerate(REASONS)}


def hash_ids(ids: np.ndarray, num_embeddings: int) -> np.ndarray:
    """splitmix64's finaliser of each int64 id (as unsigned), modulo num_embeddings.

    Stable across runs, machines and numpy versions, so hashed ids keep their rows in a resumed
    or exported model.
    """
    z = ids.astype(np.uint64, copy=True)
    z ^= z >> np.uint64(30)
    z *= np.uint64(0xBF58476D1CE4E5B9)
    z ^= z >> np.uint64(27)
    z *= np.uint64(0x94D049BB133111EB)
    z ^= z >> np.uint64(31)
    return (z % np.uint64(num_embeddings)).astype(np.int64)


def _tensor(a: np.ndarray) -> torch.Tensor:
    """A tensor sharing `a`'s memory, which may be a read-only view of an Arrow buffer.

    Not copying saves ~40% of decoding. It is safe because nothing writes into a Chunk's tensors
    in place: windows are concatenated or permuted into new memory, batches are views whose
    ids are concatenated into a new KeyedJaggedTensor, and the model never writes its inputs.
    """
    if not a.flags.c_contiguous:
        a = np.ascontiguousarray(a)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "The given NumPy array is not writable"
        return torch.from_numpy(a)


@dataclass
class Chunk:
    """Decoded rows: the columns of `data` as tensors (one work unit, a window or a batch).

    dense [n, F] float32; values[s] int64 ids and lengths[s] [n] int32 of sparse feature s;
    labels [n, T] float32 (where masked: as stored, 0 if not finite; T = 0 for a config without
    tasks, as prediction reads); masks/weights [n, T] or None; row_ids [n] or None.
    skipped: rows left out per reason (order of REASONS); hashed: ids hashed per sparse feature.
    """

    dense: torch.Tensor
    values: list[torch.Tensor]
    lengths: list[torch.Tensor]
    labels: torch.Tensor
    masks: Optional[torch.Tensor]
    weights: Optional[torch.Tensor]
    row_ids: Optional[torch.Tensor]
    skipped: torch.Tensor  # [len(REASONS)] int64
    hashed: torch.Tensor  # [S] int64
    _offsets: Optional[list[torch.Tensor]] = field(default=None, repr=False)

    @property
    def num_rows(self) -> int:
        return self.labels.shape[0]

    def _rows(self) -> list[Optional[torch.Tensor]]:
        return [self.dense, self.labels, self.masks, self.weights, self.row_ids]

    @staticmethod
    def _from_rows(rows, values, lengths, skipped, hashed) -> Chunk:
        dense, labels, masks, weights, row_ids = rows
        return Chunk(dense, values, lengths, labels, masks, weights, row_ids, skipped, hashed)

    # Window-sized copies (cat, take) run in numpy: single-threaded and memory-bound, they are
    # several times faster than torch's thread pool when the trainer's threads share the cores.

    @staticmethod
    def cat(chunks: Sequence[Chunk]) -> Chunk:
        if len(chunks) == 1:
            return chunks[0]
        rows = []
        for parts in zip(*(c._rows() for c in chunks)):
            if all(p is None for p in parts):
                rows.append(None)
                continue
            # Padding rows carry masks (all False) and weights (0) even where the data has none:
            # the real rows then get masks True and weights 1.
            like = next(p for p in parts if p is not None)
            rows.append(
                _cat(
                    [
                        p
                        if p is not None
                        else torch.ones((c.num_rows, *like.shape[1:]), dtype=like.dtype)
                        for p, c in zip(parts, chunks)
                    ]
                )
            )
        S = len(chunks[0].values)
        return Chunk._from_rows(
            rows,
            [_cat([c.values[s] for c in chunks]) for s in range(S)],
            [_cat([c.lengths[s] for c in chunks]) for s in range(S)],
            sum(c.skipped for c in chunks),
            sum(c.hashed for c in chunks),
        )

    def slice(self, start: int, stop: int) -> Chunk:
        """Rows [start, stop) as views (no copy)."""
        rows = [None if t is None else t[start:stop] for t in self._rows()]
        if self._offsets is None:  # once per chunk: a window is sliced into many batches
            self._offsets = [_offsets(n.numpy()) for n in self.lengths]
        values = [v[o[start] : o[stop]] for v, o in zip(self.values, self._offsets)]
        return Chunk._from_rows(
            rows,
            values,
            [n[start:stop] for n in self.lengths],
            torch.zeros_like(self.skipped),
            torch.zeros_like(self.hashed),
        )

    def split(self, start: int, size: int) -> list[Chunk]:
        """The full consecutive chunks of `size` rows from row `start` on, as views: one split
        per column for a whole window, rather than a dozen slicing calls per batch."""
        count = (self.num_rows - start) // size
        if count <= 0:
            return []
        stop = start + count * size
        if self._offsets is None:
            self._offsets = [_offsets(n.numpy()) for n in self.lengths]
        rows = [None if t is None else t[start:stop].split(size) for t in self._rows()]
        values = []
        for v, o in zip(self.values, self._offsets):
            bounds = o[start : stop + 1 : size]
            values.append(v[bounds[0] : bounds[-1]].split(np.diff(bounds).tolist()))
        lengths = [n[start:stop].split(size) for n in self.lengths]
        no_skips, no_hashes = torch.zeros_like(self.skipped), torch.zeros_like(self.hashed)
        return [
            Chunk._from_rows(
                [None if r is None else r[i] for r in rows],
                [v[i] for v in values],
                [n[i] for n in lengths],
                no_skips,
                no_hashes,
            )
            for i in range(count)
        ]

    def take(self, order: torch.Tensor) -> Chunk:
        """Rows in the given order (a permutation or subset of row indices), copied."""
        o = order.numpy()
        rows = [
            None if t is None else torch.from_numpy(np.take(t.numpy(), o, axis=0))
            for t in self._rows()
        ]
        values, lengths = [], []
        for v, n in zip(self.values, self.lengths):
            if len(v) == len(n) and bool(
                (n.numpy() == 1).all()
            ):  # single-valued: ids move with rows
                values.append(torch.from_numpy(np.take(v.numpy(), o)))
                lengths.append(n[: len(o)])
            else:
                new_n, new_v = _permute_jagged(order, n, v)
                values.append(new_v)
                lengths.append(new_n)
        return Chunk._from_rows(rows, values, lengths, self.skipped, self.hashed)

    def pin_memory(self) -> Chunk:
        rows = [None if t is None else t.pin_memory() for t in self._rows()]
        return Chunk._from_rows(
            rows,
            [v.pin_memory() for v in self.values],
            [n.pin_memory() for n in self.lengths],
            self.skipped,
            self.hashed,
        )

    def to_batch(self, keys: list[str]) -> Batch:
        n = self.num_rows
        sparse = KeyedJaggedTensor(
            keys=keys,
            values=torch.cat(self.values) if self.values else torch.zeros(0, dtype=torch.int64),
            lengths=torch.cat(self.lengths) if self.lengths else torch.zeros(0, dtype=torch.int32),
            stride=n,
        )
        return Batch(
            dense=self.dense,
            sparse=sparse,
            labels=self.labels,
            masks=self.masks,
            weights=self.weights,
            row_ids=self.row_ids,
        )


def _where(unit: RowGroup) -> str:
    """How messages name a row group: file and index."""
    return f"{unit.path}: row group {unit.index}"


def _offsets(lengths: np.ndarray) -> np.ndarray:
    out = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=out[1:])
    return out


# Set in a loader worker thread (decode_off_openmp): its decoding must not use torch's OpenMP.
_thread = threading.local()


def decode_off_openmp() -> None:
    """Keeps the calling thread's decoding off torch's OpenMP kernels (a loader worker thread).

    A parallel region entered from a thread other than the trainer's gives that thread its own
    OpenMP team, which lives as long as the thread. libgomp then manages more threads than
    there are cores and cuts the spinning of every team's idle threads to almost nothing, so
    each of the trainer's many small parallel kernels waits for its threads to wake. 128 steps
    of the default job on 2 threads with one worker thread took 1.58x the time of no worker
    while FBGEMM's jagged permute ran in the worker (median of 8 alternated rounds), and 0.99x
    once the worker used numpy (12 rounds; on 1 thread: 1.00x before, 0.96x after).
    """
    _thread.off_openmp = True


def _permute_jagged(
    order: torch.Tensor, lengths: torch.Tensor, values: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(lengths, values) of a jagged column with its rows taken in `order`: FBGEMM's kernel
    (about 3x numpy), but numpy in a thread kept off OpenMP (decode_off_openmp)."""
    off_openmp = getattr(_thread, "off_openmp", False)
    if not off_openmp and hasattr(torch.ops.fbgemm, "permute_1D_sparse_data"):
        new_n, new_v, _ = torch.ops.fbgemm.permute_1D_sparse_data(
            order.to(torch.int32), lengths, values, None, None
        )
        return new_n, new_v
    return permute_jagged_numpy(order, lengths, values)


def permute_jagged_numpy(
    order: torch.Tensor, lengths: torch.Tensor, values: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """`_permute_jagged` without FBGEMM."""
    o, n = order.numpy(), lengths.numpy()
    new_n = n[o]
    starts = _offsets(n)[:-1][o]
    ends = np.cumsum(new_n, dtype=np.int64)
    # output value i of output row r sits at starts[r] + (i - (ends[r] - new_n[r]))
    shift = np.repeat(starts - (ends - new_n), new_n)
    return torch.from_numpy(new_n), torch.from_numpy(values.numpy()[np.arange(len(shift)) + shift])


def _cat(parts: list[torch.Tensor]) -> torch.Tensor:
    return torch.from_numpy(np.concatenate([p.numpy() for p in parts]))


class UnitDecoder:
    """Reads and validates the configured columns of row groups (or Arrow tables) into Chunks.

    Example:
        >>> decoder = UnitDecoder(cfg.data)
        >>> chunk = decoder.read(fs, RowGroup("part-0.parquet", 0, 8192))
    """

    def __init__(self, cfg: DataConfig) -> None:
        self.cfg = cfg
        self.keys = [f.name for f in cfg.sparse]
        self.columns = list(expected_columns(cfg))
        self.column_keys = {c: k for c, (k, _) in expected_columns(cfg).items()}
        self.has_masks = any(t.mask for t in cfg.tasks)
        self.has_weights = any(t.weight for t in cfg.tasks)
        self.skip = cfg.on_bad_rows == BadRows.skip
        self._files: OrderedDict[str, pq.ParquetFile] = OrderedDict()  # open, least recent first
        # Under skip: reason -> where its first skipped row (or row group) was, in read order.
        self.first_bad: dict[str, str] = {}

    # -- reading -------------------------------------------------------------------------------

    def read(self, fs: pafs.FileSystem, unit: RowGroup) -> Chunk:
        return self.read_columns(fs, unit)[0]

    def read_units(self, fs: pafs.FileSystem, units: Sequence[RowGroup]) -> list[Chunk]:
        """`read` of each unit, in order, reading the units of one file in one call (a shuffled
        window takes several row groups from each of a few files: bench.trainer's first window,
        10 from 4, took 55.5 ms against 60-64 ms read one call per row group). A file whose call
        fails is read unit by unit, so what is raised, skipped and counted is what `read`
        gives, in unit order."""
        by_file: dict[str, list[int]] = {}
        for i, u in enumerate(units):
            by_file.setdefault(u.path, []).append(i)
        tables: list[Optional[pa.Table]] = [None] * len(units)
        for path, idx in by_file.items():
            if len(idx) < 2:
                continue
            try:
                table = self._file(fs, path).read_row_groups(
                    [units[i].index for i in idx], columns=self.columns
                )
            except Exception:  # noqa: BLE001 - read() names the row group and the reason
                self._files.pop(path, None)
                continue
            if table.num_rows != sum(units[i].num_rows for i in idx):
                continue  # not what the footer said: read() checks each row group
            start = 0
            for i in idx:
                tables[i] = table.slice(start, units[i].num_rows)
                start += units[i].num_rows
        return [
            self.read(fs, u) if t is None else self.decode(t, _where(u))
            for u, t in zip(units, tables)
        ]

    def read_columns(
        self, fs: pafs.FileSystem, unit: RowGroup, extra: Sequence[str] = ()
    ) -> tuple[Chunk, Optional[pa.Table]]:
        """`read`, and the `extra` columns (as stored, any type) of the rows the chunk holds, in
        its order: the same rows also where bad rows were left out (None when `extra` is empty
        or the row group was left out)."""
        where = _where(unit)
        columns = self.columns + [c for c in extra if c not in self.columns]
        try:
            table = self._file(fs, unit.path).read_row_group(unit.index, columns=columns)
        except Exception as e:  # noqa: BLE001 - corrupt pages raise several pyarrow errors
            self._files.pop(unit.path, None)
            # pyarrow names the failed CRC check in its message (an OSError, as other failures)
            reason = "checksum_mismatch" if "checksum" in str(e).lower() else "unreadable"
            what = {
                "checksum_mismatch": "a page's checksum does not match its bytes (corrupt file)",
                "unreadable": "the row group cannot be decoded",
            }[reason]
            msg = f"{where}: could not be read: {what} ({type(e).__name__}: {e})"
            if not self.skip:
                raise DataError(
                    f"{msg} (reason {reason}; data.on_bad_rows=skip leaves such row groups out)"
                ) from e
            self.first_bad.setdefault(reason, msg)
            chunk = self.empty()
            chunk.skipped[_REASON_INDEX[reason]] = unit.num_rows
            return chunk, None
        chunk, kept = self.decode_rows(table, where)
        if not extra:
            return chunk, None
        rest = table.select(list(extra))
        return chunk, rest if kept is None else rest.take(pa.array(kept))

    # Files a decoder keeps open: a shuffled window takes its row groups from several files in
    # turn, and opening a file again reads its footer again (0.3 ms a file; 9 of a default-job
    # window's 10 row groups reopened a file when one was kept).
    MAX_OPEN_FILES = 8

    def _file(self, fs: pafs.FileSystem, path: str) -> pq.ParquetFile:
        f = self._files.get(path)
        if f is None:
            f = self._files[path] = open_parquet(fs, path)
            if len(self._files) > self.MAX_OPEN_FILES:
                self._files.popitem(last=False)
        else:
            self._files.move_to_end(path)
        return f

    def empty(self) -> Chunk:
        return self.padding(0)

    def padding(self, n: int) -> Chunk:
        """n zero-weight rows: every mask False, empty bags, row id -1."""
        T, S = len(self.cfg.tasks), len(self.cfg.sparse)
        return Chunk(
            dense=torch.zeros(n, len(self.cfg.dense)),
            values=[torch.zeros(0, dtype=torch.int64) for _ in range(S)],
            lengths=[torch.zeros(n, dtype=torch.int32) for _ in range(S)],
            labels=torch.zeros(n, T),
            masks=torch.zeros(n, T, dtype=torch.bool),
            weights=torch.zeros(n, T) if self.has_weights else None,
            row_ids=torch.full((n,), -1, dtype=torch.int64) if self.cfg.row_id else None,
            skipped=torch.zeros(len(REASONS), dtype=torch.int64),
            hashed=torch.zeros(S, dtype=torch.int64),
        )

    # -- validation ----------------------------------------------------------------------------

    def decode(self, table: pa.Table, where: str) -> Chunk:
        """The configured columns of `table` as a Chunk; bad rows raise or are left out."""
        return self.decode_rows(table, where)[0]

    def decode_rows(self, table: pa.Table, where: str) -> tuple[Chunk, Optional[np.ndarray]]:
        """`decode`, and the indices of the rows of `table` the chunk holds (None: all)."""
        n = table.num_rows
        bad = _BadRows(n, self.skip, where, self.column_keys)
        cfg = self.cfg

        dense = np.empty((n, len(cfg.dense)), dtype=np.float32)
        for j, c in enumerate(cfg.dense):
            x = _floats(table.column(c), bad, c, "null_value")
            bad.add(~np.isfinite(x), "nonfinite_dense", c, "is NaN or infinite")
            dense[:, j] = x

        T = len(cfg.tasks)
        labels = np.zeros((n, T), dtype=np.float32)
        masks = np.ones((n, T), dtype=bool) if self.has_masks else None
        weights = np.ones((n, T), dtype=np.float32) if self.has_weights else None
        for t, task in enumerate(cfg.tasks):
            exists = np.ones(n, dtype=bool)
            if task.mask:
                m = table.column(task.mask)
                bad.add(_nulls(m), "null_value", task.mask, "is null")
                exists = _floats(m, None, task.mask, "") != 0
                masks[:, t] = exists  # type: ignore[index]
            col = table.column(task.label_column)
            bad.add(_nulls(col) & exists, "null_label", task.label_column, "is null")
            y = _floats(col, None, task.label_column, "")
            bad.add(~np.isfinite(y) & exists, "nan_label", task.label_column, "is NaN or infinite")
            if task.type == TaskType.binary:  # BCE, AUC and log loss are defined for 0 and 1
                bad.add(
                    exists & np.isfinite(y) & (y != 0) & (y != 1),
                    "label_not_binary",
                    task.label_column,
                    f"is not 0 or 1 (the label of binary task {task.name})",
                    values=y,
                )
            # A missing label may hold anything: kept as it is, unless NaN, Inf or null (-> 0).
            labels[:, t] = np.where(exists | np.isfinite(y), y, 0.0)
            if task.weight:
                w = _floats(table.column(task.weight), bad, task.weight, "null_value")
                bad.add(
                    ~(np.isfinite(w) & (w >= 0)),
                    "nonfinite_weight",
                    task.weight,
                    "is NaN, infinite or negative",
                )
                weights[:, t] = w  # type: ignore[index]

        values, lengths = [], []
        hashed = np.zeros(len(cfg.sparse), dtype=np.int64)
        for s, f in enumerate(cfg.sparse):
            v, ln, hashed[s] = self._ids(table.column(f.column_name), f, bad)
            values.append(v)
            lengths.append(ln)

        row_ids = None
        if cfg.row_id:
            col = table.column(cfg.row_id)
            bad.add(_nulls(col), "null_value", cfg.row_id, "is null")
            row_ids = _ints(col)

        chunk = Chunk(
            dense=_tensor(dense),
            values=[_tensor(v) for v in values],
            lengths=[_tensor(ln) for ln in lengths],
            labels=_tensor(labels),
            masks=None if masks is None else _tensor(masks),
            weights=None if weights is None else _tensor(weights),
            row_ids=None if row_ids is None else _tensor(row_ids),
            skipped=torch.from_numpy(bad.counts),
            hashed=torch.from_numpy(hashed),
        )
        if not bad.any:
            return chunk, None
        kept = np.flatnonzero(~bad.mask)
        chunk = chunk.take(torch.from_numpy(kept))
        chunk.skipped = torch.from_numpy(bad.counts)
        for reason, msg in bad.first.items():
            self.first_bad.setdefault(reason, msg)
        return chunk, kept

    def _ids(self, col: pa.ChunkedArray, f, bad: _BadRows) -> tuple[np.ndarray, np.ndarray, int]:
        """(flat int64 ids, int32 lengths per row, ids hashed) of one sparse column."""
        name = f.column_name
        n = len(col)
        bad.add(_nulls(col), "null_value", name, "is null")
        if pa.types.is_list(col.type) or pa.types.is_large_list(col.type):
            arr = col.combine_chunks() if col.num_chunks != 1 else col.chunk(0)
            if arr.null_count:
                arr = pc.fill_null(arr, pa.scalar([], type=arr.type))
            offsets = arr.offsets.to_numpy()
            lengths = np.diff(offsets).astype(np.int32)
            flat = arr.flatten()
            row_of = None
            if flat.null_count:
                row_of = np.repeat(np.arange(n), lengths)
                bad.add_values(_nulls(flat), row_of, "null_value", name, "holds a null id")
            ids = _ints(flat)
        else:
            lengths = np.ones(n, dtype=np.int32)
            ids, row_of = _ints(col), None
        num = f.num_embeddings
        low, high = ids < 0, ids >= num
        if f.id_policy == IdPolicy.hash:
            out = low | high
            hashed = int(out.sum())
            if hashed:
                ids = ids.copy() if not ids.flags.writeable else ids
                ids[out] = hash_ids(ids[out], num)
            return ids, lengths, hashed
        if low.any() or high.any():
            if row_of is None:
                row_of = np.repeat(np.arange(n), lengths) if len(ids) != n else np.arange(n)
            bad.add_values(low, row_of, "negative_id", name, "holds a negative id")
            bad.add_values(
                high, row_of, "id_out_of_range", name, f"holds an id >= num_embeddings ({num})"
            )
        return ids, lengths, 0


class _BadRows:
    """Bad-row bookkeeping of one table: raises at the first (error) or marks rows (skip).

    A row is counted once, under the first reason found for it in check order. `first` keeps,
    per reason, where its first counted row is (file, row group, row, column).
    """

    def __init__(self, n: int, skip: bool, where: str, column_keys: dict[str, str]) -> None:
        self.mask = np.zeros(n, dtype=bool)
        self.counts = np.zeros(len(REASONS), dtype=np.int64)
        self.skip, self.where, self.column_keys = skip, where, column_keys
        self.any = False
        self.first: dict[str, str] = {}

    def _describe(self, row: int, column: str, what: str, values: Optional[np.ndarray]) -> str:
        value = "" if values is None else f" (value {float(values[row]):g})"
        return (
            f"{self.where}: row {row}: column '{column}' ({self.column_keys[column]}) {what}{value}"
        )

    def add(
        self,
        rows: np.ndarray,
        reason: str,
        column: str,
        what: str,
        values: Optional[np.ndarray] = None,
    ) -> None:
        """Marks `rows` bad for `reason`; `values` (per row), when given, is quoted for the
        first of them."""
        if not rows.any():
            return
        if not self.skip:
            first = int(np.argmax(rows))
            raise DataError(
                f"{self._describe(first, column, what, values)} ({int(rows.sum())} such rows "
                f"in this row group; reason {reason}; data.on_bad_rows=skip leaves such rows out)"
            )
        new = rows & ~self.mask
        count = int(new.sum())
        if count and reason not in self.first:
            self.first[reason] = self._describe(int(np.argmax(new)), column, what, values)
        self.counts[_REASON_INDEX[reason]] += count
        self.mask |= rows
        self.any = True

    def add_values(
        self, values: np.ndarray, row_of: np.ndarray, reason: str, column: str, what: str
    ) -> None:
        """Like add, for a per-value condition of a (possibly multi-valued) column."""
        if values.any():
            rows = np.zeros(len(self.mask), dtype=bool)
            rows[row_of[values]] = True
            self.add(rows, reason, column, what)


def _nulls(col: pa.ChunkedArray | pa.Array) -> np.ndarray:
    if col.null_count == 0:
        return np.zeros(len(col), dtype=bool)
    return col.is_null().to_numpy(zero_copy_only=False)


def _floats(col, bad: Optional[_BadRows], column: str, reason: str) -> np.ndarray:
    """A numeric or bool column as float (nulls as NaN), nulls reported when `bad` is given."""
    if bad is not None:
        bad.add(_nulls(col), reason, column, "is null")
    if pa.types.is_boolean(col.type):
        col = pc.cast(col, pa.int8())
    if col.null_count:
        col = pc.fill_null(pc.cast(col, pa.float64()), float("nan"))
    return _np(col, np.float32)


def _ints(col) -> np.ndarray:
    if col.null_count:
        col = pc.fill_null(col, 0)
    return _np(col, np.int64)


def _np(col, dtype) -> np.ndarray:
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks() if col.num_chunks != 1 else col.chunk(0)
    a = col.to_numpy(zero_copy_only=False)
    return a.astype(dtype, copy=False)
