"""Train and eval inputs of one rank: which rows it reads, in what order, for how many steps.

Work units are row groups. Policies (see also conf/data/*.yaml and DataConfig):

- Ranks. Every usable row group goes to exactly one rank, once for the whole run, by
  longest-processing-time balancing on row counts (not on files): ranks differ by at most one
  row group's rows whatever the file sizes. Every rank reads every footer and computes the same
  assignment, so nothing is communicated but the step count.
- Workers. A rank reads its units in epoch order, grouped into windows (below). With
  data.num_workers = W, window k is built (read, validated, concatenated, permuted) by worker
  k mod W and windows are handed back in order, so the rows a rank sees depend neither on W nor
  on data.worker_type: `thread` (default; pyarrow, numpy and FBGEMM release the GIL, and no
  copy between processes is needed) or `process` (torch DataLoader workers; windows travel
  through shared memory). Workers keep no state; the main process only cuts batches.
- Shuffle (train only; data.shuffle). Each epoch a rank permutes its units with a generator
  seeded by (seed, epoch, rank). Consecutive units are gathered into windows of at least
  buffer_rows rows, and every window's rows are permuted with a generator seeded by
  (seed, epoch, rank, window). Memory: the window being cut into batches plus the
  num_workers x prefetch_factor windows built ahead.
- Equal steps (train; data.equal_steps). `drop`: every rank runs the global minimum of its full
  batches; the rest of each rank's epoch stream (the tail of its shuffled rows, different rows
  every epoch) is dropped and counted (dropped_rows, from footers). `pad`: every rank runs the
  global maximum of its batches; missing rows are padding rows with every task mask False, so
  they weigh nothing in losses and metrics. Rows left out as bad (data.on_bad_rows=skip) are
  replaced by such padding at the end of the epoch, so step counts never change at run time.
- Eval: no shuffle, nothing dropped; a rank's last batch may be short, and a rank out of rows
  keeps stepping on an all-masked batch (real=False) so other ranks' collectives are matched.
- Resume. The position of a rank is (epoch, window, rows consumed of that window, batches
  yielded); the window's first unit is the work-unit cursor. The shuffle generators are pure
  functions of (seed, epoch, rank, window), so the position is all the RNG state there is:
  `load_state_dict` re-reads that window, re-permutes it and continues with the next row the
  uninterrupted run would have used, with any number of workers. Resuming needs the same data,
  world size, batch size and shuffle settings (checked, naming the key).
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Optional

import numpy as np
import pyarrow.fs as pafs
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from recsys_moe.config.schema import DataConfig, EqualSteps, WorkerType
from recsys_moe.data.batch import Batch
from recsys_moe.data.files import (
    FILE_REASONS,
    REASONS,
    DataError,
    RowGroup,
    locate_split,
    scan_split,
)
from recsys_moe.data.parquet import Chunk, UnitDecoder

log = logging.getLogger(__name__)

STATE_VERSION = 1


def _all_reduce(value: int, op: dist.ReduceOp, group: Optional[dist.ProcessGroup]) -> int:
    if group is None or not dist.is_initialized() or dist.get_world_size(group) == 1:
        return value
    t = torch.tensor([value], dtype=torch.int64)
    dist.all_reduce(t, op=op, group=group)
    return int(t.item())


def assign_units(units: list[RowGroup], world_size: int) -> list[list[int]]:
    """Unit indices of every rank: largest units first, each to the least-loaded rank.

    Ranks end up within one unit's rows of each other; each rank's list is in file order.
    """
    heap = [(0, r) for r in range(world_size)]
    out: list[list[int]] = [[] for _ in range(world_size)]
    for i in sorted(range(len(units)), key=lambda i: (-units[i].num_rows, i)):
        load, r = heapq.heappop(heap)
        out[r].append(i)
        heapq.heappush(heap, (load + units[i].num_rows, r))
    return [sorted(x) for x in out]


class _WindowStream(IterableDataset):
    """Builds windows in order: worker k of W reads, validates, concatenates and permutes windows
    k, k + W, ... (the DataLoader's round robin over workers then restores the order), so the
    main process, which also runs the model, only cuts batches."""

    def __init__(
        self,
        fs: pafs.FileSystem,
        windows: list[tuple[int, list[RowGroup]]],
        decoder: UnitDecoder,
        seed: Optional[list[int]],
    ) -> None:
        self.fs, self.windows, self.decoder, self.seed = fs, windows, decoder, seed

    def build(self, w: int, units: list[RowGroup], decoder: UnitDecoder) -> Chunk:
        chunk = Chunk.cat([decoder.read(self.fs, u) for u in units])
        if self.seed is not None:
            rng = np.random.default_rng([*self.seed, w])
            chunk = chunk.take(torch.from_numpy(rng.permutation(chunk.num_rows)))
        return chunk

    def __iter__(self) -> Iterator[tuple[int, Chunk]]:
        info = get_worker_info()
        k, W = (info.id, info.num_workers) if info is not None else (0, 1)
        for w, units in self.windows[k::W]:
            yield w, self.build(w, units, self.decoder)

    def threaded(self, num_threads: int, ahead: int) -> Iterator[tuple[int, Chunk]]:
        """The same windows built by a pool of threads, at most `ahead` in flight, in order.

        pyarrow decoding, numpy copies and FBGEMM kernels release the GIL, so threads overlap
        with each other and with the model, without the processes' copy through shared memory.
        """
        local = threading.local()

        def build(w: int, units: list[RowGroup]) -> Chunk:
            if not hasattr(local, "decoder"):  # a decoder keeps a file open: one per thread
                local.decoder = UnitDecoder(self.decoder.cfg)
            return self.build(w, units, local.decoder)

        pool = ThreadPoolExecutor(num_threads, thread_name_prefix="recsys_moe-data")
        pending: deque = deque()
        todo = iter(self.windows)
        try:
            for w, units in itertools.islice(todo, ahead):
                pending.append((w, pool.submit(build, w, units)))
            while pending:
                w, future = pending.popleft()
                chunk = future.result()
                nxt = next(todo, None)
                if nxt is not None:
                    pending.append((nxt[0], pool.submit(build, *nxt)))
                yield w, chunk
        finally:
            pool.shutdown(wait=True, cancel_futures=True)


def _identity(x: Any) -> Any:
    return x


class SplitInput:
    """One split (train or eval) as seen by one rank.

    `batches()` yields the next epoch's `steps` batches as (batch, real), from the resumed
    position when `load_state_dict` was called; `state_dict()` is the position after the last
    batch yielded.

    Example:
        >>> train = SplitInput(cfg.data, "train", rank=0, world_size=1)
        >>> for batch, real in train.batches(): ...
        >>> state = train.state_dict()     # later: SplitInput(...).load_state_dict(state)
    """

    def __init__(
        self,
        cfg: DataConfig,
        split: str,
        rank: int = 0,
        world_size: int = 1,
        group: Optional[dist.ProcessGroup] = None,
        pin_memory: bool = False,
    ) -> None:
        if split not in ("train", "eval"):
            raise ValueError(f"split ({split}) must be train or eval")
        _validate(cfg)
        if not 0 <= rank < world_size:
            raise ValueError(f"rank ({rank}) must be in [0, world_size ({world_size}))")
        self.split, self.rank, self.world_size = split, rank, world_size
        self.group = group
        self.cfg = cfg
        self.train = split == "train"
        self.batch_size = cfg.batch_size if self.train else cfg.eval_batch_size
        self.num_workers = cfg.num_workers
        self.pin_memory = pin_memory
        self.shuffle = self.train and cfg.shuffle.enabled
        self.buffer_rows = cfg.shuffle.buffer_rows if self.shuffle else 0

        fs, files = locate_split(cfg.path, getattr(cfg, split), f"data.{split}")
        scan = scan_split(fs, files, cfg, f"data.{split}")
        self.fs, self.files = fs, scan.files
        self.all_units = scan.units
        self.total_rows = scan.total_rows
        assignment = assign_units(self.all_units, world_size)
        self.units = [self.all_units[i] for i in assignment[rank]]
        self.rank_rows = sum(u.num_rows for u in self.units)
        self.decoder = UnitDecoder(cfg)

        # Every rank knows every rank's rows (same footers, same assignment), so the step count
        # needs no communication; the group only confirms that all ranks agree on it.
        B, W = self.batch_size, world_size
        rows = [sum(self.all_units[i].num_rows for i in a) for a in assignment]
        if self.train and cfg.equal_steps == EqualSteps.drop:
            self.steps = min(rows) // B
            if self.steps == 0:
                raise ValueError(
                    f"data.batch_size ({B}) is larger than what some rank reads of data.train "
                    f"(rows per rank: {rows}; {len(self.all_units)} row groups in all): lower "
                    "it, write smaller row groups, or set data.equal_steps=pad"
                )
            self.dropped_rows = self.total_rows - self.steps * B * W
        else:
            self.steps = max(-(-r // B) for r in rows)
            self.dropped_rows = 0
        low = _all_reduce(self.steps, dist.ReduceOp.MIN, group)
        high = _all_reduce(self.steps, dist.ReduceOp.MAX, group)
        if low != high:
            raise ValueError(
                f"data.{split}: ranks disagree on the steps per epoch ({low} to {high}): they "
                f"see different files under {cfg.path} (rank {rank} sees {len(self.files)})"
            )

        # Counters (this rank; file-level ones on rank 0 only, so that sums over ranks are right).
        self.skipped = torch.zeros(len(REASONS), dtype=torch.int64)
        self.skipped_files = torch.zeros(len(REASONS), dtype=torch.int64)
        if rank == 0:
            for r, n in scan.skipped_rows.items():
                self.skipped[REASONS.index(r)] += n
            for r, n in scan.skipped_files.items():
                self.skipped_files[REASONS.index(r)] += n
        self.hashed = torch.zeros(len(cfg.sparse), dtype=torch.int64)
        self.padded_rows = 0

        # Position: the next batch comes from epoch `epoch`; the last row consumed came from
        # window `window` (-1: none yet this epoch), of whose rows `offset` are consumed.
        self.epoch, self.window, self.offset, self.batches_done = 0, -1, 0, 0

    # -- plan ----------------------------------------------------------------------------------

    def plan(self, epoch: int) -> list[list[RowGroup]]:
        """This rank's windows of the given epoch, in order (each a list of units)."""
        order = np.arange(len(self.units))
        if self.shuffle:
            rng = np.random.default_rng([self.cfg.shuffle.seed, epoch, self.rank, 0])
            order = rng.permutation(len(self.units))
        windows: list[list[RowGroup]] = []
        current: list[RowGroup] = []
        rows = 0
        for i in order:
            current.append(self.units[i])
            rows += self.units[i].num_rows
            if rows >= self.buffer_rows:  # buffer_rows 0: one unit per window
                windows.append(current)
                current, rows = [], 0
        if current:
            windows.append(current)
        return windows

    def _windows(self, epoch: int, start: int) -> Iterator[tuple[int, Chunk]]:
        """(window index, its rows in epoch order) from window `start` on. The permutation of
        window w is drawn from a generator seeded by (seed, epoch, rank, 1, w)."""
        windows = list(enumerate(self.plan(epoch)))[start:]
        seed = [self.cfg.shuffle.seed, epoch, self.rank, 1] if self.buffer_rows else None
        stream = _WindowStream(self.fs, windows, self.decoder, seed)
        if self.num_workers == 0:
            return iter(stream)
        if self.cfg.worker_type == WorkerType.thread:
            return stream.threaded(self.num_workers, self.num_workers * self.cfg.prefetch_factor)
        return iter(
            DataLoader(
                stream,
                batch_size=None,
                num_workers=self.num_workers,
                prefetch_factor=self.cfg.prefetch_factor,
                collate_fn=_identity,
            )
        )

    # -- batches -------------------------------------------------------------------------------

    def batches(self) -> Iterator[tuple[Batch, bool]]:
        """Exactly `steps` batches of the next epoch as (batch, real); real is False only for
        eval padding batches. The position advances as each batch is yielded."""
        B, epoch = self.batch_size, self.epoch
        resumed, resumed_offset = self.window, self.offset
        tail: Optional[Chunk] = None  # rows of earlier windows not yet in a batch (< B)
        end = (self.window, self.offset)  # the position after the last window read
        if self.batches_done < self.steps:
            for w, chunk in self._windows(epoch, max(resumed, 0)):
                if w == resumed:  # counted before the state was saved; skip what was consumed
                    chunk, base = chunk.slice(resumed_offset, chunk.num_rows), resumed_offset
                else:
                    self.skipped += chunk.skipped
                    self.hashed += chunk.hashed
                    base = 0
                used = 0  # rows of this window in batches so far
                if tail is not None and tail.num_rows + chunk.num_rows >= B:
                    used = B - tail.num_rows
                    batch = Chunk.cat([tail, chunk.slice(0, used)])
                    tail = None
                    yield self._emit(batch, w, base + used), True
                    if self.batches_done == self.steps:
                        break
                if tail is None:
                    for batch in chunk.split(used, B):
                        if self.batches_done == self.steps:
                            break
                        used += B
                        yield self._emit(batch, w, base + used), True
                    if self.batches_done == self.steps:
                        break
                rest = chunk.slice(used, chunk.num_rows)
                tail = rest if tail is None else Chunk.cat([tail, rest])
                end = (w, base + chunk.num_rows)
        yield from self._finish(tail, end)
        self.epoch, self.window, self.offset, self.batches_done = epoch + 1, -1, 0, 0

    def _finish(self, tail: Optional[Chunk], end: tuple[int, int]) -> Iterator[tuple[Batch, bool]]:
        """The batches after this rank's rows ran out (short epoch, skipped rows, eval)."""
        B = self.batch_size
        if self.batches_done == self.steps:
            return
        if tail is not None and tail.num_rows:
            if self.train:  # every train batch is full: the rest is zero-weight padding
                self.padded_rows += B - tail.num_rows
                tail = Chunk.cat([tail, self.decoder.padding(B - tail.num_rows)])
            yield self._emit(tail, *end), True
        while self.batches_done < self.steps:
            if self.train:
                self.padded_rows += B
                yield self._emit(self.decoder.padding(B), *end), True
            else:  # eval: keep the collectives of other ranks company
                yield self._emit(self.decoder.padding(1), *end), False

    def _emit(self, chunk: Chunk, window: int, offset: int) -> Batch:
        self.window, self.offset = window, offset
        self.batches_done += 1
        batch = chunk.to_batch(self.decoder.keys)
        return batch.pin_memory() if self.pin_memory else batch

    def check_rows(self, max_rows: Optional[int] = None) -> Optional[torch.Tensor]:
        """Reads and checks every row of this rank's row groups now, with the checks of its
        batches, keeping nothing: under data.on_bad_rows=error the first bad row raises
        DataError naming it, on every rank (a collective: call it on every rank). Returns the
        rows a pass would leave out, per reason (REASONS order); None, without reading, when the
        split has more than `max_rows` rows."""
        where = f"data.{self.split} ({self.total_rows} rows)"
        if max_rows is not None and self.total_rows > max_rows:
            log.info(
                "%s: not checked ahead (more than data.eval_check_max_rows = %d); its rows are "
                "checked as they are read",
                where,
                max_rows,
            )
            return None
        decoder = UnitDecoder(self.cfg)
        counts = torch.zeros(len(REASONS), dtype=torch.int64)
        error: Optional[DataError] = None
        try:
            for unit in self.units:
                counts += decoder.read(self.fs, unit).skipped
        except DataError as e:
            error = e
        # Every rank stops, not only the one that read the bad row: the others would otherwise
        # wait for it in their next collective.
        if _all_reduce(int(error is not None), dist.ReduceOp.MAX, self.group):
            raise error or DataError(
                f"{where}: another rank found a bad row (its error names file, row group and row)"
            )
        if counts.any():
            left_out = {r: n for r, n in zip(REASONS, counts.tolist()) if n}
            log.warning("%s: rank %d will leave out bad rows: %s", where, self.rank, left_out)
        return counts

    # -- counters and state --------------------------------------------------------------------

    def counters(self) -> torch.Tensor:
        """This rank's counters as one int64 tensor (summed over ranks by `metrics`)."""
        return torch.cat(
            [self.skipped, self.skipped_files, self.hashed, torch.tensor([self.padded_rows])]
        )

    def metrics(self, group: Optional[dist.ProcessGroup] = None) -> dict[str, float]:
        """Flat data/... metrics summed over ranks (a collective: call it on every rank).

        data/skipped_rows (+ /<reason>), data/skipped_files/<reason>, data/hashed_ids/<feature>,
        data/padded_rows, data/dropped_rows_per_epoch; per-reason keys only where nonzero.
        """
        c = self.counters()
        if group is not None and dist.is_initialized() and dist.get_world_size(group) > 1:
            dist.all_reduce(c, group=group)
        values = c.tolist()
        R = len(REASONS)
        out: dict[str, float] = {"data/skipped_rows": float(sum(values[:R]))}
        for i, r in enumerate(REASONS):
            if values[i]:
                out[f"data/skipped_rows/{r}"] = float(values[i])
            if r in FILE_REASONS and values[R + i]:
                out[f"data/skipped_files/{r}"] = float(values[R + i])
        for s, f in enumerate(self.cfg.sparse):
            if values[2 * R + s]:
                out[f"data/hashed_ids/{f.name}"] = float(values[2 * R + s])
        out["data/padded_rows"] = float(values[-1])
        out["data/dropped_rows_per_epoch"] = float(self.dropped_rows)
        return out

    def _fingerprint(self) -> dict[str, Any]:
        return {
            "rank": self.rank,
            "world_size": self.world_size,
            "batch_size": self.batch_size,
            "num_units": len(self.all_units),
            "total_rows": self.total_rows,
            "shuffle": self.shuffle,
            "seed": self.cfg.shuffle.seed,
            "buffer_rows": self.buffer_rows,
        }

    def state_dict(self) -> dict[str, Any]:
        """This rank's position (and counters) after the last batch yielded."""
        plan = self.plan(self.epoch)
        cursor = sum(len(w) for w in plan[: max(self.window, 0)])
        return {
            "version": STATE_VERSION,
            "split": self.split,
            **self._fingerprint(),
            "epoch": self.epoch,
            "window": self.window,
            "unit_cursor": cursor,  # index in this rank's epoch order of the window's first unit
            "row_offset": self.offset,
            "batches": self.batches_done,
            "skipped": self.skipped.tolist(),
            "hashed": self.hashed.tolist(),
            "padded_rows": self.padded_rows,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continues from a position saved by `state_dict` (of the same rank)."""
        if state.get("version") != STATE_VERSION or state.get("split") != self.split:
            raise ValueError(
                f"data state: version {state.get('version')} of split {state.get('split')} "
                f"cannot resume version {STATE_VERSION} of {self.split}"
            )
        keys = {
            "rank": "rank",
            "world_size": "world size",
            "batch_size": "data.batch_size" if self.train else "data.eval_batch_size",
            "num_units": f"row groups of data.{self.split}",
            "total_rows": f"rows of data.{self.split}",
            "shuffle": "data.shuffle.enabled",
            "seed": "data.shuffle.seed",
            "buffer_rows": "data.shuffle.buffer_rows",
        }
        for k, v in self._fingerprint().items():
            if state[k] != v:
                raise ValueError(
                    f"data state was saved with {keys[k]} = {state[k]}, but it is now {v}: "
                    "a loader position only resumes on the same data and settings"
                )
        self.epoch, self.window = int(state["epoch"]), int(state["window"])
        self.offset, self.batches_done = int(state["row_offset"]), int(state["batches"])
        self.skipped = torch.tensor(state["skipped"], dtype=torch.int64)
        self.hashed = torch.tensor(state["hashed"], dtype=torch.int64)
        self.padded_rows = int(state["padded_rows"])


def _validate(cfg: DataConfig) -> None:
    checks = (
        ("data.batch_size", cfg.batch_size, 1),
        ("data.eval_batch_size", cfg.eval_batch_size, 1),
        ("data.num_workers", cfg.num_workers, 0),
        ("data.prefetch_factor", cfg.prefetch_factor, 1),
        ("data.shuffle.buffer_rows", cfg.shuffle.buffer_rows, 0),
        ("data.eval_check_max_rows", cfg.eval_check_max_rows, 0),
    )
    for key, value, low in checks:
        if value < low:
            raise ValueError(f"{key} ({value}) must be >= {low}")
    for i, f in enumerate(cfg.sparse):
        if f.num_embeddings < 1:
            raise ValueError(
                f"data.sparse[{i}] ({f.name}).num_embeddings ({f.num_embeddings}) must be >= 1"
            )
