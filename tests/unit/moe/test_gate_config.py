"""model.gate keys reach the gate that uses them and are rejected, naming key and gate, by a gate
that does not; every gate works with a single expert (DSelect-k's is then the trivial gate)."""

from __future__ import annotations

import inspect
from dataclasses import fields

import pytest
import torch

from recsys_moe.config.schema import ExpertCompute, GateConfig, GateType
from recsys_moe.moe.experts import ExpertBank
from recsys_moe.moe.gates import GATE_KEYS, build_gate
from recsys_moe.moe.layer import MultiTaskMoE

SET_VALUES = {
    "k": 1,
    "gamma": 0.5,
    "entropy_reg": 0.1,
    "entropy_start_fraction": 0.25,
    "entropy_warmup_fraction": 0.5,
    "entropy_start_step": 3,
    "entropy_warmup_steps": 4,
    "noise": False,  # set, even to its default: still a key the gate would ignore
    "kernel": "reference",
    "hard_inference": True,
}
OPTIONAL_KEYS = [f.name for f in fields(GateConfig) if f.name not in ("type", "per_example")]


def test_every_gate_key_is_used_by_some_gate_under_its_constructor_name():
    assert sorted(OPTIONAL_KEYS) == sorted(SET_VALUES)
    for key in OPTIONAL_KEYS:
        assert any(key in keys for keys in GATE_KEYS.values()), key
    for gate_type, keys in GATE_KEYS.items():
        gate = build_gate(GateConfig(type=gate_type), 4, 3)
        params = inspect.signature(type(gate).__init__).parameters
        assert set(keys) <= set(params), (gate_type, keys)


UNUSED = [(t, key) for t in GateType for key in OPTIONAL_KEYS if key not in GATE_KEYS[t]]


@pytest.mark.parametrize("gate_type, key", UNUSED, ids=[f"{t.value}-{k}" for t, k in UNUSED])
def test_a_key_the_gate_does_not_use_is_rejected_naming_key_and_gate(gate_type, key):
    value = SET_VALUES[key]
    cfg = GateConfig(type=gate_type, **{key: value})
    with pytest.raises(ValueError) as e:
        build_gate(cfg, 4, 3)
    msg = str(e.value)
    assert f"model.gate.{key} ({value}) is not used by the {gate_type.value} gate" in msg, msg
    assert f"model.gate.{key}=null" in msg


@pytest.mark.parametrize("gate_type", list(GateType))
def test_set_keys_reach_the_gate_and_unset_ones_take_its_defaults(gate_type):
    used = {key: SET_VALUES[key] for key in GATE_KEYS[gate_type]}
    gate = build_gate(GateConfig(type=gate_type, per_example=False, **used), 4, 3)
    assert gate.per_example is False
    assert {key: getattr(gate, key) for key in used} == used
    default = build_gate(GateConfig(type=gate_type), 4, 3)
    signature = inspect.signature(type(default).__init__).parameters
    for key in GATE_KEYS[gate_type]:
        assert getattr(default, key) == signature[key].default


@pytest.mark.parametrize("gate_type", list(GateType))
@pytest.mark.parametrize("per_example", [True, False])
def test_one_expert_works_with_every_gate(gate_type, per_example):
    """With one expert every gate gives weight 1 to it (DSelect-k: no selector bits, M = 0)."""
    torch.manual_seed(0)
    B, D, T = 6, 5, 2
    k = {"k": 1} if "k" in GATE_KEYS[gate_type] else {}
    extra = {"entropy_reg": 0.3} if gate_type == GateType.dselect_k else {}
    gates = [
        build_gate(GateConfig(type=gate_type, per_example=per_example, **k, **extra), 1, D)
        for _ in range(T)
    ]
    for compute in (ExpertCompute.dense, ExpertCompute.sparse):
        layer = MultiTaskMoE(ExpertBank(1, D, [8], 4), gates, compute=compute)
        layer.train()
        x = torch.randn(B, D, requires_grad=True)
        out = layer(x)
        for g in out.gates:
            assert torch.equal(g.weights, torch.ones(B, 1))
        loss = out.y.sum() + out.aux_loss
        loss.backward()
        assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
