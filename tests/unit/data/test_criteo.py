"""Criteo conversion of a tiny hand-written TSV against hand-computed output."""

from __future__ import annotations

import gzip
import math

import numpy as np
import pyarrow.parquet as pq
import pytest
from omegaconf import OmegaConf

from recsys_moe.config.schema import DataConfig
from recsys_moe.data.criteo import CAT_COLUMNS, INT_COLUMNS, convert, main
from recsys_moe.data.loader import SplitInput
from recsys_moe.data.parquet import hash_ids
from tests.conftest import CONF


def _line(label, ints, cats) -> str:
    return "\t".join([str(label), *ints, *cats]) + "\n"


INTS_1 = ["1", "", "-3", "0", "99"] + ["2"] * 8
CATS_1 = ["68fd1e64", ""] + ["0"] * 23 + ["FFFFFFFF"]
INTS_2 = [""] * 13
CATS_2 = ["a"] + [""] * 25
LINES = [_line(1, INTS_1, CATS_1), _line(0, INTS_2, CATS_2)]


def test_rows_match_hand_computed_values(tmp_path):
    src = tmp_path / "day_0.gz"
    with gzip.open(src, "wt") as f:
        f.writelines(LINES)
    rows = convert([src], tmp_path / "out", val_fraction=0, test_fraction=0, rows_per_file=1)
    assert rows == {"train": 2, "validation": 0, "test": 0}
    files = sorted((tmp_path / "out" / "train").glob("*.parquet"))
    assert len(files) == 2  # rows_per_file=1
    got = pq.read_table(tmp_path / "out" / "train").to_pylist()
    first, second = got
    assert first["click"] == 1.0 and second["click"] == 0.0
    # log(1 + max(x, 0)); missing -> 0; -3 -> log(1) = 0
    expect_ints = [math.log(2), 0.0, 0.0, 0.0, math.log(100)] + [math.log(3)] * 8
    assert [first[c] for c in INT_COLUMNS] == pytest.approx(expect_ints, rel=1e-6)
    assert [second[c] for c in INT_COLUMNS] == [0.0] * 13
    # hex value + 1; missing -> 0
    assert first["cat_1"] == 0x68FD1E64 + 1
    assert first["cat_2"] == 0 and first["cat_3"] == 1 and first["cat_26"] == 0xFFFFFFFF + 1
    assert second["cat_1"] == 11 and all(second[c] == 0 for c in CAT_COLUMNS[1:])
    assert [r["row_id"] for r in got] == [0, 1]


def test_split_is_seeded_and_loads_with_criteo_yaml(tmp_path):
    src = tmp_path / "train.txt"
    src.write_text("".join(LINES * 50))
    a = convert([src], tmp_path / "a", seed=1, val_fraction=0.2, test_fraction=0.2)
    b = convert([src], tmp_path / "b", seed=1, val_fraction=0.2, test_fraction=0.2)
    assert a == b and sum(a.values()) == 100 and min(a.values()) > 0
    assert pq.read_table(tmp_path / "a" / "test").equals(pq.read_table(tmp_path / "b" / "test"))

    raw = OmegaConf.load(CONF / "data" / "criteo.yaml")
    cfg = OmegaConf.to_object(
        OmegaConf.merge(
            OmegaConf.structured(DataConfig),
            raw,
            {"path": str(tmp_path / "a"), "batch_size": 8, "num_workers": 0},
        )
    )
    inp = SplitInput(cfg, "train")
    batch, _ = next(inp.batches())
    ids = batch.sparse.to_dict()["cat_1"].values()
    assert ids.min() >= 0 and ids.max() < 100000
    # 0x68fd1e64 + 1 is out of range and hashed exactly as hash_ids says; 11 is kept
    hashed = int(hash_ids(np.array([0x68FD1E64 + 1]), 100000)[0])
    assert set(ids.tolist()) <= {hashed, 11}
    assert inp.metrics()["data/hashed_ids/cat_1"] > 0


def test_bad_lines_name_file_and_line(tmp_path, capsys):
    src = tmp_path / "bad.txt"
    src.write_text(_line(1, INTS_2, ["zz"] + [""] * 25))
    with pytest.raises(SystemExit):
        main(["--src", str(src), "--out", str(tmp_path / "o")])
    assert (
        "bad.txt (cat_1): line 1: categorical value is not hexadecimal" in capsys.readouterr().err
    )


def _csv_with_header(lines: list[str]) -> str:
    """The same examples as a comma-separated file with a header line and floats for integers."""
    head = ",".join(["Label", *[f"I{i}" for i in range(1, 14)], *[f"C{i}" for i in range(1, 27)]])
    rows = []
    for line in lines:
        fields = line.rstrip("\n").split("\t")
        fields[1:14] = [f"{float(x)}" if x else "" for x in fields[1:14]]
        rows.append(",".join(fields))
    return "\n".join([head, *rows]) + "\n"


def test_comma_separated_with_header_and_float_integers_is_read_the_same(tmp_path):
    (tmp_path / "a.txt").write_text("".join(LINES))
    (tmp_path / "b.csv").write_text(_csv_with_header(LINES))
    for name in ("a.txt", "b.csv"):
        convert([tmp_path / name], tmp_path / name.split(".")[0], val_fraction=0, test_fraction=0)
    assert pq.read_table(tmp_path / "a" / "train").equals(pq.read_table(tmp_path / "b" / "train"))


@pytest.mark.parametrize(
    "bad_line, text",
    [
        (
            _line(1, ["2", "abc"] + ["1"] * 11, CATS_2),
            "line 3: int_2 (field 3) is not a number: 'abc'",
        ),
        ("1\t2\t3\n", "line 3: not 40 fields"),
        (_line(2, INTS_1, CATS_1), "line 3: the label (2) is not 0 or 1"),
        (_line(1, INTS_1, ["xyz"] + [""] * 25), "(cat_1): line 3: categorical value is not hex"),
    ],
)
def test_bad_line_names_file_line_and_field_and_leaves_no_output(tmp_path, capsys, bad_line, text):
    src = tmp_path / "day_0"
    src.write_text("".join(LINES) + bad_line + LINES[0])
    with pytest.raises(SystemExit):
        main(["--src", str(src), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert str(src) in err and text in err, err
    assert not (tmp_path / "out").exists()


def test_first_line_that_is_not_criteo_names_the_format(tmp_path, capsys):
    src = tmp_path / "sample.csv"
    src.write_text("label;i1;c1\n1;2;a\n")
    with pytest.raises(SystemExit):
        main(["--src", str(src), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert f"{src}: line 1 has 1 tab-separated and 1 comma-separated fields, not 40" in err
    assert "tab-separated (or comma-separated)" in err and not (tmp_path / "out").exists()


def test_line_numbers_count_across_blocks(tmp_path):
    src = tmp_path / "day_0"
    lines = [LINES[i % 2] for i in range(120)]
    lines[88] = _line(1, INTS_2, ["q"] + [""] * 25)
    src.write_text("".join(lines))
    with pytest.raises(ValueError, match=r"day_0 \(cat_1\): line 89: categorical value"):
        convert([src], tmp_path / "out", block_bytes=1000)  # about 10 lines per block
    lines[88] = _line(1, ["1.5", "x"] + [""] * 11, CATS_2)
    src.write_text("".join(lines))
    with pytest.raises(ValueError, match=r"day_0: line 89: int_2 \(field 3\) is not a number"):
        convert([src], tmp_path / "out", block_bytes=1000)
