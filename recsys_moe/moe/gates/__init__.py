"""Gates: one per task, each mapping the MoE input to expert weights (see base.Gate)."""

from __future__ import annotations

from dataclasses import fields
from typing import Any

from recsys_moe.config.schema import GateConfig, GateType
from recsys_moe.moe.gates.base import Gate, GateOutput
from recsys_moe.moe.gates.dselect_k import DSelectKGate
from recsys_moe.moe.gates.softmax import SoftmaxGate
from recsys_moe.moe.gates.topk import TopKGate

__all__ = [
    "GATE_KEYS",
    "DSelectKGate",
    "Gate",
    "GateOutput",
    "SoftmaxGate",
    "TopKGate",
    "build_gate",
    "gate_options",
]

_GATES: dict[GateType, type[Gate]] = {
    GateType.softmax: SoftmaxGate,
    GateType.topk: TopKGate,
    GateType.dselect_k: DSelectKGate,
}
# The model.gate keys each gate uses besides type and per_example (constructor arguments of the
# same names). Every other key must stay unset (null): a key a gate would ignore is an error.
GATE_KEYS: dict[GateType, tuple[str, ...]] = {
    GateType.softmax: (),
    GateType.topk: ("k", "noise"),
    GateType.dselect_k: (
        "k",
        "gamma",
        "entropy_reg",
        "entropy_start_fraction",
        "entropy_warmup_fraction",
        "entropy_start_step",
        "entropy_warmup_steps",
        "kernel",
        "hard_inference",
    ),
}
_COMMON = ("type", "per_example")


def gate_options(cfg: GateConfig) -> dict[str, Any]:
    """The keys of `cfg` that its gate uses and that are set (unset ones take the gate's own
    default). A key that is set but that the gate does not use raises, naming key and gate."""
    used = GATE_KEYS[cfg.type]
    for key in (f.name for f in fields(cfg) if f.name not in _COMMON):
        value = getattr(cfg, key)
        if value is not None and key not in used:
            users = [t.value for t, keys in GATE_KEYS.items() if key in keys]
            raise ValueError(
                f"model.gate.{key} ({value}) is not used by the {cfg.type.value} gate "
                f"(model.gate.type={cfg.type.value}): unset it (model.gate.{key}=null), or pick a "
                "gate that uses it "
                f"({', '.join(f'model/gate={u}' for u in users) or 'none does'})"
            )
    return {key: getattr(cfg, key) for key in used if getattr(cfg, key) is not None}


def build_gate(cfg: GateConfig, num_experts: int, in_dim: int) -> Gate:
    """The gate `cfg.type` names (model.gate.type), for one task."""
    if num_experts < 1:
        raise ValueError(f"model.num_experts ({num_experts}) must be >= 1")
    if cfg.type not in _GATES:
        raise ValueError(f"model.gate.type ({cfg.type}) is not a known gate")
    options = gate_options(cfg)
    return _GATES[cfg.type](num_experts, in_dim, per_example=cfg.per_example, **options)
