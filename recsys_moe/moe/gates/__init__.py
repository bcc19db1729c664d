"""Gates: one per task, each mapping the MoE input to expert weights (see base.Gate)."""

from __future__ import annotations

from recsys_moe.config.schema import GateConfig, GateType
from recsys_moe.moe.gates.base import Gate, GateOutput
from recsys_moe.moe.gates.softmax import SoftmaxGate

__all__ = ["Gate", "GateOutput", "SoftmaxGate", "build_gate"]


def build_gate(cfg: GateConfig, num_experts: int, in_dim: int) -> Gate:
    """The gate `cfg.type` names (model.gate.type)."""
    if cfg.type == GateType.softmax:
        return SoftmaxGate(num_experts, in_dim, per_example=cfg.per_example)
    raise ValueError(f"model.gate.type ({cfg.type}) is not a known gate")
