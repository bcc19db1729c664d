"""Train and eval inputs of one rank: which rows it reads, in what order, for how many steps.

The batch size is global: data.batch_size rows per train step over all ranks together (as
torchtitan's global batch), split evenly over the ranks. Work units are row groups. Policies
(see also conf/data/*.yaml and DataConfig):

- Shards. The train split's usable row groups are dealt, once for the whole run, to
  V = data.num_shards data shards (0: one per rank) by longest-processing-time balancing on row
  counts (not on files): shards differ by at most one row group's rows whatever the file sizes.
  Each shard is one stream of rows (windows, shuffle, position: below) cut into batches of
  batch_size / V rows. Rank r of W reads the contiguous shards [r V/W, (r + 1) V/W), and its
  batch at step s is those shards' step-s batches concatenated in shard order. The global batch
  (the ranks' batches in rank order) is therefore the same for every W dividing V: fix
  data.num_shards to compare or resume runs on different world sizes. Every rank reads every
  footer and computes the same assignment, so nothing is communicated but the step count.
- Workers. With data.num_workers = N, N workers per rank (a pool shared by the rank's shards)
  build windows (read, validate, concatenate, permute) and the main process only cuts batches.
  Each shard keeps N x data.prefetch_factor windows in flight and takes them back in its own
  order, so the rows depend neither on N nor on data.worker_type: `thread` (default; pyarrow
  and numpy release the GIL, and no copy between processes is needed; worker threads stay off
  torch's OpenMP kernels, see parquet.decode_off_openmp) or `process` (worker processes;
  windows travel through shared memory). Workers keep no state.
- Shuffle (train only; data.shuffle). Each epoch a shard permutes its units with a generator
  seeded by (seed, epoch, shard). Consecutive units are gathered into windows of at least
  buffer_rows rows, and every window's rows are permuted with a generator seeded by
  (seed, epoch, shard, window). Memory: per shard of the rank, the window being cut into
  batches plus the N x prefetch_factor built ahead, so about
  (V / W) x (1 + N x prefetch_factor) windows of buffer_rows rows per rank.
- Equal steps (train; data.equal_steps). `drop`: every shard runs the minimum over shards of its
  full batches; the rest of each shard's epoch stream (the tail of its shuffled rows, different
  rows every epoch) is dropped and counted (dropped_rows, from footers). `pad`: every shard runs
  the maximum over shards of its batches; missing rows are padding rows with every task mask
  False, so they weigh nothing in losses and metrics. Rows left out as bad
  (data.on_bad_rows=skip) are replaced by such padding at the end of the epoch, so step counts
  never change at run time.
- Eval: one shard per rank (the order of eval rows does not change exact metrics), batches of
  ceil(eval_batch_size / W) rows; no shuffle, nothing dropped; a rank's last batch may be short,
  and a rank out of rows keeps stepping on an all-masked batch (real=False) so other ranks'
  collectives are matched.
- Resume. The position of a shard is (epoch, window, rows consumed of that window, batches
  yielded); the window's first unit is the work-unit cursor. The shuffle generators are pure
  functions of (seed, epoch, shard, window), so the position is all the RNG state there is:
  `load_state_dict` re-reads that window, re-permutes it and continues with the next row the
  uninterrupted run would have used, with any number of workers. A state holds the positions of
  the rank's shards by shard index; the states of all ranks, merged (`merge_states`), resume the
  run on any world size dividing data.num_shards. Resuming needs the same data, num_shards,
  batch size and shuffle settings (checked, naming the key).
"""

from __future__ import annotations

import functools
import heapq
import itertools
import logging
import threading
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from typing import Any, Optional

import numpy as np
import pyarrow.fs as pafs
import torch
import torch.distributed as dist

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
from recsys_moe.data.parquet import Chunk, UnitDecoder, decode_off_openmp
from recsys_moe.distributed.comm import all_reduce_, all_reduce_int

log = logging.getLogger(__name__)

# Version 2: global batch over data shards, positions per shard. Version 1 (per-rank batch size,
# one position per rank) cannot be mapped onto shards.
STATE_VERSION = 2


def assign_units(units: list[RowGroup], num_shards: int) -> list[list[int]]:
    """Unit indices of every shard: largest units first, each to the least-loaded shard.

    Shards end up within one unit's rows of each other; each shard's list is in file order.
    """
    heap = [(0, r) for r in range(num_shards)]
    out: list[list[int]] = [[] for _ in range(num_shards)]
    for i in sorted(range(len(units)), key=lambda i: (-units[i].num_rows, i)):
        load, r = heapq.heappop(heap)
        out[r].append(i)
        heapq.heappush(heap, (load + units[i].num_rows, r))
    return [sorted(x) for x in out]


