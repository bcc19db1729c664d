"""Helpers shared by test modules (fixtures live in conftest.py)."""

from __future__ import annotations

from pathlib import Path

from recsys_moe.config.schema import DataConfig, TrainConfig
from recsys_moe.data.loader import SplitInput
from recsys_moe.distributed.local_ranks import free_port, run_gloo_ranks
from tests.conftest import synthetic_data_config

__all__ = [
    "data_config",
    "free_port",
    "global_batches",
    "ranks_of",
    "run_gloo_ranks",
    "train_run",
]


def data_config(path: Path, **overrides) -> DataConfig:
    """The tiny synthetic data's config with the row id carried into batches."""
    return synthetic_data_config(path, **{"row_id": "row_id", **overrides})


def ranks_of(cfg: DataConfig, world: int, split: str = "train") -> list[SplitInput]:
    """The loaders of every rank of a simulated `world`-rank run (no process group)."""
    return [SplitInput(cfg, split, r, world) for r in range(world)]


def global_batches(ranks: list[SplitInput], epochs: int = 1) -> list[list[int]]:
    """Row ids of every global batch (the ranks' batches in rank order) of the next epochs."""
    out = []
    for _ in range(epochs):
        per_rank = [[b.row_ids.tolist() for b, _ in r.batches()] for r in ranks]
        assert len({len(p) for p in per_rank}) == 1  # every rank runs the same steps
        out += [[i for p in per_rank for i in p[s]] for s in range(len(per_rank[0]))]
    return out


def train_run(cfg: TrainConfig, run_dir: Path) -> dict[str, float]:
    """Trains cfg to the end in run_dir and returns the summary; the trainer is always closed."""
    from recsys_moe.trainer import Trainer

    trainer = Trainer(cfg, run_dir)
    try:
        return trainer.train()
    finally:
        trainer.close()
