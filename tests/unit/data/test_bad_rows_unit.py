"""Every bad-input case of issue 4 gives its documented outcome: under data.on_bad_rows=error a
DataError naming file, row group, column and row; under skip, the row (or file) is left out and
counted per reason. Hand-written files: a.parquet (4 good rows, ids 0-3) and b.parquet (4 rows,
ids 10-13; row 2 is made bad per case)."""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from omegaconf import OmegaConf

from recsys_moe.config.schema import DataConfig
from recsys_moe.data.files import REASONS, DataError
from recsys_moe.data.loader import SplitInput
from recsys_moe.data.parquet import hash_ids

GOOD = {
    "x": [0.5, 1.0, 2.0, 3.0],
    "item": [1, 2, 3, 4],
    "tags": [[0], [1, 2], [], [4]],
    "y": [1.0, 0.0, 1.0, 0.0],
    "m": [True, True, True, True],
    "r": [1.0, 2.0, 3.0, 4.0],
    "w": [1.0, 1.0, 1.0, 1.0],
    "rid": [0, 1, 2, 3],
}
TYPES = {
    "x": pa.float64(),
    "item": pa.int64(),
    "tags": pa.list_(pa.int64()),
    "y": pa.float64(),
    "m": pa.bool_(),
    "r": pa.float32(),
    "w": pa.float32(),
    "rid": pa.int64(),
}


def _config(path: Path, on_bad_rows: str = "error", item_policy: str = "error") -> DataConfig:
    raw = {
        "path": str(path),
        "batch_size": 3,
        "dense": ["x"],
        "sparse": [
            {"name": "item", "num_embeddings": 10, "id_policy": item_policy},
            {"name": "tags", "num_embeddings": 5},
        ],
        "tasks": [
            {"name": "y", "mask": "m"},
            {"name": "r", "type": "regression", "weight": "w"},
        ],
        "row_id": "rid",
        "on_bad_rows": on_bad_rows,
        "equal_steps": "pad",
        "shuffle": {"enabled": False},
    }
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(DataConfig), raw))


def _write(path: Path, cols: dict, types: dict | None = None, **kw) -> None:
    types = {**TYPES, **(types or {})}
    table = pa.table({k: pa.array(v, type=types[k]) for k, v in cols.items()})
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, write_page_checksum=True, **kw)


def _bad_file(root: Path, **row2) -> None:
    cols = {k: list(v) for k, v in GOOD.items()}
    cols["rid"] = [10, 11, 12, 13]
    for k, v in row2.items():
        cols[k][2] = v
    _write(root / "train" / "b.parquet", cols)


def _run(root: Path, **cfg) -> tuple[list[int], dict[str, float]]:
    inp = SplitInput(_config(root, **cfg), "train")
    ids = [i for b, _ in inp.batches() for i in b.row_ids.tolist() if i >= 0]
    return sorted(ids), inp.metrics()


@pytest.fixture
def root(tmp_path) -> Path:
    _write(tmp_path / "train" / "a.parquet", GOOD)
    return tmp_path


ROW_CASES = {
    # case: (changes to row 2 of b.parquet, reason, column)
    "null_label": ({"y": None}, "null_label", "y"),
    "nan_label": ({"y": math.nan}, "nan_label", "y"),
    "inf_label": ({"r": math.inf}, "nan_label", "r"),
    "nan_dense": ({"x": math.nan}, "nonfinite_dense", "x"),
    "inf_dense": ({"x": -math.inf}, "nonfinite_dense", "x"),
    "null_dense": ({"x": None}, "null_value", "x"),
    "negative_id": ({"item": -3}, "negative_id", "item"),
    "id_too_large": ({"item": 10}, "id_out_of_range", "item"),
    "list_id_too_large": ({"tags": [1, 5]}, "id_out_of_range", "tags"),
    "null_id": ({"item": None}, "null_value", "item"),
    "null_id_in_list": ({"tags": [1, None]}, "null_value", "tags"),
    "negative_weight": ({"w": -1.0}, "nonfinite_weight", "w"),
    "null_mask": ({"m": None}, "null_value", "m"),
    # y is a binary task: its label must be 0 or 1 where it exists (r, a regression task, is free)
    "label_2": ({"y": 2.0}, "label_not_binary", "y"),
    "label_minus_1": ({"y": -1.0}, "label_not_binary", "y"),
    "label_half": ({"y": 0.5}, "label_not_binary", "y"),
}


