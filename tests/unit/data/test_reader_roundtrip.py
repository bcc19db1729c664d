"""What is written to Parquet is what the reader returns, multi-valued ids included."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from recsys_moe.config.schema import DataConfig, SparseFeature, TaskSpec, TaskType
from recsys_moe.data.files import check_columns, resolve_split
from recsys_moe.data.parquet import BatchBuilder, ParquetBatchReader, list_row_groups


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
    files = resolve_split(cfg.path, cfg.train, "data.train")
    check_columns(files, cfg)
    units = list_row_groups(files)
    assert sum(u.num_rows for u in units) == table.num_rows == 23
    assert len(units) == 2 + 3 + 2  # row groups of 4 rows
    batches = list(ParquetBatchReader(units, BatchBuilder(cfg), batch_size))
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


def test_drop_last_and_len(tmp_path):
    cfg, _ = _write(tmp_path)
    units = list_row_groups(resolve_split(cfg.path, cfg.train, "data.train"))
    reader = ParquetBatchReader(units, BatchBuilder(cfg), 5, drop_last=True)
    assert len(reader) == 4 and len(list(reader)) == 4
    reader = ParquetBatchReader(units, BatchBuilder(cfg), 5)
    assert len(reader) == 5 and sum(b.batch_size for b in reader) == 23
