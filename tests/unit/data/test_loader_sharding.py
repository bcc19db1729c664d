"""Rows of an epoch are read exactly once across ranks and workers; shuffling is seeded;
equal steps hold; a resumed loader yields exactly what the uninterrupted one would have.
data.batch_size is global: a rank's batches hold batch_size / world_size rows."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from recsys_moe.data.files import RowGroup
from recsys_moe.data.loader import SplitInput, assign_units
from tests.tests_support import data_config


def _epoch_ids(inp: SplitInput) -> list[list[int]]:
    """Row ids of every batch of the next epoch (padding rows are -1)."""
    return [b.row_ids.tolist() for b, _ in inp.batches()]


def _flat(batches: list[list[int]]) -> list[int]:
    return [i for b in batches for i in b]


@pytest.mark.parametrize("world_size", [1, 2, 3])
@pytest.mark.parametrize("workers", [0, 1, 2])
def test_every_row_exactly_once_across_ranks_and_workers(tiny_data, world_size, workers):
    cfg = data_config(tiny_data, batch_size=64 * world_size, num_workers=workers, equal_steps="pad")
    ranks = [SplitInput(cfg, "train", r, world_size) for r in range(world_size)]
    assert len({r.steps for r in ranks}) == 1
    assert all(r.local_batch_size == 64 and r.batch_size == 64 * world_size for r in ranks)
    for epoch in range(2):
        per_rank = [_epoch_ids(r) for r in ranks]
        assert all(len(b) == ranks[0].steps for b in per_rank)  # equal steps
        assert all(len(x) == 64 for b in per_rank for x in b)  # full batches
        ids = [i for b in per_rank for i in _flat(b) if i >= 0]
        assert sorted(ids) == list(range(3000))  # each row once, none lost
        padded = sum(r.padded_rows for r in ranks)
        assert padded == (epoch + 1) * (ranks[0].steps * 64 * world_size - 3000)  # cumulative


@pytest.mark.parametrize("world_size", [1, 2, 3])
@pytest.mark.parametrize("workers", [0, 2])
def test_drop_policy_runs_global_min_and_counts_the_rest(tiny_data, world_size, workers):
    cfg = data_config(tiny_data, batch_size=64 * world_size, num_workers=workers)
    ranks = [SplitInput(cfg, "train", r, world_size) for r in range(world_size)]
    steps = ranks[0].steps
    assert steps == min(r.rank_rows for r in ranks) // 64
    ids = [i for r in ranks for i in _flat(_epoch_ids(r))]
    assert len(ids) == len(set(ids)) == steps * 64 * world_size
    assert min(ids) >= 0
    assert ranks[0].dropped_rows == 3000 - len(ids)
    m = ranks[0].metrics()
    assert m["data/dropped_rows_per_epoch"] == 3000 - len(ids)


def test_units_are_balanced_by_rows_not_files():
    # One big file of 6 row groups and 6 tiny files: by files, rank 0 would take 6x the rows.
    units = [RowGroup("big", i, 100) for i in range(6)] + [
        RowGroup(f"s{i}", 0, 10) for i in range(6)
    ]
    rows = [sum(units[i].num_rows for i in a) for a in assign_units(units, 2)]
    assert sorted(rows) == [330, 330]
    parts = assign_units(units, 3)
    assert sorted(i for a in parts for i in a) == list(range(12))  # a partition


@pytest.mark.parametrize("num_shards", [0, 4])  # one shard per rank; two shards on one pool
def test_worker_count_and_type_do_not_change_the_rows_or_their_order(tiny_data, num_shards):
    seqs = []
    for workers, kind in (
        (0, "thread"),
        (1, "thread"),
        (2, "thread"),
        (1, "process"),
        (2, "process"),
    ):
        cfg = data_config(
            tiny_data,
            batch_size=100,
            num_shards=num_shards,
            num_workers=workers,
            worker_type=kind,
            shuffle={"buffer_rows": 500},
        )
        seqs.append(_epoch_ids(SplitInput(cfg, "train", 1, 2)))
    assert all(s == seqs[0] for s in seqs[1:])
    assert all(len(b) == 50 for b in seqs[0])


@pytest.mark.parametrize("world_size", [2, 3])
def test_every_row_exactly_once_with_worker_processes(tiny_data, world_size):
    cfg = data_config(
        tiny_data,
        batch_size=64 * world_size,
        num_workers=2,
        worker_type="process",
        equal_steps="pad",
    )
    ranks = [SplitInput(cfg, "train", r, world_size) for r in range(world_size)]
    ids = [i for r in ranks for i in _flat(_epoch_ids(r)) if i >= 0]
    assert sorted(ids) == list(range(3000))


def test_shuffle_is_seeded_per_epoch_and_mixes_row_groups(tiny_data):
    cfg = data_config(tiny_data, batch_size=100, shuffle={"buffer_rows": 1000})
    a = SplitInput(cfg, "train")
    e0, e1 = _flat(_epoch_ids(a)), _flat(_epoch_ids(a))
    assert e0 != e1 and sorted(e0) != e0
    b = SplitInput(cfg, "train")
    assert _flat(_epoch_ids(b)) == e0  # same seed, same order
    other = SplitInput(data_config(tiny_data, batch_size=100, shuffle={"seed": 1}), "train")
    assert _flat(_epoch_ids(other)) != e0
    # A window of >= 1000 rows spans several row groups (400 rows each): the first batch
    # mixes rows that sit in different row groups.
    first = _epoch_ids(SplitInput(cfg, "train"))[0]
    assert len({i // 400 for i in first}) > 1


def test_no_shuffle_reads_in_file_order(tiny_data):
    cfg = data_config(tiny_data, batch_size=100, shuffle={"enabled": False})
    assert _flat(_epoch_ids(SplitInput(cfg, "train"))) == list(range(3000))
    ev = SplitInput(data_config(tiny_data, eval_batch_size=300), "eval", 0, 1)
    batches = _epoch_ids(ev)
    assert _flat(batches) == list(range(1000)) and [len(b) for b in batches] == [300] * 3 + [100]


def test_eval_pads_with_unreal_masked_batches_on_short_ranks(tiny_data):
    cfg = data_config(tiny_data, eval_batch_size=899, num_shards=6)  # num_shards: train only
    ranks = [SplitInput(cfg, "eval", r, 3) for r in range(3)]
    assert ranks[0].local_batch_size == 300  # ceil(899 / 3)
    seen, unreal = [], 0
    for r in ranks:
        out = list(r.batches())
        assert len(out) == ranks[0].steps
        for batch, real in out:
            assert batch.batch_size <= 300
            if real:
                seen += batch.row_ids.tolist()
            else:
                unreal += 1
                assert batch.masks is not None and not batch.masks.any()
    assert sorted(seen) == list(range(1000)) and unreal > 0


def _resume_case(tiny_data, workers, world_size, rank, stop_epoch, stop_batch, **over):
    kind = "process" if str(workers).endswith("p") else "thread"
    workers = int(str(workers).rstrip("p"))
    cfg = data_config(
        tiny_data, batch_size=64 * world_size, num_workers=workers, worker_type=kind, **over
    )
    full = SplitInput(cfg, "train", rank, world_size)
    expected = [_epoch_ids(full) for _ in range(3)]
    stop_batch = full.steps if stop_batch < 0 else stop_batch

    first = SplitInput(cfg, "train", rank, world_size)
    for _ in range(stop_epoch):
        _epoch_ids(first)
    it = first.batches()
    for _ in range(stop_batch):
        next(it)
    state = first.state_dict()
    del it

    resumed = SplitInput(cfg, "train", rank, world_size)
    resumed.load_state_dict(state)
    assert resumed.epoch == stop_epoch
    rest = _epoch_ids(resumed)
    assert rest == expected[stop_epoch][stop_batch:]
    assert _epoch_ids(resumed) == expected[stop_epoch + 1]  # the next epoch follows on
    return state


@pytest.mark.parametrize(
    "workers,world_size,rank,stop_epoch,stop_batch",
    [
        (0, 1, 0, 0, 1),
        (0, 1, 0, 1, 17),  # second epoch, mid-window
        (2, 2, 1, 0, 9),  # with worker threads, another rank
        ("2p", 2, 0, 1, 5),  # with worker processes
        (1, 3, 2, 1, 0),  # at an epoch boundary
        (0, 2, 0, 0, -1),  # after the epoch's last batch: the resumed epoch has nothing left
    ],
)
def test_resume_yields_exactly_the_uninterrupted_order(
    tiny_data, workers, world_size, rank, stop_epoch, stop_batch
):
    _resume_case(
        tiny_data, workers, world_size, rank, stop_epoch, stop_batch, shuffle={"buffer_rows": 700}
    )


def test_resume_inside_padding_and_with_a_different_worker_count(tiny_data):
    cfg = data_config(tiny_data, batch_size=256, equal_steps="pad", shuffle={"buffer_rows": 500})
    full = SplitInput(cfg, "train", 0, 2)
    expected = _epoch_ids(full)
    assert expected[-1][-1] == -1  # the last batch holds padding
    first = SplitInput(cfg, "train", 0, 2)
    it = first.batches()
    for _ in range(len(expected) - 1):
        next(it)
    state = first.state_dict()
    cfg2 = data_config(
        tiny_data, batch_size=256, equal_steps="pad", num_workers=2, shuffle={"buffer_rows": 500}
    )
    resumed = SplitInput(cfg2, "train", 0, 2)
    resumed.load_state_dict(state)
    assert _epoch_ids(resumed) == expected[-1:]


def test_state_names_what_changed(tiny_data):
    cfg = data_config(tiny_data, batch_size=64)
    state = SplitInput(cfg, "train").state_dict()
    assert (state["version"], state["epoch"], state["batches"]) == (2, 0, 0)
    assert state["shards"][0]["unit_cursor"] == 0 and state["shards"][0]["row_offset"] == 0
    with pytest.raises(ValueError, match="data.batch_size = 64, but it is now 32"):
        SplitInput(data_config(tiny_data, batch_size=32), "train").load_state_dict(state)
    # num_shards 0 is the world size: a state of one rank's run does not fit two ranks' shards
    with pytest.raises(ValueError, match="data.num_shards = 1, but it is now 2"):
        SplitInput(cfg, "train", 0, 2).load_state_dict(state)
    with pytest.raises(ValueError, match="data.shuffle.seed = 0, but it is now 5"):
        SplitInput(
            data_config(tiny_data, batch_size=64, shuffle={"seed": 5}), "train"
        ).load_state_dict(state)


def test_version_1_state_is_refused_clearly(tiny_data):
    old = {"version": 1, "split": "train", "rank": 0, "world_size": 1, "batch_size": 64}
    with pytest.raises(ValueError, match="data state version 1 .* per rank"):
        SplitInput(data_config(tiny_data, batch_size=64), "train").load_state_dict(old)


def test_batch_holds_the_rows_of_the_file(tiny_data):
    import pyarrow.parquet as pq

    cfg = data_config(tiny_data, batch_size=7, shuffle={"enabled": False})
    batch, _ = next(SplitInput(cfg, "train").batches())
    first = sorted((tiny_data / "train").glob("*.parquet"))[0]
    t = pq.read_table(first).slice(0, 7).to_pydict()
    assert batch.row_ids.tolist() == t["row_id"]
    assert torch.allclose(batch.dense[:, 0], torch.tensor(t["dense_0"]))
    jt = batch.sparse.to_dict()
    assert jt["user_id"].values().tolist() == t["user_id"]
    assert jt["user_history"].lengths().tolist() == [len(h) for h in t["user_history"]]
    assert jt["user_history"].values().tolist() == [i for h in t["user_history"] for i in h]
    assert batch.labels[:, 0].tolist() == t["click"]
    rating = [c.name for c in cfg.tasks].index("rating")
    assert batch.masks[:, rating].tolist() == t["rating_observed"]


def test_config_values_are_checked_naming_the_key(tiny_data):
    with pytest.raises(ValueError, match=r"data.num_workers \(-1\) must be >= 0"):
        SplitInput(data_config(tiny_data, num_workers=-1), "train")
    with pytest.raises(ValueError, match=r"data.shuffle.buffer_rows \(-5\) must be >= 0"):
        SplitInput(data_config(tiny_data, shuffle={"buffer_rows": -5}), "train")
    with pytest.raises(ValueError, match=r"data.num_shards \(-1\) must be >= 0"):
        SplitInput(data_config(tiny_data, num_shards=-1), "train")


def test_shard_and_batch_sizes_are_checked_naming_keys_and_values(tiny_data):
    with pytest.raises(
        ValueError, match=r"data.num_shards \(3\) must be a multiple of the world size \(2\)"
    ):
        SplitInput(data_config(tiny_data, batch_size=600, num_shards=3), "train", 0, 2)
    with pytest.raises(
        ValueError, match=r"data.batch_size \(502\) must be divisible by data.num_shards \(4\)"
    ):
        SplitInput(data_config(tiny_data, batch_size=502, num_shards=4), "train", 1, 2)
    with pytest.raises(
        ValueError,
        match=r"data.batch_size \(501\) must be divisible by the world size \(2\).*"
        r"data.num_shards = 0",
    ):
        SplitInput(data_config(tiny_data, batch_size=501), "train", 0, 2)
    # 3000 rows in 9 row groups over 2 shards: about 1500 each, fewer than 2000 per step
    with pytest.raises(
        ValueError,
        match=r"data.batch_size \(4000\) over 2 data shards is 2000 rows per shard.*"
        r"rows per shard: \[1465, 1535\].*data.equal_steps=pad",
    ):
        SplitInput(data_config(tiny_data, batch_size=4000, num_shards=2), "train")
    # the eval batch needs no divisibility: each rank takes ceil(eval_batch_size / W)
    assert SplitInput(data_config(tiny_data, eval_batch_size=7), "eval", 0, 2).local_batch_size == 4


def test_jagged_permutation_with_and_without_fbgemm():
    from recsys_moe.data.parquet import _permute_jagged, permute_jagged_numpy

    lengths = torch.tensor([2, 0, 3, 1], dtype=torch.int32)
    values = torch.tensor([10, 11, 30, 31, 32, 40])
    order = torch.tensor([2, 0, 3, 1])
    for fn in (_permute_jagged, permute_jagged_numpy):
        n, v = fn(order, lengths, values)
        assert n.tolist() == [3, 2, 1, 0] and v.tolist() == [30, 31, 32, 10, 11, 40]


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="counts threads in /proc")
def test_worker_threads_permute_off_openmp(tiny_data_config):
    """A loader worker thread permutes jagged columns without torch's OpenMP: a parallel
    kernel there would start a second OpenMP team (one more OS thread while the worker lives),
    which slows every kernel of the trainer's own team."""
    import pyarrow.fs as pafs

    from recsys_moe.data.loader import _init_worker
    from recsys_moe.data.parquet import _permute_jagged, permute_jagged_numpy

    def threads() -> int:
        return len(os.listdir("/proc/self/task"))

    gen = torch.Generator().manual_seed(0)
    lengths = torch.randint(0, 4, (1 << 17,), dtype=torch.int32, generator=gen)
    values = torch.arange(int(lengths.sum()))
    order = torch.randperm(len(lengths), generator=gen)
    before_threads = torch.get_num_threads()
    torch.set_num_threads(2)  # on 1 thread an OpenMP team starts no thread of its own
    try:
        init = (tiny_data_config, pafs.LocalFileSystem(), False)
        with ThreadPoolExecutor(1, initializer=_init_worker, initargs=init) as pool:
            pool.submit(int).result()  # the worker thread exists
            alive = threads()
            n, v = pool.submit(_permute_jagged, order, lengths, values).result()
            assert threads() == alive
    finally:
        torch.set_num_threads(before_threads)
    expected_n, expected_v = permute_jagged_numpy(order, lengths, values)
    assert torch.equal(n, expected_n) and torch.equal(v, expected_v)
