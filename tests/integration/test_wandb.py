"""W&B: the same keys as metrics.jsonl, offline by default, and never a reason to stop training."""

from __future__ import annotations

import json
import time

from recsys_moe.config.schema import WandbConfig
from recsys_moe.metrics.sinks import WandbSink
from recsys_moe.trainer import Trainer


def test_wandb_offline_run_logs_the_metrics(tiny_train_config, tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)  # the default must be offline by itself
    cfg = tiny_train_config
    cfg.logger.wandb.enabled = True
    cfg.trainer.max_steps = 6
    trainer = Trainer(cfg, tmp_path, config_dict={"trainer": {"max_steps": 6}})
    try:
        summary = trainer.train()
        assert trainer.sinks[1].mode == "offline"
    finally:
        trainer.close()
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    log_file = runs[0] / f"run-{runs[0].name.rsplit('-', 1)[1]}.wandb"
    keys = [k.encode() for k in ("train/loss", "eval/click/auc", "eval/gate_heatmap")]
    # wandb-core (a separate process) can still be flushing the transaction log when finish()
    # returns (seen about once in 20 runs here): wait for it, up to 30 s
    deadline = time.monotonic() + 30.0
    while not all(k in log_file.read_bytes() for k in keys) and time.monotonic() < deadline:
        time.sleep(0.2)
    history = log_file.read_bytes()
    for key in keys:
        assert key in history
    assert (
        json.loads((tmp_path / "summary.json").read_text())["eval/click/auc"]
        == summary["eval/click/auc"]
    )


def test_online_without_credentials_falls_back_to_offline(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "cfg"))  # no stored login
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    sink = WandbSink(WandbConfig(enabled=True, mode="online"), tmp_path, {"a": 1})
    try:
        assert sink.mode == "offline"
        sink.log({"train/loss": 1.0}, 1)
    finally:
        sink.close()
