"""python -m recsys_moe.export and python -m recsys_moe.predict as a user runs them: a run
directory in, an artifact, then predictions for label-free data; exit code 1 naming the problem."""

from __future__ import annotations

import json
import subprocess
import sys

import pyarrow.parquet as pq
import pytest

from recsys_moe import export as export_cli
from recsys_moe import predict as predict_cli
from recsys_moe.config.schema import TrainConfig
from recsys_moe.data.write import write_table
from recsys_moe.inference import load_artifact, predict_parquet
from tests.checkpoint_fixtures import save_checkpoint, small_model, train_model
from tests.conftest import REPO, synthetic_data_config


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=600
    )


@pytest.fixture(scope="module")
def run_dir(tiny_data, tmp_path_factory):
    cfg = TrainConfig(data=synthetic_data_config(tiny_data), model=small_model("dselect_k"))
    run = tmp_path_factory.mktemp("cli_run")
    save_checkpoint(train_model(cfg, 4), cfg, run, 4)
    return run


def test_export_then_predict_round_trip(run_dir, tiny_data, tmp_path):
    artifact = tmp_path / "artifact"
    r = _run("-m", "recsys_moe.export", str(run_dir), str(artifact))
    assert r.returncode == 0, r.stderr[-3000:]
    manifest = json.loads((artifact / "manifest.json").read_text())
    assert manifest["source"] == str(run_dir / "checkpoints" / "step_4")  # checkpoints/latest

    data = tmp_path / "unlabeled"
    data.mkdir()
    for f in sorted((tiny_data / "eval").glob("*.parquet")):
        table = pq.read_table(f).drop_columns(["click", "like", "watch_time", "rating"])
        write_table(table.drop_columns(["rating_observed"]), data / f.name)
    out = tmp_path / "preds.parquet"
    r = _run(
        "-m", "recsys_moe.predict", str(artifact), str(data), str(out),
        "--keep", "item_id", "--batch-size", "300", "--expert-compute", "sparse",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"wrote 1000 rows to {out}" in r.stdout
    assert "predict: 100%" in r.stderr  # the progress bar
    got = pq.read_table(out)
    assert got.column_names == [
        "row_id", "item_id", "pred_click", "pred_like", "pred_watch_time", "pred_rating",
    ]  # fmt: skip
    model, meta = load_artifact(artifact, expert_compute="sparse")
    predict_parquet(
        model, meta, str(data), tmp_path / "in_process.parquet",
        batch_size=300, keep=["item_id"], progress=False,
    )  # fmt: skip
    assert got.equals(pq.read_table(tmp_path / "in_process.parquet"))


def test_clis_exit_1_naming_the_problem(run_dir, tiny_data, tmp_path, capsys):
    (run_dir / "checkpoints" / "latest").write_text("step_9\n")
    try:
        assert export_cli.main([str(run_dir), str(tmp_path / "a")]) == 1
    finally:
        (run_dir / "checkpoints" / "latest").write_text("step_4\n")
    assert "names 'step_9', which is not a complete checkpoint" in capsys.readouterr().err

    assert export_cli.main([str(run_dir), str(tmp_path / "a")]) == 0
    eval_file = sorted((tiny_data / "eval").glob("*.parquet"))[0]
    bad = tmp_path / "bad.parquet"
    write_table(pq.read_table(eval_file).drop_columns(["item_tags"]), bad)
    code = predict_cli.main([str(tmp_path / "a"), str(bad), str(tmp_path / "p.parquet")])
    assert code == 1
    assert f"{bad}: column 'item_tags' (data.sparse[5] (item_tags)) is missing" in (
        capsys.readouterr().err
    )
    assert not (tmp_path / "p.parquet").exists()
