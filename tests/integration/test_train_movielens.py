"""`data=movielens` composes from conf/ and trains a few steps on a converted tiny fixture."""

from __future__ import annotations

import json

from hydra import compose, initialize_config_dir

from recsys_moe.config.store import register, to_typed
from recsys_moe.data.movielens import convert
from tests.conftest import CONF
from tests.movielens_fixtures import write_100k
from tests.tests_support import train_run


def test_train_a_few_steps_on_movielens(tmp_path):
    data = tmp_path / "ml"
    convert(write_100k(tmp_path / "src"), data, val_fraction=0.25, test_fraction=0.25)
    register()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(
            "train",
            overrides=[
                "data=movielens",
                f"data.path={data}",
                "data.batch_size=2",
                "data.eval_batch_size=2",
                "trainer.epochs=2",
                "trainer.log_every=1",
                "trainer.device=cpu",
                "logger.progress_bar=false",
                "logger.console=false",
            ],
        )
    typed = to_typed(cfg)
    summary = train_run(typed, tmp_path / "run")
    assert summary["step"] == 6  # 6 train rows / batch 2 x 2 epochs
    assert 0.0 <= summary["eval/watch/auc"] <= 1.0
    assert summary["eval/rating/rmse"] > 0 and "eval/rating/rmse_baseline" in summary
    assert summary["eval/rating/rows"] == 2  # validation rows whose rating exists
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["step"] == 6
