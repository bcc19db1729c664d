"""Bad rows reach the run's outputs: skipped rows are counted per reason in metrics.jsonl and
summary.json; under on_bad_rows=error the run stops with an error naming the file."""

from __future__ import annotations

import json
import math
import shutil

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from recsys_moe.config.schema import BadRows
from recsys_moe.data.files import DataError
from recsys_moe.trainer import Trainer
from tests.tests_support import train_run


@pytest.fixture
def data_with_bad_rows(tiny_data, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(tiny_data, root)
    t = pq.read_table(sorted((root / "train").glob("*.parquet"))[0]).slice(0, 20)
    click = t.column("click").to_pylist()
    click[3] = click[7] = math.nan
    t = t.set_column(t.schema.get_field_index("click"), "click", pa.array(click, pa.float32()))
    t = t.set_column(t.schema.get_field_index("row_id"), "row_id", pc.add(t.column("row_id"), 5000))
    pq.write_table(t, root / "train" / "zz-bad.parquet")
    return root


def test_skipped_rows_are_reported(tiny_train_config, data_with_bad_rows, tmp_path):
    cfg = tiny_train_config
    cfg.data.path = str(data_with_bad_rows)
    cfg.data.on_bad_rows = BadRows.skip
    run = tmp_path / "run"
    summary = train_run(cfg, run)
    assert summary["data/skipped_rows/nan_label"] == 2
    assert json.loads((run / "summary.json").read_text())["data/skipped_rows/nan_label"] == 2
    last = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in last if "data/skipped_rows" in r]
    assert logged and logged[-1]["data/skipped_rows/nan_label"] == 2


def test_bad_rows_stop_the_run_by_default(tiny_train_config, data_with_bad_rows, tmp_path):
    cfg = tiny_train_config
    cfg.data.path = str(data_with_bad_rows)
    trainer = Trainer(cfg, tmp_path / "run")
    try:
        with pytest.raises(DataError, match=r"zz-bad.parquet: row group 0: row 3: column 'click'"):
            trainer.train()
    finally:
        trainer.close()
