"""Checkpoints on gloo ranks: world 2 with ep 2 resumes exactly (saved in the background), and its
checkpoint loads at world 1 and at world 4 (dp 2 x ep 2) with the same eval metrics: tables and
experts both move."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from recsys_moe.trainer import Trainer
from tests.integration.test_checkpoint import STEPS, Crash, _config, assert_same_state, losses, run
from tests.tests_support import run_gloo_ranks


def _config_ep(data: str, ep: int, num_shards: int = 4, **checkpoint):
    cfg = _config(data, **checkpoint)
    cfg.data.num_shards = num_shards  # 4: data positions that fit 1, 2 and 4 ranks
    cfg.parallel.ep_size = ep
    return cfg


def _world2(rank: int, data: str, root: str) -> dict:
    from torch.distributed.distributed_c10d import _world

    groups = len(_world.pg_map)
    full = run(_config_ep(data, 2), Path(root) / "full")
    # the crashed and the resumed run save in the background (their writer's own group)
    try:
        run(_config_ep(data, 2, async_save=True), Path(root) / "resumed", crash_at=13)
    except Crash:
        pass
    resumed = run(_config_ep(data, 2, async_save=True), Path(root) / "resumed")
    # three trainers built and closed in this process: none left a group behind
    left = len(_world.pg_map) - groups
    return (
        {"full": full, "resumed": resumed, "groups_left": left}
        if rank == 0
        else {"groups_left": left}
    )


def _load(rank: int, data: str, run_dir: str, ep: int, num_shards: int = 4) -> dict:
    return run(_config_ep(data, ep, num_shards), Path(run_dir))["summary"]


def _evals(summary: dict) -> dict:
    return {
        k: v
        for k, v in summary.items()
        if k.startswith("eval/") and not k.startswith(("eval/moe/", "eval/ep/"))
    }


def test_world2_ep2_resumes_exactly_and_reshards_to_world1_and_world4(tiny_data, tmp_path):
    outs = run_gloo_ranks(_world2, 2, str(tiny_data), str(tmp_path))
    assert [o["groups_left"] for o in outs] == [0, 0]
    out = outs[0]
    got, want = losses(tmp_path / "resumed"), losses(tmp_path / "full")
    assert [s for s, _ in got] == list(range(1, STEPS + 1))
    assert got == want
    assert_same_state(out["resumed"]["state"], out["full"]["state"])

    # the world-2 ep-2 checkpoint as a single-device artifact: its predictions of the eval rows
    # (no label columns read) equal the trained model's outputs
    _export_and_predict(tiny_data, tmp_path, out["full"]["eval"])

    want_evals = _evals(out["full"]["summary"])
    assert len(want_evals) > 20
    for world, ep in ((1, 1), (4, 2)):
        run_dir = tmp_path / f"world{world}"
        shutil.copytree(tmp_path / "full", run_dir)
        if world == 1:  # data.num_shards left at 0 (auto) takes the checkpoint's 4
            summary = _load(0, str(tiny_data), str(run_dir), ep, 0)
        else:
            summary = run_gloo_ranks(_load, world, str(tiny_data), str(run_dir), ep)[0]
        assert summary["step"] == STEPS  # resumed at the end: evaluated, nothing trained
        for key, value in want_evals.items():
            assert summary[key] == pytest.approx(value, rel=1e-6, abs=1e-7), (world, key)


def test_a_data_position_that_does_not_fit_stops_or_restarts_the_epoch(tiny_data, tmp_path):
    """Saved with data.num_shards 4 (mid-epoch, step 10 of 31), resumed with 2 shards."""
    cfg = _config_ep(str(tiny_data), 1)
    cfg.trainer.max_steps = 10
    run(cfg, tmp_path / "saved")
    for policy in ("error", "restart_epoch"):
        run_dir = tmp_path / policy
        shutil.copytree(tmp_path / "saved", run_dir)
        cfg = _config_ep(str(tiny_data), 1, num_shards=2)
        cfg.checkpoint.data_on_reshard = policy
        if policy == "error":
            with pytest.raises(ValueError, match=r"data.num_shards = 4.*data.num_shards=4"):
                Trainer(cfg, run_dir)
            continue
        trainer = Trainer(cfg, run_dir)
        try:
            assert trainer.step == 10 and trainer.train_data.epoch == 0
            assert trainer.data_part.rows_reread == 10 * 96  # the epoch's first 10 batches
        finally:
            trainer.close()


def _export_and_predict(data: Path, tmp_path: Path, trained: dict[int, list[float]]) -> None:
    import pyarrow.parquet as pq

    from recsys_moe.inference import export_checkpoint, load_artifact, predict_parquet

    export_checkpoint(tmp_path / "full", tmp_path / "artifact")
    model, meta = load_artifact(tmp_path / "artifact")
    predict_parquet(model, meta, str(data / "eval"), tmp_path / "pred.parquet", progress=False)
    table = pq.read_table(tmp_path / "pred.parquet").to_pydict()
    assert sorted(table["row_id"]) == sorted(trained) and len(trained) == 1000
    for t, name in enumerate(meta.task_names):
        col = table[f"pred_{name}"]
        raw = torch.tensor([trained[r][t] for r in table["row_id"]])
        want = torch.sigmoid(raw) if meta.manifest["tasks"][t]["type"] == "binary" else raw
        torch.testing.assert_close(torch.tensor(col), want, rtol=1e-5, atol=1e-6, msg=name)
