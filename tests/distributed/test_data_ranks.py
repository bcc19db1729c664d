"""Real gloo ranks on CPU read the same rows, in the same order and steps, as simulated ranks."""

from __future__ import annotations

import torch
import torch.distributed as dist

from recsys_moe.data.loader import SplitInput
from tests.tests_support import data_config, run_gloo_ranks

WORLD = 2


def _rank(rank: int, path: str) -> tuple:
    cfg = data_config(path, batch_size=64, num_workers=1)
    inp = SplitInput(cfg, "train", rank, WORLD, dist.group.WORLD)
    ids = [b.row_ids.tolist() for b, _ in inp.batches()]
    return inp.steps, ids, inp.metrics(dist.group.WORLD)


def test_gloo_ranks_equal_simulated_ranks(tiny_data):
    out = run_gloo_ranks(_rank, WORLD, str(tiny_data))
    cfg = data_config(tiny_data, batch_size=64, num_workers=1)
    for rank in range(WORLD):
        sim = SplitInput(cfg, "train", rank, WORLD)
        steps, ids, metrics = out[rank]
        assert steps == sim.steps
        assert ids == [b.row_ids.tolist() for b, _ in sim.batches()]
        # counters are summed over ranks: the dropped rows are global, the same on every rank
        assert metrics["data/dropped_rows_per_epoch"] == sim.dropped_rows
    seen = [i for r in range(WORLD) for b in out[r][1] for i in b]
    assert len(seen) == len(set(seen)) == out[0][0] * 64 * WORLD
    assert torch.tensor(seen).max() < 3000
