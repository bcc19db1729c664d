"""The README's promise: the default job on the default synthetic data reaches the quality bar
(binary AUC >= 0.70, regression RMSE below the mean baseline). About half a minute on 2 cores."""

from __future__ import annotations

from hydra import compose, initialize_config_dir

from recsys_moe.config.store import register, to_typed
from recsys_moe.data.synthetic import SyntheticSpec, write
from recsys_moe.trainer import Trainer
from tests.conftest import CONF


def test_default_config_on_default_data_meets_the_bar(tmp_path):
    write(SyntheticSpec(), tmp_path / "data")
    register()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = to_typed(
            compose("train", overrides=[f"data.path={tmp_path / 'data'}", "logger=none"])
        )
    trainer = Trainer(cfg, tmp_path / "run")
    try:
        summary = trainer.train()
    finally:
        trainer.close()
    for task in cfg.data.tasks:
        if task.type.value == "binary":
            assert summary[f"eval/{task.name}/auc"] >= 0.70, summary
        else:
            assert summary[f"eval/{task.name}/rmse"] < summary[f"eval/{task.name}/rmse_baseline"], (
                summary
            )