@pytest.mark.parametrize("case", sorted(ROW_CASES))
def test_bad_row_raises_naming_file_row_group_column_and_row(root, case):
    row2, reason, column = ROW_CASES[case]
    _bad_file(root, **row2)
    with pytest.raises(DataError) as e:
        _run(root)
    msg = str(e.value)
    assert "b.parquet: row group 0: row 2: column" in msg and f"'{column}'" in msg, msg
    assert reason in msg


@pytest.mark.parametrize("case", sorted(ROW_CASES))
def test_bad_row_is_skipped_and_counted(root, case):
    row2, reason, _ = ROW_CASES[case]
    _bad_file(root, **row2)
    ids, metrics = _run(root, on_bad_rows="skip")
    assert ids == [0, 1, 2, 3, 10, 11, 13]
    assert metrics[f"data/skipped_rows/{reason}"] == 1
    assert metrics["data/skipped_rows"] == 1
    # 8 rows in footers = 3 batches of 3; the skipped row is replaced by padding at the end
    assert metrics["data/padded_rows"] == 2


@pytest.mark.parametrize("label, value", [(2.0, "2"), (-1.0, "-1"), (0.5, "0.5")])
def test_binary_label_error_names_task_and_value(root, label, value):
    _bad_file(root, y=label)
    with pytest.raises(DataError) as e:
        _run(root)
    assert f"is not 0 or 1 (the label of binary task y) (value {value})" in str(e.value)


@pytest.mark.parametrize(
    "values, arrow_type",
    [([1, 0, 1, 0], pa.int64()), ([True, False, True, False], pa.bool_())],
)
def test_integer_and_bool_binary_labels_are_accepted(root, values, arrow_type):
    cols = {**GOOD, "rid": [10, 11, 12, 13], "y": values}
    _write(root / "train" / "b.parquet", cols, {"y": arrow_type})
    _write(root / "train" / "a.parquet", {**GOOD, "y": values}, {"y": arrow_type})
    ids, metrics = _run(root)
    assert ids == [0, 1, 2, 3, 10, 11, 12, 13] and metrics["data/skipped_rows"] == 0


def test_masked_label_may_hold_anything(root):
    _bad_file(root, y=math.nan, m=False)
    ids, metrics = _run(root)
    assert ids == [0, 1, 2, 3, 10, 11, 12, 13] and metrics["data/skipped_rows"] == 0
    _bad_file(root, y=2.0, m=False)  # not 0 or 1, but the label does not exist on this row
    ids, metrics = _run(root)
    assert ids == [0, 1, 2, 3, 10, 11, 12, 13] and metrics["data/skipped_rows"] == 0
    _bad_file(root, y=None, m=False)
    inp = SplitInput(_config(root), "train")
    labels = [b.labels for b, _ in inp.batches()]
    assert all(not t.isnan().any() for t in labels)  # replaced by 0 where masked


def test_out_of_range_id_is_hashed_under_hash_policy(root):
    _bad_file(root, item=123456789)
    inp = SplitInput(_config(root, item_policy="hash"), "train")
    batches = [b for b, _ in inp.batches()]
    items = {
        rid: item
        for b in batches
        for rid, item in zip(b.row_ids.tolist(), b.sparse.to_dict()["item"].values().tolist())
    }
    assert items[12] == int(hash_ids(__import__("numpy").array([123456789]), 10)[0])
    assert 0 <= items[12] < 10 and items[11] == 2  # in-range ids keep their value
    assert inp.metrics()["data/hashed_ids/item"] == 1


