"""What is written to Parquet is what the in-order reader returns, multi-valued ids included;
read without labels, label columns need not exist; carried columns stay with their rows."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from recsys_moe.config.schema import BadRows, DataConfig, SparseFeature, TaskSpec, TaskType
from recsys_moe.data.files import DataError, locate_split, scan_split
from recsys_moe.data.ordered import OrderedReader


def _write(tmp_path, n_files=3, rows=(7, 11, 5), row_group_size=4, seed=0):
    rng = np.random.default_rng(seed)
    expected = []
    for i, n in zip(range(n_files), rows):
        lengths = rng.integers(0, 4, size=n)  # empty lists included
        values = [rng.integers(0, 100, size=k).tolist() for k in lengths]
        table = pa.table(
            {
                "d0": pa.array(rng.normal(size=n).astype(np.float32)),
                "d1": pa.array(rng.integers(-5, 5, size=n)),  # integer dense column
                "uid": pa.array(rng.integers(0, 50, size=n)),
                "hist": pa.array(values, type=pa.list_(pa.int64())),
                "y": pa.array(rng.random(n) < 0.5),  # bool label
                "r": pa.array(rng.normal(size=n)),  # float64 label
                "r_ok": pa.array(rng.random(n) < 0.7),
                "w": pa.array(rng.uniform(0.5, 2, size=n).astype(np.float32)),
                "seq": pa.array(np.arange(n, dtype=np.int32) + 100 * i),  # not in the config
            }
        )
        pq.write_table(table, tmp_path / f"part-{i}.parquet", row_group_size=row_group_size)
        expected.append(table)
    cfg = DataConfig(
        path=str(tmp_path),
        train=".",
        dense=["d0", "d1"],
        sparse=[
            SparseFeature(name="user", column="uid", num_embeddings=50),
            SparseFeature(name="hist", num_embeddings=100),
        ],
        tasks=[
            TaskSpec(name="click", type=TaskType.binary, label="y"),
            TaskSpec(name="rating", type=TaskType.regression, label="r", mask="r_ok", weight="w"),
        ],
    )
    return cfg, pa.concat_tables(expected)


@pytest.mark.parametrize("batch_size", [1, 3, 4, 6, 100])
def test_roundtrip_across_row_groups_and_files(tmp_path, batch_size):
    cfg, table = _write(tmp_path)
    fs, files = locate_split(cfg.path, cfg.train, "data.train")
    units = scan_split(fs, files, cfg).units
    assert sum(u.num_rows for u in units) == table.num_rows == 23
    assert len(units) == 2 + 3 + 2  # row groups of 4 rows
    batches = [b for b, _ in OrderedReader(cfg, fs, units, batch_size)]
    assert [b.batch_size for b in batches[:-1]] == [batch_size] * (len(batches) - 1)

    dense = torch.cat([b.dense for b in batches])
    assert dense.dtype == torch.float32
    np.testing.assert_array_equal(dense[:, 0].numpy(), table["d0"].to_numpy())
    np.testing.assert_array_equal(dense[:, 1].numpy(), table["d1"].to_numpy().astype(np.float32))

    user = torch.cat([b.sparse["user"].values() for b in batches])
    np.testing.assert_array_equal(user.numpy(), table["uid"].to_numpy())
    hist_lengths = torch.cat([b.sparse["hist"].lengths() for b in batches])
    hist_values = torch.cat([b.sparse["hist"].values() for b in batches])
    expected_lists = table["hist"].to_pylist()
    assert hist_lengths.tolist() == [len(x) for x in expected_lists]
    assert hist_values.tolist() == [v for x in expected_lists for v in x]
    assert all(b.sparse.values().dtype == torch.int64 for b in batches)

    labels = torch.cat([b.labels for b in batches])
    np.testing.assert_array_equal(
        labels[:, 0].numpy(), table["y"].to_numpy(zero_copy_only=False).astype(np.float32)
    )
    np.testing.assert_allclose(labels[:, 1].numpy(), table["r"].to_numpy().astype(np.float32))
    masks = torch.cat([b.masks for b in batches])
    assert masks[:, 0].all()
    np.testing.assert_array_equal(masks[:, 1].numpy(), table["r_ok"].to_numpy(zero_copy_only=False))
    weights = torch.cat([b.weights for b in batches])
    assert (weights[:, 0] == 1).all()
    np.testing.assert_array_equal(weights[:, 1].numpy(), table["w"].to_numpy())


def _units(cfg):
    fs, files = locate_split(cfg.path, cfg.train, "data.train")
    return fs, scan_split(fs, files, cfg).units


def test_drop_last_and_len(tmp_path):
    cfg, _ = _write(tmp_path)
    fs, units = _units(cfg)
    reader = OrderedReader(cfg, fs, units, 5, drop_last=True)
    assert len(reader) == 4 and len(list(reader)) == 4
    reader = OrderedReader(cfg, fs, units, 5)
    assert len(reader) == 5 and sum(b.batch_size for b, _ in reader) == 23


def test_without_labels_label_columns_need_not_exist(tmp_path):
    cfg, table = _write(tmp_path)
    fs, files = locate_split(cfg.path, cfg.train, "data.train")
    for path in files:  # the same files without label, mask and weight columns
        pq.write_table(pq.read_table(path).drop_columns(["y", "r", "r_ok", "w"]), path)
    with pytest.raises(DataError, match=r"part-0.parquet: column 'y' \(data.tasks\[0\] \(click\)"):
        scan_split(fs, files, cfg)
    features = DataConfig(**{**cfg.__dict__, "tasks": []})
    units = scan_split(fs, files, features).units
    batches = [b for b, _ in OrderedReader(cfg, fs, units, 6, labels=False)]
    assert all(b.labels.shape == (b.batch_size, 0) and b.masks is None for b in batches)
    assert all(b.weights is None for b in batches)
    dense = torch.cat([b.dense for b in batches])
    np.testing.assert_array_equal(dense[:, 0].numpy(), table["d0"].to_numpy())


def test_carried_columns_stay_with_their_rows_when_bad_rows_are_left_out(tmp_path):
    cfg, table = _write(tmp_path)
    fs, files = locate_split(cfg.path, cfg.train, "data.train")
    for i, row in ((1, 2), (2, 0)):  # a user id out of range in two files
        t = pq.read_table(files[i])
        uid = t["uid"].to_numpy().copy()
        uid[row] = 50
        t = t.set_column(t.schema.get_field_index("uid"), "uid", pa.array(uid))
        pq.write_table(t, files[i], row_group_size=4)
    units = scan_split(fs, files, cfg).units
    with pytest.raises(DataError, match=r"part-1.parquet: row group 0: row 2: column 'uid'"):
        list(OrderedReader(cfg, fs, units, 5, carry=["seq"]))
    skip = DataConfig(**{**cfg.__dict__, "on_bad_rows": BadRows.skip})
    reader = OrderedReader(skip, fs, units, 5, carry=["seq", "uid"])
    seq = []
    for batch, carried in reader:
        assert carried.num_rows == batch.batch_size
        seq += carried["seq"].to_pylist()
        # the carried id is the decoded id of the same row
        assert batch.sparse["user"].values().tolist() == carried["uid"].to_pylist()
    expected = table["seq"].to_pylist()
    expected.remove(100 + 2)
    expected.remove(200 + 0)
    assert seq == expected
    assert reader.skipped == {"id_out_of_range": 2}


def test_a_missing_carried_column_names_the_file(tmp_path):
    cfg, _ = _write(tmp_path)
    fs, units = _units(cfg)
    with pytest.raises(
        DataError, match=r"part-0.parquet: column 'request' \(a carried column\) is missing"
    ):
        OrderedReader(cfg, fs, units, 5, carry=["request"])
