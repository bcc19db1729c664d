"""Real gloo ranks on CPU read the same rows, in the same order and steps, as simulated ranks;
a bad eval row found by one rank before training stops every rank."""

from __future__ import annotations

import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.distributed as dist

from recsys_moe.data.files import DataError
from recsys_moe.data.loader import SplitInput
from tests.tests_support import data_config, run_gloo_ranks

WORLD = 2


def _rank(rank: int, path: str, bad_path: str) -> tuple:
    cfg = data_config(path, batch_size=64, num_workers=1)
    inp = SplitInput(cfg, "train", rank, WORLD, dist.group.WORLD)
    ids = [b.row_ids.tolist() for b, _ in inp.batches()]
    return inp.steps, ids, inp.metrics(dist.group.WORLD), _check_eval(rank, bad_path)


def _check_eval(rank: int, path: str) -> str:
    inp = SplitInput(data_config(path), "eval", rank, WORLD, dist.group.WORLD)
    bad = [u for u in inp.units if u.path.endswith("part-00001.parquet") and u.index == 0]
    try:
        inp.check_rows()
    except DataError as e:
        return f"{'reads the bad row' if bad else 'other'}: {e}"
    return "no error"


@pytest.fixture(scope="module")
def ranks(tiny_data, tmp_path_factory):
    """One spawn of the gloo ranks (the costly part) serves both tests: train batches of the
    tiny data, and check_rows of a copy whose eval row group part-00001/0 holds a NaN."""
    bad = tmp_path_factory.mktemp("bad_eval") / "data"
    shutil.copytree(tiny_data, bad)
    path = bad / "eval" / "part-00001.parquet"
    t = pq.read_table(path)
    i = t.schema.get_field_index("dense_0")
    dense = t.column(i).to_pylist()
    dense[2] = float("nan")
    pq.write_table(t.set_column(i, "dense_0", pa.array(dense, pa.float32())), path)  # 1 row group
    return run_gloo_ranks(_rank, WORLD, str(tiny_data), str(bad))


def test_gloo_ranks_equal_simulated_ranks(tiny_data, ranks):
    cfg = data_config(tiny_data, batch_size=64, num_workers=1)
    for rank in range(WORLD):
        sim = SplitInput(cfg, "train", rank, WORLD)
        steps, ids, metrics, _ = ranks[rank]
        assert steps == sim.steps
        assert ids == [b.row_ids.tolist() for b, _ in sim.batches()]
        # counters are summed over ranks: the dropped rows are global, the same on every rank
        assert metrics["data/dropped_rows_per_epoch"] == sim.dropped_rows
    seen = [i for r in range(WORLD) for b in ranks[r][1] for i in b]
    assert len(seen) == len(set(seen)) == ranks[0][0] * 64 * WORLD
    assert torch.tensor(seen).max() < 3000


def test_a_bad_eval_row_stops_every_rank(ranks):
    out = [r[3] for r in ranks]
    reader = [o for o in out if o.startswith("reads the bad row")]
    assert len(reader) == 1 and "row 2: column 'dense_0'" in reader[0], out
    other = [o for o in out if o.startswith("other")]
    assert len(other) == 1 and "another rank found a bad row" in other[0], out