def num_train_shards(cfg: DataConfig, world_size: int) -> int:
    """data.num_shards (0: the world size), checked against the world size and the batch size."""
    V = cfg.num_shards or world_size
    if V % world_size:
        raise ValueError(
            f"data.num_shards ({V}) must be a multiple of the world size ({world_size}): "
            "every rank reads num_shards / world_size shards"
        )
    if cfg.batch_size % V:
        what = f"data.num_shards ({V})" if cfg.num_shards else f"the world size ({V})"
        raise ValueError(
            f"data.batch_size ({cfg.batch_size}) must be divisible by {what}: it is the global "
            "batch, split evenly over the data shards"
            + ("" if cfg.num_shards else " (data.num_shards = 0: one shard per rank)")
        )
    return V


def merge_states(states: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One loader state holding the shard positions of all `states` (e.g. those saved by every
    rank of a run at the same step), which a loader on any world size dividing data.num_shards
    can load."""
    first = states[0]
    for other in states[1:]:
        for key, value in first.items():
            if key != "shards" and other.get(key) != value:
                raise ValueError(
                    f"data states disagree on {key} ({value} and {other.get(key)}): only the "
                    "states of one run saved at the same step can be merged"
                )
    return {**first, "shards": {k: v for s in states for k, v in s["shards"].items()}}


# -- building windows (in the main thread or in workers) ---------------------------------------


def _build_window(
    decoder: UnitDecoder, fs: pafs.FileSystem, units: list[RowGroup], seed: Optional[list[int]]
) -> Chunk:
    """The rows of `units`, read, validated, concatenated and (seed given) permuted."""
    chunk = Chunk.cat(decoder.read_units(fs, units))
    if seed is not None:
        rng = np.random.default_rng(seed)
        chunk = chunk.take(torch.from_numpy(rng.permutation(chunk.num_rows)))
    return chunk


_worker = threading.local()  # a worker's decoder (it keeps a file open: one per thread/process)


def _init_worker(cfg: DataConfig, fs: pafs.FileSystem, process: bool) -> None:
    _worker.decoder, _worker.fs = UnitDecoder(cfg), fs
    if process:  # as torch's DataLoader workers: the process's cores belong to the trainer
        torch.set_num_threads(1)
    else:  # a second OpenMP team in the process would slow the trainer's kernels
        decode_off_openmp()


def _build_in_worker(units: list[RowGroup], seed: Optional[list[int]]) -> Chunk:
    return _build_window(_worker.decoder, _worker.fs, units, seed)


class _Prefetch:
    """One shard's windows, built on a pool shared by the rank's shards and handed back in
    order. The caller submits the first few (`submit_one`); each window taken submits the next,
    so as many stay in flight besides the one being cut."""

    def __init__(self, pool: Executor, windows: Iterator[tuple[int, list[RowGroup]]], seed) -> None:
        self.pool, self.todo, self.seed = pool, windows, seed
        self.pending: deque[tuple[int, Future]] = deque()

    def submit_one(self) -> None:
        nxt = next(self.todo, None)
        if nxt is not None:
            w, units = nxt
            self.pending.append((w, self.pool.submit(_build_in_worker, units, self.seed(w))))

    def __iter__(self) -> Iterator[tuple[int, Chunk]]:
        while self.pending:
            w, future = self.pending.popleft()
            chunk = future.result()
            self.submit_one()
            yield w, chunk


# -- one shard ---------------------------------------------------------------------------------


class _Shard:
    """One data shard: its units read as one stream and cut into batches of `batch_rows` rows.

    Position: the last row consumed came from window `window` of the current epoch (-1: none
    yet), of whose rows `offset` are consumed. Counters: rows skipped per reason and ids hashed
    per feature as its windows are first read, padding rows it added.
    """

    def __init__(
        self,
        index: int,
        units: list[RowGroup],
        batch_rows: int,
        inp: SplitInput,
    ) -> None:
        self.index, self.units, self.batch_rows = index, units, batch_rows
        self.rows = sum(u.num_rows for u in units)
        self.train, self.decoder = inp.train, inp.decoder
        self.seed, self.buffer_rows = inp.cfg.shuffle.seed, inp.buffer_rows
        self.shuffle = inp.shuffle
        self.window, self.offset = -1, 0
        self.skipped = torch.zeros(len(REASONS), dtype=torch.int64)
        self.hashed = torch.zeros(len(inp.cfg.sparse), dtype=torch.int64)
        self.padded_rows = 0

    def plan(self, epoch: int) -> list[list[RowGroup]]:
        """This shard's windows of the given epoch, in order (each a list of units)."""
        order = np.arange(len(self.units))
        if self.shuffle:
            rng = np.random.default_rng([self.seed, epoch, self.index, 0])
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

    def window_seed(self, epoch: int, w: int) -> Optional[list[int]]:
        """Seed of window w's row permutation (None: rows stay in file order)."""
        return [self.seed, epoch, self.index, 1, w] if self.buffer_rows else None

    def cut(self, windows: Iterator[tuple[int, Chunk]], count: int) -> Iterator[Optional[Chunk]]:
        """The next `count` batches of the shard, from its position on, given its windows from
        the position's window on. Train batches are always full (padded); an eval shard out of
        rows yields None. The position advances as each batch is yielded."""
        B = self.batch_rows
        resumed, resumed_offset = self.window, self.offset
        tail: Optional[Chunk] = None  # rows of earlier windows not yet in a batch (< B)
        end = (self.window, self.offset)  # the position after the last window read
        done = 0
        for w, chunk in windows:
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
                self.window, self.offset = w, base + used
                yield batch
                done += 1
                if done == count:
                    return
            if tail is None:
                for batch in chunk.split(used, B):
                    used += B
                    self.window, self.offset = w, base + used
                    yield batch
                    done += 1
                    if done == count:
                        return
            rest = chunk.slice(used, chunk.num_rows)
            tail = rest if tail is None else Chunk.cat([tail, rest])
            end = (w, base + chunk.num_rows)
        # The shard's rows ran out (short epoch, skipped rows, eval).
        self.window, self.offset = end
        if tail is not None and tail.num_rows:
            if self.train:  # every train batch is full: the rest is zero-weight padding
                self.padded_rows += B - tail.num_rows
                tail = Chunk.cat([tail, self.decoder.padding(B - tail.num_rows)])
            yield tail
            done += 1
        while done < count:
            if self.train:
                self.padded_rows += B
                yield self.decoder.padding(B)
            else:
                yield None
            done += 1

    def state_dict(self, epoch: int) -> dict[str, Any]:
        plan = self.plan(epoch)
        return {
            "window": self.window,
            "unit_cursor": sum(len(w) for w in plan[: max(self.window, 0)]),  # in epoch order
            "row_offset": self.offset,
            "skipped": self.skipped.tolist(),
            "hashed": self.hashed.tolist(),
            "padded_rows": self.padded_rows,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.window, self.offset = int(state["window"]), int(state["row_offset"])
        self.skipped = torch.tensor(state["skipped"], dtype=torch.int64)
        self.hashed = torch.tensor(state["hashed"], dtype=torch.int64)
        self.padded_rows = int(state["padded_rows"])


class SplitInput:
    """One split (train or eval) as seen by one rank.

    `batches()` yields the next epoch's `steps` batches as (batch, real), from the resumed
    position when `load_state_dict` was called; `state_dict()` is the position after the last
    batch yielded. `batch_size` is the global batch, `local_batch_size` this rank's share
    (train: batch_size / world_size rows; eval: at most ceil(eval_batch_size / world_size)).

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
        if self.train:
            self.num_shards = num_train_shards(cfg, world_size)
            self.batch_size = cfg.batch_size
            shard_rows = self.batch_size // self.num_shards  # rows per shard and step
        else:
            self.num_shards = world_size
            self.batch_size = cfg.eval_batch_size
            shard_rows = -(-self.batch_size // world_size)
        per_rank = self.num_shards // world_size
        self.local_batch_size = shard_rows * per_rank
        self.num_workers = cfg.num_workers
        self.pin_memory = pin_memory
        self.shuffle = self.train and cfg.shuffle.enabled
        self.buffer_rows = cfg.shuffle.buffer_rows if self.shuffle else 0

        fs, files = locate_split(cfg.path, getattr(cfg, split), f"data.{split}")
        scan = scan_split(fs, files, cfg, f"data.{split}")
        self.fs, self.files = fs, scan.files
        self.all_units = scan.units
        self.total_rows = scan.total_rows
        self.decoder = UnitDecoder(cfg)
        assignment = assign_units(self.all_units, self.num_shards)
        self.shards = [
            _Shard(v, [self.all_units[i] for i in assignment[v]], shard_rows, self)
            for v in range(rank * per_rank, (rank + 1) * per_rank)
        ]
        self.rank_rows = sum(s.rows for s in self.shards)

        # Every rank knows every shard's rows (same footers, same assignment), so the step count
        # needs no communication; the group only confirms that all ranks agree on it.
        B, V = shard_rows, self.num_shards
        rows = [sum(self.all_units[i].num_rows for i in a) for a in assignment]
        if self.train and cfg.equal_steps == EqualSteps.drop:
            self.steps = min(rows) // B
            if self.steps == 0:
                raise ValueError(
                    f"data.batch_size ({self.batch_size}) over {V} data shards is {B} rows per "
                    f"shard and step, more than some shard reads of data.train (rows per shard: "
                    f"{rows}; {len(self.all_units)} row groups in all): lower data.batch_size "
                    "or data.num_shards, write smaller row groups, or set data.equal_steps=pad"
                )
            self.dropped_rows = self.total_rows - self.steps * B * V
        else:
            self.steps = max(-(-r // B) for r in rows)
            self.dropped_rows = 0
        low = all_reduce_int(self.steps, group, dist.ReduceOp.MIN)
        high = all_reduce_int(self.steps, group, dist.ReduceOp.MAX)
        if low != high:
            raise ValueError(
                f"data.{split}: ranks disagree on the steps per epoch ({low} to {high}): they "
                f"see different files under {cfg.path} (rank {rank} sees {len(self.files)})"
            )

        # File-level counters (from footers) on rank 0 only, so that sums over ranks are right;
        # they are not part of the position (every run recomputes them).
        self.file_skipped_rows = torch.zeros(len(REASONS), dtype=torch.int64)
        self.skipped_files = torch.zeros(len(REASONS), dtype=torch.int64)
        if rank == 0:
            for r, n in scan.skipped_rows.items():
                self.file_skipped_rows[REASONS.index(r)] += n
            for r, n in scan.skipped_files.items():
                self.skipped_files[REASONS.index(r)] += n

        # Position: the next batch comes from epoch `epoch`, of which `batches_done` batches
        # were yielded; each shard holds where in its stream the last of them ended.
        self.epoch, self.batches_done = 0, 0

    @property
    def padded_rows(self) -> int:
        return sum(s.padded_rows for s in self.shards)

    # -- batches -------------------------------------------------------------------------------

    def _pool(self) -> Optional[Executor]:
        if self.num_workers == 0:
            return None
        process = self.cfg.worker_type == WorkerType.process
        kind = ProcessPoolExecutor if process else ThreadPoolExecutor
        extra = {} if process else {"thread_name_prefix": "recsys_moe-data"}
        args = (self.cfg, self.fs, process)
        return kind(self.num_workers, initializer=_init_worker, initargs=args, **extra)

    def _windows(
        self, shard: _Shard, epoch: int, pool: Optional[Executor]
    ) -> Iterator[tuple[int, Chunk]] | _Prefetch:
        """(window index, its rows in epoch order) of a shard from its position's window on."""
        todo = itertools.islice(enumerate(shard.plan(epoch)), max(shard.window, 0), None)
        seed = functools.partial(shard.window_seed, epoch)
        if pool is None:
            return ((w, _build_window(self.decoder, self.fs, u, seed(w))) for w, u in todo)
        return _Prefetch(pool, todo, seed)

    def batches(self) -> Iterator[tuple[Batch, bool]]:
        """Exactly `steps` batches of the next epoch as (batch, real); real is False only for
        eval padding batches. The position advances as each batch is yielded."""
        epoch = self.epoch
        if self.batches_done < self.steps:
            pool = self._pool()
            cuts: list[Iterator[Optional[Chunk]]] = []
            try:
                windows = [self._windows(s, epoch, pool) for s in self.shards]
                prefetch = [w for w in windows if isinstance(w, _Prefetch)]
                # Every shard's first windows are submitted before any second ones, so the
                # first step does not wait on one shard's read-ahead.
                for _ in range(self.num_workers * self.cfg.prefetch_factor):
                    for p in prefetch:
                        p.submit_one()
                count = self.steps - self.batches_done
                cuts = [s.cut(iter(w), count) for s, w in zip(self.shards, windows)]
                while self.batches_done < self.steps:
                    parts = [next(c) for c in cuts]
                    self.batches_done += 1
                    yield self._batch(parts)
            finally:
                for c in cuts:
                    c.close()  # type: ignore[attr-defined]
                if pool is not None:
                    pool.shutdown(wait=True, cancel_futures=True)
        self.epoch, self.batches_done = epoch + 1, 0
        for s in self.shards:
            s.window, s.offset = -1, 0

    def _batch(self, parts: list[Optional[Chunk]]) -> tuple[Batch, bool]:
        """One rank batch from its shards' step slices (in shard order): Chunks are concatenated
        and converted to one Batch (one KeyedJaggedTensor, never concatenated KJTs)."""
        real = [p for p in parts if p is not None]
        if real:
            chunk = Chunk.cat(real)
        else:  # eval, out of rows: keep the collectives of other ranks company
            chunk = self.decoder.padding(1)
        batch = chunk.to_batch(self.decoder.keys)
        return (batch.pin_memory() if self.pin_memory else batch), bool(real)

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
            for unit in (u for shard in self.shards for u in shard.units):
                counts += decoder.read(self.fs, unit).skipped
        except DataError as e:
            error = e
        # Every rank stops, not only the one that read the bad row: the others would otherwise
        # wait for it in their next collective.
        if all_reduce_int(int(error is not None), self.group, dist.ReduceOp.MAX):
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
        skipped = self.file_skipped_rows + sum(s.skipped for s in self.shards)
        hashed = sum(s.hashed for s in self.shards)
        return torch.cat([skipped, self.skipped_files, hashed, torch.tensor([self.padded_rows])])

    def metrics(self, group: Optional[dist.ProcessGroup] = None) -> dict[str, float]:
        """Flat data/... metrics summed over ranks (a collective: call it on every rank).

        data/skipped_rows (+ /<reason>), data/skipped_files/<reason>, data/hashed_ids/<feature>,
        data/padded_rows, data/dropped_rows_per_epoch; per-reason keys only where nonzero.
        """
        values = all_reduce_(self.counters(), group).tolist()
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
            "num_shards": self.num_shards,
            "batch_size": self.batch_size,
            "num_units": len(self.all_units),
            "total_rows": self.total_rows,
            "shuffle": self.shuffle,
            "seed": self.cfg.shuffle.seed,
            "buffer_rows": self.buffer_rows,
        }

    def state_dict(self) -> dict[str, Any]:
        """The position after the last batch yielded: epoch and batches (the same on every
        rank), and the position and counters of each of this rank's shards by shard index."""
        return {
            "version": STATE_VERSION,
            "split": self.split,
            **self._fingerprint(),
            "epoch": self.epoch,
            "batches": self.batches_done,
            "shards": {s.index: s.state_dict(self.epoch) for s in self.shards},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continues from a position saved by `state_dict`: any state holding the positions of
        at least this rank's shards (see `merge_states`)."""
        if state.get("version") == 1:
            raise ValueError(
                "data state version 1 was saved when data.batch_size counted rows per rank and "
                "row groups were dealt to ranks; this loader reads a global batch from "
                f"data shards (state version {STATE_VERSION}) and cannot place that position: "
                "resume with the code that saved it, or start the data from the beginning"
            )
        if state.get("version") != STATE_VERSION or state.get("split") != self.split:
            raise ValueError(
                f"data state: version {state.get('version')} of split {state.get('split')} "
                f"cannot resume version {STATE_VERSION} of {self.split}"
            )
        keys = {
            "num_shards": "data.num_shards" if self.train else "world size (eval shards)",
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
        positions = {int(k): v for k, v in state["shards"].items()}  # JSON makes keys strings
        for s in self.shards:
            if s.index not in positions:
                raise ValueError(
                    f"data state holds no position for shard {s.index} of data.num_shards "
                    f"({self.num_shards}) (it holds shards {sorted(positions)}), which rank "
                    f"{self.rank} of {self.world_size} reads: load the states of every rank of "
                    "the saved run, merged (recsys_moe.data.loader.merge_states)"
                )
        self.epoch, self.batches_done = int(state["epoch"]), int(state["batches"])
        for s in self.shards:
            s.load_state_dict(positions[s.index])

    def restart_epoch(self, epoch: int) -> None:
        """The position at the start of `epoch` (a resumed run whose saved shard positions do
        not fit this loader's shards: the caller counts the rows it reads again)."""
        self.epoch, self.batches_done = epoch, 0
        for s in self.shards:
            s.window, s.offset = -1, 0


def _validate(cfg: DataConfig) -> None:
    checks = (
        ("data.batch_size", cfg.batch_size, 1),
        ("data.eval_batch_size", cfg.eval_batch_size, 1),
        ("data.num_shards", cfg.num_shards, 0),
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
