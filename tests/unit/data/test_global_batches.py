"""data.batch_size is global and data.num_shards fixes the data shards: the same job on 1, 2 or 4
(simulated) ranks sees the same global batches, step by step, and resumes on any of these world
sizes from the positions the ranks of another one saved."""

from __future__ import annotations

from dataclasses import replace

import pytest

from recsys_moe.data.loader import SplitInput, merge_states
from tests.tests_support import data_config, global_batches, ranks_of

V = 4  # data shards
B = 120  # global batch: 30 rows per shard and step


def _cfg(tiny_data, workers: int = 0, **over):
    return data_config(
        tiny_data,
        batch_size=B,
        num_shards=V,
        num_workers=workers,
        shuffle={"buffer_rows": 500},
        **over,
    )


@pytest.mark.parametrize("equal_steps", ["pad", "drop"])
@pytest.mark.parametrize("workers", [0, 2])
def test_global_batches_do_not_depend_on_the_world_size(tiny_data, workers, equal_steps):
    cfg = _cfg(tiny_data, workers, equal_steps=equal_steps)
    ref = global_batches(ranks_of(cfg, 1), epochs=2)
    steps = len(ref) // 2
    for world in (2, 4):
        ranks = ranks_of(cfg, world)
        assert {r.local_batch_size for r in ranks} == {B // world}
        assert [s.index for r in ranks for s in r.shards] == list(range(V))  # contiguous
        assert global_batches(ranks, epochs=2) == ref
    assert all(len(b) == B for b in ref)
    for e in range(2):  # exactly once per epoch: every row (pad), or no row twice (drop)
        ids = [i for b in ref[e * steps : (e + 1) * steps] for i in b if i >= 0]
        if equal_steps == "pad":
            assert sorted(ids) == list(range(3000))
        else:
            assert len(ids) == len(set(ids)) == 3000 - ranks_of(cfg, 1)[0].dropped_rows
    assert ref[:steps] != ref[steps:]  # reshuffled every epoch
    # A rank's batch is its shards' streams side by side: the first 30 rows of the global batch
    # are shard 0's, the same as a one-shard-per-rank run of 4 ranks at 30 rows per batch.
    alone = SplitInput(replace(cfg, num_shards=0), "train", 0, 4)  # its only shard: shard 0
    assert [b.row_ids.tolist() for b, _ in alone.batches()] == [g[: B // V] for g in ref[:steps]]


def test_the_default_is_one_shard_per_rank(tiny_data):
    cfg = data_config(tiny_data, batch_size=B, shuffle={"buffer_rows": 500})
    ranks = ranks_of(cfg, 2)
    assert [r.num_shards for r in ranks] == [2, 2] and ranks[1].shards[0].index == 1
    # so the global batches differ from those of a one-rank run (whose only shard is all data)
    assert global_batches(ranks) != global_batches(ranks_of(cfg, 1))


def _saved_after(cfg, world: int, epoch: int, steps: int) -> list[dict]:
    """The states of every rank of a `world`-rank run after `steps` batches of epoch `epoch`."""
    ranks = ranks_of(cfg, world)
    for _ in range(epoch):
        global_batches(ranks)
    its = [r.batches() for r in ranks]
    for _ in range(steps):
        for it in its:
            next(it)
    states = [r.state_dict() for r in ranks]
    for it in its:
        it.close()
    return states


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("epoch,steps", [(0, 7), (1, 13), (1, 0)])
def test_positions_of_two_ranks_resume_on_one_and_on_four(tiny_data, workers, epoch, steps):
    cfg = _cfg(tiny_data, workers)
    ref = global_batches(ranks_of(cfg, 1), epochs=3)
    per_epoch = len(ref) // 3
    states = _saved_after(cfg, 2, epoch, steps)
    assert [sorted(s["shards"]) for s in states] == [[0, 1], [2, 3]]
    merged = merge_states(states)
    for world in (1, 4):
        ranks = ranks_of(cfg, world)
        for r in ranks:
            r.load_state_dict(merged)
        assert ranks[0].epoch == epoch
        rest = global_batches(ranks, epochs=2)
        assert rest == ref[epoch * per_epoch + steps : (epoch + 2) * per_epoch]


def test_counters_follow_their_shards_across_world_sizes(tiny_data):
    cfg = _cfg(tiny_data, equal_steps="pad")
    states = _saved_after(cfg, 2, 1, 0)  # after one epoch: padding counted per shard
    padded = sum(s["shards"][v]["padded_rows"] for s in states for v in s["shards"])
    assert padded == ranks_of(cfg, 1)[0].steps * B - 3000 > 0
    for world in (1, 4):
        ranks = ranks_of(cfg, world)
        for r in ranks:
            r.load_state_dict(merge_states(states))
        assert sum(r.padded_rows for r in ranks) == padded
        assert sum(r.metrics()["data/padded_rows"] for r in ranks) == padded


def test_a_state_missing_a_shard_fails_naming_it(tiny_data):
    cfg = _cfg(tiny_data)
    first, second = _saved_after(cfg, 2, 0, 3)
    ranks = ranks_of(cfg, 4)
    ranks[1].load_state_dict(first)  # rank 1 of 4 reads shard 1: rank 0 of 2 saved it
    with pytest.raises(ValueError, match=r"no position for shard 2 of data.num_shards \(4\)"):
        ranks[2].load_state_dict(first)
    one = SplitInput(cfg, "train")
    with pytest.raises(ValueError, match=r"no position for shard 0 .* holds shards \[2, 3\]"):
        one.load_state_dict(second)
    assert one.epoch == 0 and one.batches_done == 0  # a refused state changes nothing
    with pytest.raises(ValueError, match="data states disagree on batches"):
        merge_states([first, _saved_after(cfg, 2, 0, 4)[1]])


def test_a_state_round_trips_through_json_keys(tiny_data):
    import json

    cfg = _cfg(tiny_data)
    states = [json.loads(json.dumps(s)) for s in _saved_after(cfg, 2, 0, 5)]  # keys -> str
    ref = global_batches(ranks_of(cfg, 1))
    one = SplitInput(cfg, "train")
    one.load_state_dict(merge_states(states))
    assert global_batches([one]) == ref[5:]
