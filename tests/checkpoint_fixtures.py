"""Training checkpoints in the trainer's format, made on one CPU process for export tests.

A checkpoint directory holds torch.distributed.checkpoint files of {"model": the unwrapped
RankerTrain's state_dict()} (keys "model.model.<ranker key>", global shapes), config.yaml (the
run's resolved config) and meta.json ({"step": ...}); a run directory names its latest
checkpoint in checkpoints/latest.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Optional

import torch
import torch.distributed.checkpoint as dcp
from omegaconf import OmegaConf

from recsys_moe.checkpoint.manager import write_meta
from recsys_moe.config.schema import (
    ExpertCompute,
    GateConfig,
    GateType,
    ModelConfig,
    TrainConfig,
)
from recsys_moe.data.batch import Batch
from recsys_moe.data.files import locate_split, scan_split
from recsys_moe.data.ordered import OrderedReader
from recsys_moe.models.ranker import MultiTaskRanker
from recsys_moe.models.training import RankerTrain

GATES = {
    "dselect_k": GateConfig(type=GateType.dselect_k, k=2, gamma=0.5, entropy_reg=0.1),
    "topk": GateConfig(type=GateType.topk, k=2, noise=False),
}


def small_model(gate: str = "dselect_k") -> ModelConfig:
    return ModelConfig(
        embedding_dim=8,
        bottom_mlp=[16],
        num_experts=6,  # not a power of two: DSelect-k's reachability term is on
        expert_hidden=[32],
        expert_dim=16,
        tower=[16],
        gate=GATES[gate],
    )


def batches(cfg: TrainConfig, split: str, batch_size: int) -> list[Batch]:
    fs, files = locate_split(cfg.data.path, getattr(cfg.data, split), f"data.{split}")
    units = scan_split(fs, files, cfg.data).units
    return [b for b, _ in OrderedReader(cfg.data, fs, units, batch_size)]


def train_model(cfg: TrainConfig, steps: int, seed: int = 0) -> RankerTrain:
    """RankerTrain trained `steps` Adam steps on the train split (tables too), on CPU."""
    torch.manual_seed(seed)
    model = RankerTrain(MultiTaskRanker(cfg.data, cfg.model), cfg.model.loss_weights)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for step, batch in enumerate(batches(cfg, "train", 128)[:steps]):
        model.model.set_train_progress(step, steps)
        loss, _ = model(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def save_checkpoint(
    model: RankerTrain,
    cfg: TrainConfig,
    run_dir: Path,
    step: int,
    drop: Optional[str] = None,
) -> Path:
    """run_dir/checkpoints/step_<step> in the trainer's format, named by checkpoints/latest;
    `drop` leaves that DCP key out (a damaged or foreign checkpoint)."""
    ckpt = run_dir / "checkpoints" / f"step_{step}"
    ckpt.mkdir(parents=True)
    weights = model.state_dict()
    if drop is not None:
        del weights[drop.removeprefix("model.")]
    # other top-level keys (optimizers, trainer, data, rng) are there too, and not exported
    state = {"model": weights, "trainer": {"step": torch.tensor(step)}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "assuming ... a single process"
        dcp.save(state, checkpoint_id=str(ckpt), no_dist=True)
    OmegaConf.save(OmegaConf.structured(cfg), ckpt / "config.yaml")
    write_meta(ckpt, step, {})
    (run_dir / "checkpoints" / "latest").write_text(ckpt.name + "\n")
    return ckpt


def with_compute(model: MultiTaskRanker, compute: ExpertCompute) -> MultiTaskRanker:
    """The same module computing its experts as `compute` says (the source model of a test)."""
    model.moe.compute = ExpertCompute(compute)
    return model
