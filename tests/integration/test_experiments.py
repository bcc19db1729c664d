"""Every experiment (conf/experiment/) and sweep (conf/sweep/) composes, and every experiment
trains a few steps on a tiny version of its data."""

from __future__ import annotations

import pytest
from hydra import compose, initialize_config_dir

from recsys_moe.config.store import register, to_typed
from recsys_moe.data.movielens import convert
from recsys_moe.data.paper_synthetic import PaperSyntheticSpec, write
from tests.conftest import CONF
from tests.movielens_fixtures import write_100k
from tests.tests_support import train_run

EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))
SWEEPS = sorted(p.stem for p in (CONF / "sweep").glob("*.yaml"))


def _compose(*overrides: str, hydra: bool = False):
    register()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("train", overrides=list(overrides), return_hydra_config=hydra)


def _tiny_data(name: str, tmp_path):
    if name == "paper_synthetic":
        spec = PaperSyntheticSpec(
            num_tasks=8, num_clusters=2, train_rows=600, validation_rows=200, test_rows=200
        )
        write(spec, tmp_path / "data")
    elif name == "movielens_paper":
        convert(
            write_100k(tmp_path / "src"), tmp_path / "data", val_fraction=0.25, test_fraction=0.25
        )
    else:
        pytest.fail(f"conf/experiment/{name}.yaml has no tiny data in this test: add it")
    return tmp_path / "data"


def test_every_experiment_is_tested():
    assert EXPERIMENTS == ["movielens_paper", "paper_synthetic"]


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_composes_and_trains_a_few_steps(name, tmp_path):
    data = _tiny_data(name, tmp_path)
    cfg = to_typed(
        _compose(
            f"experiment={name}",
            f"data.path={data}",
            "data.batch_size=4" if name == "movielens_paper" else "data.batch_size=64",
            "trainer.max_steps=3",
            "trainer.eval_every=2",
            "trainer.log_every=1",
            "trainer.device=cpu",
            "logger=none",
        )
    )
    summary = train_run(cfg, tmp_path / "run")
    assert summary["step"] == 3
    names = [t.name for t in cfg.data.tasks]
    assert all(f"eval/gate/{t}/active_experts" in summary for t in names)
    assert cfg.model.num_experts == 16 and cfg.model.gate.type.value == "dselect_k"
    if name == "paper_synthetic":
        # the task list comes from the generated data set: 8 regression tasks in 2 clusters
        assert len(names) == 8 and {t.cluster for t in cfg.data.tasks} == {"c00", "c01"}
        assert cfg.model.gate.per_example is False
    else:
        assert names == ["watch", "rating"] and [f.name for f in cfg.data.sparse] == [
            "user_id",
            "movie_id",
        ]
        assert cfg.model.embedding_dim == 128 and cfg.data.batch_size == 4


def test_from_dataset_names_the_missing_file(tmp_path):
    with pytest.raises(Exception, match=r"data.path \(.*nowhere\): no dataset.json"):
        to_typed(_compose("experiment=paper_synthetic", f"data.path={tmp_path}/nowhere"))


@pytest.mark.parametrize("name", SWEEPS)
def test_sweep_composes_with_its_launcher_and_summary(name):
    cfg = _compose(f"sweep={name}", hydra=True)
    assert cfg.hydra.launcher._target_.endswith("JoblibLauncher")
    assert cfg.hydra.launcher.n_jobs == 2
    assert "trainer.seed" in cfg.hydra.sweeper.params
    assert cfg.hydra.callbacks.sweep_summary._target_.endswith("SweepSummary")
