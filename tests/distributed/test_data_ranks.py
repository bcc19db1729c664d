"""Real gloo ranks on CPU read the global batches of a one-process run (data.num_shards fixed),
and the positions they save resume the run on one and on four (simulated) ranks; a bad eval row
found by one rank before training stops every rank."""

from __future__ import annotations

import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch.distributed as dist

from recsys_moe.data.files import DataError
from recsys_moe.data.loader import SplitInput, merge_states
from tests.tests_support import data_config, global_batches, ranks_of, run_gloo_ranks

WORLD = 2
STOP = 5  # batches of the second epoch read before the ranks save their positions


def _cfg(path):
    return data_config(
        path, batch_size=120, num_shards=4, num_workers=2, shuffle={"buffer_rows": 500}
    )


def _rank(rank: int, path: str, bad_path: str) -> tuple:
    inp = SplitInput(_cfg(path), "train", rank, WORLD, dist.group.WORLD)
    ids = [b.row_ids.tolist() for b, _ in inp.batches()]
    it = inp.batches()
    ids += [next(it)[0].row_ids.tolist() for _ in range(STOP)]
    state = inp.state_dict()
    it.close()
    return inp.steps, ids, state, inp.metrics(dist.group.WORLD), _check_eval(rank, bad_path)


def _check_eval(rank: int, path: str) -> str:
    inp = SplitInput(data_config(path), "eval", rank, WORLD, dist.group.WORLD)
    units = [u for shard in inp.shards for u in shard.units]
    bad = [u for u in units if u.path.endswith("part-00001.parquet") and u.index == 0]
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


def test_gloo_ranks_read_the_one_process_global_batches_and_resume_elsewhere(tiny_data, ranks):
    cfg = _cfg(tiny_data)
    one = ranks_of(cfg, 1)
    ref = global_batches(one, epochs=3)
    steps = one[0].steps
    assert [r[0] for r in ranks] == [steps] * WORLD
    gloo = [ranks[0][1][s] + ranks[1][1][s] for s in range(steps + STOP)]  # in rank order
    assert gloo == ref[: steps + STOP]
    # counters are summed over ranks: the dropped rows are global, the same on every rank
    assert ranks[0][3]["data/dropped_rows_per_epoch"] == one[0].dropped_rows > 0

    merged = merge_states([r[2] for r in ranks])
    for world in (1, 4):
        resumed = ranks_of(cfg, world)
        for r in resumed:
            r.load_state_dict(merged)
        assert global_batches(resumed, epochs=2) == ref[steps + STOP :]


def test_a_bad_eval_row_stops_every_rank(ranks):
    out = [r[4] for r in ranks]
    reader = [o for o in out if o.startswith("reads the bad row")]
    assert len(reader) == 1 and "row 2: column 'dense_0'" in reader[0], out
    other = [o for o in out if o.startswith("other")]
    assert len(other) == 1 and "another rank found a bad row" in other[0], out
