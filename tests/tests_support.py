"""Helpers shared by test modules (fixtures live in conftest.py)."""

from __future__ import annotations

from pathlib import Path

from recsys_moe.config.schema import DataConfig, TrainConfig
from recsys_moe.distributed.local_ranks import free_port, run_gloo_ranks
from tests.conftest import synthetic_data_config

__all__ = ["data_config", "free_port", "run_gloo_ranks", "train_run"]


def data_config(path: Path, **overrides) -> DataConfig:
    """The tiny synthetic data's config with the row id carried into batches."""
    return synthetic_data_config(path, **{"row_id": "row_id", **overrides})


def train_run(cfg: TrainConfig, run_dir: Path) -> dict[str, float]:
    """Trains cfg to the end in run_dir and returns the summary; the trainer is always closed."""
    from recsys_moe.trainer import Trainer

    trainer = Trainer(cfg, run_dir)
    try:
        return trainer.train()
    finally:
        trainer.close()
