"""The parallel layout: degrees checked before anything is built, groups laid out as documented."""

from __future__ import annotations

import pytest

from recsys_moe.config.schema import ParallelConfig
from recsys_moe.distributed.parallel_dims import ParallelDims
from recsys_moe.trainer import Trainer


def test_world_4_dp_2_ep_2_layout():
    dims = ParallelDims(world_size=4, ep=2, rank=3)
    assert (dims.dp, dims.ep_rank, dims.dp_rank) == (2, 1, 1)
    assert dims.layout() == {"ep": [[0, 1], [2, 3]], "dp": [[0, 2], [1, 3]]}
    assert ParallelDims(world_size=8, ep=8).layout()["dp"] == [[r] for r in range(8)]
    assert ParallelDims(world_size=3, ep=1).layout()["ep"] == [[0], [1], [2]]


@pytest.mark.parametrize(
    "world, ep, experts, message",
    [
        (4, 3, 6, "parallel.ep_size (3) must divide the world size (4)"),
        (4, 0, 8, "parallel.ep_size (0) must be >= 1"),
        (4, 4, 6, "model.num_experts (6) must be divisible by parallel.ep_size (4)"),
    ],
)
def test_bad_degrees_name_both_keys(world, ep, experts, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        ParallelDims(world_size=world, ep=ep).check_experts(experts)


def test_from_env_reads_torchrun(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("RANK", "5")
    monkeypatch.setenv("LOCAL_RANK", "1")
    dims = ParallelDims.from_env(ParallelConfig(ep_size=4), num_experts=16)
    assert (dims.world_size, dims.rank, dims.local_rank, dims.ep_rank, dims.dp_rank) == (
        8,
        5,
        1,
        1,
        1,
    )


def test_trainer_checks_the_degrees_before_reading_any_data(tiny_train_config, tmp_path):
    cfg = tiny_train_config
    cfg.parallel.ep_size = 3  # does not divide the 8 experts, nor a world of 1
    cfg.data.path = str(tmp_path / "no_such_data")  # would fail first if data were read first
    with pytest.raises(ValueError, match=r"parallel.ep_size \(3\) must divide the world size"):
        Trainer(cfg, tmp_path)


def _groups_made_and_destroyed(rank: int, ep: int) -> dict[str, object]:
    import torch
    import torch.distributed as dist
    from torch.distributed.distributed_c10d import _world

    before = len(_world.pg_map)
    dims = ParallelDims(world_size=2, ep=ep, rank=rank).init("cpu", timeout_s=60)
    made = len(_world.pg_map)
    t = torch.ones(1)
    dist.all_reduce(t, group=dims.ep_group)
    dist.all_reduce(t, group=dims.dp_group)
    dims.close()
    dims.close()  # twice: nothing left to destroy
    after = len(_world.pg_map)
    dist.all_reduce(t)  # the default group, not dims', is still usable
    return {
        "before": before,
        "made": made,
        "after": after,
        "sum": float(t),
        "owns": dims.owns_default_group,
    }


@pytest.mark.parametrize("ep", [1, 2])
def test_close_destroys_the_groups_it_made_and_keeps_the_default_group(ep):
    from tests.tests_support import run_gloo_ranks

    for rank, r in enumerate(run_gloo_ranks(_groups_made_and_destroyed, 2, ep)):
        # init made this rank's two groups (of the other rank's one-rank group it holds only a
        # placeholder): both gone after close; the default group, not its own, still reduces
        # (1 -> x2 over the two-rank group -> x2 over the world)
        assert r["made"] == r["before"] + 2, (rank, r)
        assert r["after"] == r["before"], (rank, r)
        assert r["sum"] == 4.0 and r["owns"] is False
