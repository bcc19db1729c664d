"""Helpers shared by test modules (fixtures live in conftest.py)."""

from __future__ import annotations

import os
import time
from pathlib import Path

from recsys_moe.config.schema import DataConfig, GateConfig, GateType, ModelConfig, TrainConfig
from recsys_moe.data.loader import SplitInput
from recsys_moe.distributed.local_ranks import free_port, run_gloo_ranks
from tests.conftest import synthetic_data_config

__all__ = [
    "data_config",
    "dselect_k_from_start",
    "free_port",
    "gloo_threads",
    "global_batches",
    "ranks_of",
    "run_gloo_ranks",
    "small_model",
    "train_run",
]


def dselect_k_from_start() -> GateConfig:
    """DSelect-k with its entropy regulariser on from step 0, ramped over 10 steps: every term
    of its loss is exercised within a short test run."""
    return GateConfig(
        type=GateType.dselect_k,
        k=2,
        gamma=1.0,
        entropy_reg=0.3,
        entropy_start_step=0,
        entropy_warmup_steps=10,
    )


def gloo_threads(settle_s: float = 0.0) -> int:
    """The threads of this process's live gloo process groups (Linux: /proc): each group runs
    a tcp loop and two work threads until it is freed. settle_s: count again for up to that
    long while any is left (a thread just joined can linger in /proc for a moment)."""
    deadline = time.monotonic() + settle_s
    while True:
        names = []
        for t in os.listdir("/proc/self/task"):
            try:
                names.append(Path(f"/proc/self/task/{t}/comm").read_text())
            except OSError:  # the thread ended meanwhile
                pass
        count = sum(n.startswith(("gloo", "pt_gloo")) for n in names)
        if count == 0 or time.monotonic() >= deadline:
            return count
        time.sleep(0.05)


def small_model(m: ModelConfig) -> None:
    """A model of a few thousand parameters (4 experts) for multi-rank and checkpoint tests."""
    m.embedding_dim, m.bottom_mlp, m.num_experts = 8, [16], 4
    m.expert_hidden, m.expert_dim, m.tower = [16], 8, [8]


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
