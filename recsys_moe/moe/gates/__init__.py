"""Gates: one per task, each mapping the MoE input to expert weights (see base.Gate)."""

from __future__ import annotations

from recsys_moe.config.schema import GateConfig, GateType
from recsys_moe.moe.gates.base import Gate, GateOutput
from recsys_moe.moe.gates.dselect_k import DSelectKGate
from recsys_moe.moe.gates.softmax import SoftmaxGate
from recsys_moe.moe.gates.topk import TopKGate

__all__ = ["DSelectKGate", "Gate", "GateOutput", "SoftmaxGate", "TopKGate", "build_gate"]


def build_gate(cfg: GateConfig, num_experts: int, in_dim: int) -> Gate:
    """The gate `cfg.type` names (model.gate.type), for one task."""
    if num_experts < 1:
        raise ValueError(f"model.num_experts ({num_experts}) must be >= 1")
    if cfg.type == GateType.softmax:
        return SoftmaxGate(num_experts, in_dim, per_example=cfg.per_example)
    if cfg.type == GateType.topk:
        return TopKGate(num_experts, in_dim, k=cfg.k, per_example=cfg.per_example, noise=cfg.noise)
    if cfg.type == GateType.dselect_k:
        return DSelectKGate(
            num_experts,
            in_dim,
            k=cfg.k,
            gamma=cfg.gamma,
            per_example=cfg.per_example,
            entropy_reg=cfg.entropy_reg,
            entropy_start_step=cfg.entropy_start_step,
            entropy_warmup_steps=cfg.entropy_warmup_steps,
            entropy_start_fraction=cfg.entropy_start_fraction,
            entropy_warmup_fraction=cfg.entropy_warmup_fraction,
        )
    raise ValueError(f"model.gate.type ({cfg.type}) is not a known gate")
