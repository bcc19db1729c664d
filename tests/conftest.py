"""Shared fixtures: small synthetic data sets written once per session, and configs for them."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from recsys_moe.config.schema import DataConfig, TrainConfig
from recsys_moe.data.synthetic import SyntheticSpec, write

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"
MOVIELENS_100K = REPO.parent / "shared" / "data" / "ml-100k"

TINY_SPEC = dict(
    train_rows=3000,
    eval_rows=1000,
    train_files=3,
    eval_files=2,
    row_group_size=400,
    num_users=500,
    num_items=300,
    num_categories=20,
    num_tags=50,
    num_devices=4,
    seed=0,
)


def synthetic_data_config(path: Path, **overrides) -> DataConfig:
    """conf/data/synthetic.yaml with the table sizes of TINY_SPEC, pointed at `path`."""
    raw = OmegaConf.load(CONF / "data" / "synthetic.yaml")
    sizes = {
        "user_id": TINY_SPEC["num_users"],
        "item_id": TINY_SPEC["num_items"],
        "user_history": TINY_SPEC["num_items"],
        "item_category": TINY_SPEC["num_categories"],
        "device": TINY_SPEC["num_devices"],
        "item_tags": TINY_SPEC["num_tags"],
    }
    for f in raw.sparse:
        f.num_embeddings = sizes[f.name]
    cfg = OmegaConf.merge(OmegaConf.structured(DataConfig), raw, {"path": str(path)}, overrides)
    return OmegaConf.to_object(cfg)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """A small synthetic data set (3000 train rows in 3 files, 1000 eval rows)."""
    out = tmp_path_factory.mktemp("tiny_synthetic")
    write(SyntheticSpec(**TINY_SPEC), out)
    return out


@pytest.fixture
def tiny_data_config(tiny_data) -> DataConfig:
    return synthetic_data_config(tiny_data)


@pytest.fixture
def tiny_train_config(tiny_data) -> TrainConfig:
    """The default TrainConfig on the tiny data, small and quiet."""
    cfg = TrainConfig(data=synthetic_data_config(tiny_data, batch_size=128, eval_batch_size=500))
    cfg.trainer.epochs = 1
    cfg.trainer.eval_every = 0
    cfg.trainer.log_every = 5
    cfg.trainer.device = "cpu"
    cfg.logger.console = False
    cfg.logger.progress_bar = False
    return cfg


@pytest.fixture
def movielens_100k() -> Path:
    if not (MOVIELENS_100K / "u.data").exists():
        pytest.skip(
            f"MovieLens-100K not found at {MOVIELENS_100K} (research licence: not in the repo)"
        )
    return MOVIELENS_100K


def pytest_configure(config):
    # Tests run on CPU and offline whatever the machine has.
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_SILENT", "true")