def test_hash_ids_is_splitmix64_modulo():
    import numpy as np

    def reference(x: int, n: int) -> int:  # plain-integer splitmix64 finaliser
        m = (1 << 64) - 1
        z = x & m
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & m
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & m
        return (z ^ (z >> 31)) % n

    xs = [0, 1, -1, 10, 2**40 + 7, -(2**63)]
    assert hash_ids(np.array(xs, dtype=np.int64), 1000).tolist() == [reference(x, 1000) for x in xs]


FILE_CASES = {
    # case: (writer of b.parquet, reason, text in the error)
    "missing_column": (
        lambda p: _write(p, {k: v for k, v in GOOD.items() if k != "x"}),
        "missing_column",
        "column 'x' (data.dense[0]) is missing",
    ),
    "wrong_type": (
        lambda p: _write(p, {**GOOD, "y": ["a", "b", "c", "d"]}, {"y": pa.string()}),
        "wrong_type",
        "column 'y' (data.tasks[0] (y).label) has type string",
    ),
    "schema_mismatch": (
        lambda p: _write(p, GOOD, {"item": pa.int32()}),
        "schema_mismatch",
        "column 'item' (data.sparse[0] (item)) has type int32 but int64",
    ),
    "empty_file": (
        lambda p: _write(p, {k: [] for k in GOOD}),
        "empty_file",
        "the file holds no rows",
    ),
    "zero_bytes": (lambda p: p.write_bytes(b""), "empty_file", "empty file (0 bytes)"),
    "not_parquet": (
        lambda p: p.write_bytes(b"id,label\n1,0\n"),
        "unreadable",
        "not a readable Parquet file",
    ),
    "truncated": (
        lambda p: (_write(p, GOOD), p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])),
        "unreadable",
        "not a readable Parquet file",
    ),
}


@pytest.mark.parametrize("case", sorted(FILE_CASES))
def test_bad_file_raises_naming_file_and_column(root, case):
    write, _, text = FILE_CASES[case]
    write(root / "train" / "b.parquet")
    with pytest.raises(DataError) as e:
        SplitInput(_config(root), "train")
    assert "b.parquet" in str(e.value) and text in str(e.value), str(e.value)


@pytest.mark.parametrize("case", sorted(FILE_CASES))
def test_bad_file_is_skipped_and_counted(root, case):
    write, reason, _ = FILE_CASES[case]
    write(root / "train" / "b.parquet")
    ids, metrics = _run(root, on_bad_rows="skip")
    assert ids == [0, 1, 2, 3]
    assert metrics[f"data/skipped_files/{reason}"] == 1
    footer_rows = {"missing_column": 4, "wrong_type": 4, "schema_mismatch": 4}.get(case, 0)
    assert metrics["data/skipped_rows"] == footer_rows


def _corrupt_first_column_chunk(path: Path, where: str) -> None:
    """Flips bytes of the first column chunk of row group 0: its first page's header (the chunk
    starts with a page header), or the last byte of its last page's payload."""
    col = pq.read_metadata(path).row_group(0).column(0)
    start = col.dictionary_page_offset if col.has_dictionary_page else col.data_page_offset
    data = bytearray(path.read_bytes())
    if where == "header":
        data[start : start + 4] = b"\xff\xff\xff\xff"
    else:
        data[start + col.total_compressed_size - 1] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "where, reason, text",
    [
        ("payload", "checksum_mismatch", "a page's checksum does not match its bytes"),
        ("header", "unreadable", "the row group cannot be decoded"),
    ],
)
def test_corrupt_row_group_raises_or_is_skipped(root, where, reason, text):
    _bad_file(root)  # written with page checksums, which the reader verifies
    _corrupt_first_column_chunk(root / "train" / "b.parquet", where)
    with pytest.raises(DataError) as e:
        _run(root)
    assert "b.parquet: row group 0: could not be read: " + text in str(e.value), str(e.value)
    assert f"reason {reason}" in str(e.value)
    ids, metrics = _run(root, on_bad_rows="skip")
    assert ids == [0, 1, 2, 3]
    assert metrics[f"data/skipped_rows/{reason}"] == 4 and metrics["data/skipped_rows"] == 4
    assert metrics["data/padded_rows"] == 5  # 3 batches of 3 over 4 real rows


