"""Batch prediction on data without labels: the right columns, in input order, equal to the
trained model's outputs; bad input stops naming file and column, or is counted."""

from __future__ import annotations

import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from recsys_moe.config.schema import ExpertCompute, TrainConfig
from recsys_moe.data.files import DataError
from recsys_moe.data.write import write_table
from recsys_moe.inference import export_checkpoint, format_report, load_artifact, predict_parquet
from recsys_moe.modules.heads import predict
from tests.checkpoint_fixtures import batches, save_checkpoint, small_model, train_model
from tests.conftest import synthetic_data_config
from tests.unit.data.test_checksums import flip_last_page_byte

LABEL_COLUMNS = ["click", "like", "watch_time", "rating", "rating_observed"]
PREDICTIONS = ["pred_click", "pred_like", "pred_watch_time", "pred_rating"]


@pytest.fixture(scope="module")
def exported(tiny_data, tmp_path_factory):
    """(config, the trained RankerTrain, its artifact)."""
    cfg = TrainConfig(data=synthetic_data_config(tiny_data), model=small_model("topk"))
    source = train_model(cfg, 8)
    run = tmp_path_factory.mktemp("predict_run")
    save_checkpoint(source, cfg, run, 8)
    return cfg, source, export_checkpoint(run, run / "artifact")


@pytest.fixture(scope="module")
def unlabeled(tiny_data, tmp_path_factory):
    """The tiny eval split without its label and mask columns, in other row groups."""
    out = tmp_path_factory.mktemp("unlabeled")
    for f in sorted((tiny_data / "eval").glob("*.parquet")):
        write_table(pq.read_table(f).drop_columns(LABEL_COLUMNS), out / f.name, row_group_size=300)
    return out


def _expected(cfg, source, batch_size):
    """[rows, T] probabilities (binary tasks) and values of the source model on the labelled
    eval split, in batches of the same rows as the predict run's."""
    src = source.model
    src.moe.compute = ExpertCompute.dense
    with torch.no_grad():
        raw = torch.cat([src(b.dense, b.sparse).raw for b in batches(cfg, "eval", batch_size)])
    # the model's predictions as training's eval defines them (modules/heads.py)
    return torch.stack([predict(t.type, raw[:, i]) for i, t in enumerate(cfg.data.tasks)], 1)


def test_label_free_data_gets_one_column_per_task_in_input_order(exported, unlabeled, tmp_path):
    cfg, source, artifact = exported
    model, meta = load_artifact(artifact)
    report = predict_parquet(
        model, meta, str(unlabeled), tmp_path / "p.parquet", batch_size=256, progress=False
    )
    assert (report.rows_in, report.rows_out, report.files) == (1000, 1000, 2)
    assert not report.skipped_rows and not report.hashed_ids
    out = pq.read_table(tmp_path / "p.parquet")
    assert out.column_names == ["row_id", *PREDICTIONS]
    ids = [pq.read_table(f, columns=["row_id"]) for f in sorted(unlabeled.glob("*.parquet"))]
    assert out["row_id"].to_pylist() == pa.concat_tables(ids)["row_id"].to_pylist()
    got = np.stack([out[c].to_numpy() for c in PREDICTIONS], axis=1)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, _expected(cfg, source, 256).numpy())
    assert ((got[:, :2] > 0) & (got[:, :2] < 1)).all()  # binary tasks: probabilities
    meta_kv = out.schema.metadata
    assert meta_kv[b"recsys_moe.step"] == b"8"


def test_kept_columns_glob_input_and_page_checksums(exported, unlabeled, tmp_path):
    _, _, artifact = exported
    model, meta = load_artifact(artifact, expert_compute=ExpertCompute.sparse)
    out = tmp_path / "p.parquet"
    predict_parquet(
        model,
        meta,
        str(unlabeled / "part-0000[1].parquet"),
        out,
        keep=["device", "user_history"],
        row_id=False,
        progress=False,
    )
    table = pq.read_table(out)
    source = pq.read_table(unlabeled / "part-00001.parquet")
    assert table.column_names == ["device", "user_history", *PREDICTIONS]
    assert table["user_history"].equals(source["user_history"])  # as stored: list<int64>
    for j in range(pq.read_metadata(out).num_columns):  # through data/write.py: checksums
        copy = tmp_path / f"copy{j}.parquet"
        shutil.copy(out, copy)
        flip_last_page_byte(copy, 0, j)
        with pytest.raises(OSError, match="checksum"):
            pq.ParquetFile(copy, page_checksum_verification=True).read_row_group(0)


def test_a_missing_feature_column_names_the_file_and_column(exported, unlabeled, tmp_path):
    _, _, artifact = exported
    model, meta = load_artifact(artifact)
    data = tmp_path / "data"
    shutil.copytree(unlabeled, data)
    path = data / "part-00001.parquet"
    write_table(pq.read_table(path).drop_columns(["dense_3"]), path)
    with pytest.raises(
        DataError, match=f"{path}: column 'dense_3' \\(data.dense\\[3\\]\\) is missing"
    ):
        predict_parquet(model, meta, str(data), tmp_path / "p.parquet", progress=False)
    assert not (tmp_path / "p.parquet").exists() and not list(tmp_path.glob(".p.parquet*"))


def test_bad_ids_stop_the_run_or_are_left_out_and_counted(exported, unlabeled, tmp_path):
    _, _, artifact = exported
    model, meta = load_artifact(artifact)
    data = tmp_path / "data"
    shutil.copytree(unlabeled, data)
    path = data / "part-00001.parquet"
    table = pq.read_table(path)
    users = table["user_id"].to_numpy().copy()
    users[[5, 7]] = 10**6  # outside the user table (id_policy error)
    bad_ids = table["row_id"].to_numpy()[[5, 7]].tolist()
    table = table.set_column(table.schema.get_field_index("user_id"), "user_id", pa.array(users))
    write_table(table, path, row_group_size=300)
    with pytest.raises(DataError, match=f"{path}: row group 0: row 5: column 'user_id'"):
        predict_parquet(model, meta, str(data), tmp_path / "p.parquet", progress=False)
    report = predict_parquet(
        model, meta, str(data), tmp_path / "p.parquet", on_bad_rows="skip", progress=False
    )
    assert report.rows_out == 998 and report.skipped_rows == {"id_out_of_range": 2}
    assert "left out: 2 row(s) (id_out_of_range)" in format_report(report)
    ids = pq.read_table(tmp_path / "p.parquet")["row_id"].to_pylist()
    assert len(ids) == 998 and not set(bad_ids) & set(ids)
