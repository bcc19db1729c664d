"""Short end-to-end runs of the real trainer on tiny synthetic data."""

from __future__ import annotations

import json

from tests.tests_support import train_run


def test_short_run_writes_outputs_and_loss_falls(tiny_train_config, tmp_path):
    cfg = tiny_train_config
    cfg.trainer.epochs = 3
    summary = train_run(cfg, tmp_path)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    losses = [r["train/loss"] for r in records if "train/loss" in r]
    assert len(losses) >= 4
    assert sum(losses[-2:]) / 2 < sum(losses[:2]) / 2, losses
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk["eval/click/auc"] == summary["eval/click/auc"]
    for task in ("click", "like"):
        assert 0.0 <= summary[f"eval/{task}/auc"] <= 1.0
    for task in ("watch_time", "rating"):
        assert summary[f"eval/{task}/rmse"] > 0
        assert f"eval/{task}/rmse_baseline" in summary
    assert summary["train/samples_per_sec"] > 0
