"""Helpers shared by test modules (fixtures live in conftest.py)."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch.distributed as dist
import torch.multiprocessing as mp

from recsys_moe.config.schema import DataConfig, TrainConfig
from recsys_moe.data.loader import SplitInput
from tests.conftest import synthetic_data_config


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


def run_gloo_ranks(fn: Callable[..., Any], world: int, *args: Any) -> list[Any]:
    """Runs fn(rank, *args) in `world` spawned processes joined in one gloo process group;
    returns what each rank's call returned, by rank. fn must be a module-level function."""
    out = mp.Manager().dict()
    mp.spawn(_gloo_rank, args=(world, _free_port(), fn, args, out), nprocs=world, join=True)
    return [out[rank] for rank in range(world)]


def _gloo_rank(rank: int, world: int, port: int, fn, args: tuple, out) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        out[rank] = fn(rank, *args)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