def test_no_rows_at_all_is_always_an_error(tmp_path):
    _write(tmp_path / "train" / "a.parquet", {k: [] for k in GOOD})
    with pytest.raises(DataError, match="a.parquet: the file holds no rows"):
        SplitInput(_config(tmp_path), "train")
    with pytest.raises(DataError, match=r"data.train: no rows at all in 1 file\(s\)"):
        SplitInput(_config(tmp_path, on_bad_rows="skip"), "train")


def test_everything_bad_under_skip_still_runs_equal_steps(root):
    # Every row of b.parquet bad: the rank still runs its steps, on padding.
    cols = {k: list(v) for k, v in GOOD.items()}
    cols["x"] = [math.nan] * 4
    cols["rid"] = [10, 11, 12, 13]
    _write(root / "train" / "b.parquet", cols)
    ids, metrics = _run(root, on_bad_rows="skip")
    assert ids == [0, 1, 2, 3] and metrics["data/skipped_rows/nonfinite_dense"] == 4


@pytest.mark.parametrize("kind", ["thread", "process"])
def test_errors_and_counts_come_back_from_workers(root, kind):
    _bad_file(root, x=math.nan)
    raw = _config(root)
    raw.num_workers, raw.worker_type = 2, kind
    with pytest.raises(DataError, match=r"b.parquet: row group 0: row 2: column 'x'"):
        list(SplitInput(raw, "train").batches())
    raw.on_bad_rows = "skip"
    inp = SplitInput(raw, "train")
    ids = sorted(i for b, _ in inp.batches() for i in b.row_ids.tolist() if i >= 0)
    assert ids == [0, 1, 2, 3, 10, 11, 13]
    assert inp.metrics()["data/skipped_rows/nonfinite_dense"] == 1


def test_check_rows_reads_every_row_ahead_within_its_limit(root):
    _bad_file(root, y=2.0)
    with pytest.raises(DataError, match=r"b.parquet: row group 0: row 2: column 'y'"):
        SplitInput(_config(root), "train").check_rows()
    inp = SplitInput(_config(root, on_bad_rows="skip"), "train")
    counts = inp.check_rows(max_rows=8)  # the split has 8 rows
    assert counts.tolist() == [int(r == "label_not_binary") for r in REASONS]
    assert inp.check_rows(max_rows=7) is None  # over the limit: nothing read
    assert SplitInput(_config(root), "train").check_rows(max_rows=7) is None


def test_counts_are_summed_over_shards_and_ranks_file_counts_once(root):
    # b.parquet: row 2 bad; c.parquet: a column missing, so the whole file (4 rows) is left out.
    _bad_file(root, x=math.nan)
    _write(root / "train" / "c.parquet", {k: v for k, v in GOOD.items() if k != "x"})
    cfg = _config(root, on_bad_rows="skip")
    cfg.batch_size, cfg.num_shards = 2, 2  # a.parquet and b.parquet: one shard each
    for world in (1, 2):  # two shards on one rank, or one on each of two ranks
        ranks = [SplitInput(cfg, "train", r, world) for r in range(world)]
        ids = sorted(i for r in ranks for b, _ in r.batches() for i in b.row_ids.tolist())
        assert [i for i in ids if i >= 0] == [0, 1, 2, 3, 10, 11, 13]
        total: Counter = Counter()  # what metrics(group) sums over ranks
        for r in ranks:
            total.update(r.metrics())
        assert total["data/skipped_files/missing_column"] == 1
        assert total["data/skipped_rows/missing_column"] == 4  # from the footer, counted once
        assert total["data/skipped_rows/nonfinite_dense"] == 1
        assert total["data/padded_rows"] == 1  # replaces the bad row at the end of the epoch
