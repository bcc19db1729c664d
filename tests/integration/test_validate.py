"""python -m recsys_moe.data.validate: every row of both splits through the trainer's checks, a
per-reason table with the first offending file, row group and row, exit code 1 on bad input."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from recsys_moe.data.validate import main
from tests.conftest import CONF, REPO
from tests.unit.data.test_checksums import flip_last_page_byte


@pytest.fixture
def data(tiny_data, tmp_path):
    """A copy of the tiny data set (its ids fit conf/data/synthetic.yaml's larger tables)."""
    shutil.copytree(tiny_data, tmp_path / "data")
    return tmp_path / "data"


def _set_column(path, column: str, rows: list[int], value) -> None:
    t = pq.read_table(path)
    values = t.column(column).to_pylist()
    for r in rows:
        values[r] = value
    i = t.schema.get_field_index(column)
    t = t.set_column(i, column, pa.array(values, t.schema.field(i).type))
    pq.write_table(t, path, row_group_size=400)


def test_clean_data_passes(data, capsys):
    assert main([f"data.path={data}"]) == 0
    out = capsys.readouterr().out
    assert "data.train" in out and "data.eval" in out and out.count("all good") == 2, out


def test_planted_bad_eval_rows_are_found_with_their_first_row(data, capsys):
    path = max((data / "eval").glob("*.parquet"), key=lambda p: pq.read_metadata(p).num_rows)
    _set_column(path, "click", [405, 406, 407], 2.0)  # row group 1, rows 5 to 7
    _set_column(path, "dense_3", [410], float("nan"))
    assert main([f"data.path={data}"]) == 1
    out = capsys.readouterr().out
    train, eval_ = out.split("data.eval")
    assert "all good" in train
    assert "bad: 0 file(s), 4 row(s)" in eval_, out
    rows = {line.split()[0]: line for line in eval_.splitlines() if line.startswith("  ")}
    assert f"{path}: row group 1: row 5: column 'click'" in rows["label_not_binary"]
    assert rows["label_not_binary"].split()[2] == "3"  # rows of that reason
    assert f"{path}: row group 1: row 10: column 'dense_3'" in rows["nonfinite_dense"]


def test_bad_files_and_corrupt_pages_are_reported(data, capsys):
    (data / "train" / "zz.parquet").write_bytes(b"not parquet")
    first = sorted((data / "train").glob("part-*.parquet"))[0]
    flip_last_page_byte(first, 0, 0)
    assert main([f"data.path={data}", "data.on_bad_rows=skip"]) == 1  # bad under skip too
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.startswith("  ")}
    assert rows["unreadable"][1:3] == ["1", "0"]  # one file, rows unknown
    assert rows["checksum_mismatch"][1:3] == [
        "-",
        str(pq.read_metadata(first).row_group(0).num_rows),
    ]
    assert f"{first}: row group 0: could not be read" in " ".join(rows["checksum_mismatch"])


def test_usage_errors_exit_2(data, capsys):
    assert main([f"data.path={data / 'nowhere'}"]) == 2
    assert "does not exist" in capsys.readouterr().out
    assert main(["data.no_such_key=1"]) == 2
    assert "no_such_key" in capsys.readouterr().err


def test_cli_with_a_config_dir_of_ones_own(data, tmp_path):
    """README, "Your own data": a folder with data/my_set.yaml, used with --config-dir."""
    mine = yaml.safe_load((CONF / "data" / "synthetic.yaml").read_text())
    mine["path"] = str(data)
    (tmp_path / "my_conf" / "data").mkdir(parents=True)
    (tmp_path / "my_conf" / "data" / "my_set.yaml").write_text(yaml.safe_dump(mine))
    _set_column(sorted((data / "eval").glob("*.parquet"))[0], "like", [3], -1.0)
    r = subprocess.run(
        [sys.executable, "-m", "recsys_moe.data.validate"]
        + ["--config-dir", str(tmp_path / "my_conf"), "data=my_set"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 1, r.stdout + r.stderr
    assert "row group 0: row 3: column 'like'" in r.stdout
