"""The baselines: Top-k (Shazeer et al.) and softmax (MMoE) gates."""

from __future__ import annotations

import pytest
import torch

from recsys_moe.config.schema import GateConfig, GateType
from recsys_moe.moe.gates import DSelectKGate, SoftmaxGate, TopKGate, build_gate


@pytest.mark.parametrize("per_example", [True, False])
def test_topk_keeps_exactly_k_with_softmax_over_them(per_example):
    torch.manual_seed(0)
    gate = TopKGate(8, in_dim=5, k=3, per_example=per_example)
    x = torch.randn(16, 5)
    w = gate(x).weights
    assert ((w != 0).sum(-1) == 3).all()
    torch.testing.assert_close(w.sum(-1), torch.ones(16))
    logits = gate.proj(x) if per_example else gate.logits_param.expand(16, -1)
    top_v, top_i = logits.topk(3, -1)
    torch.testing.assert_close(w.gather(-1, top_i), torch.softmax(top_v, -1))


def test_topk_unselected_experts_get_zero_gradient():
    torch.manual_seed(0)
    gate = TopKGate(6, in_dim=4, k=2, per_example=False)
    w = gate(torch.zeros(1, 4)).weights[0]
    for e in (w == 0).nonzero().flatten().tolist():
        (g,) = torch.autograd.grad(w[e], gate.logits_param, retain_graph=True)
        assert (g == 0).all()
    loss = (w * torch.arange(6.0)).sum()
    loss.backward()
    assert (gate.logits_param.grad[w == 0] == 0).all()
    assert (gate.logits_param.grad[w != 0] != 0).all()


def test_topk_noise_only_in_training():
    torch.manual_seed(0)
    gate = TopKGate(8, in_dim=4, k=2, noise=True)
    x = torch.randn(32, 4)
    gate.eval()
    assert torch.equal(gate(x).weights, gate(x).weights)
    gate.train()
    assert not torch.equal(gate(x).weights, gate(x).weights)
    gate(x).weights.sum().backward()
    assert gate.noise_proj.weight.grad is not None


@pytest.mark.parametrize("per_example", [True, False])
def test_softmax_gate_is_dense_and_convex(per_example):
    torch.manual_seed(0)
    gate = SoftmaxGate(5, in_dim=3, per_example=per_example)
    w = gate(torch.randn(7, 3)).weights
    assert (w > 0).all()
    torch.testing.assert_close(w.sum(-1), torch.ones(7))
    if not per_example:
        torch.testing.assert_close(w, torch.full((7, 5), 0.2))  # uniform at init


def test_build_gate_and_errors():
    assert isinstance(build_gate(GateConfig(type=GateType.topk, k=3), 8, 4), TopKGate)
    assert isinstance(
        build_gate(GateConfig(type=GateType.dselect_k, gamma=0.5), 8, 4), DSelectKGate
    )
    assert isinstance(build_gate(GateConfig(), 8, 4), SoftmaxGate)
    with pytest.raises(
        ValueError, match=r"model\.gate\.k \(9\) must be <= model\.num_experts \(8\)"
    ):
        build_gate(GateConfig(type=GateType.topk, k=9), 8, 4)
    with pytest.raises(ValueError, match=r"model\.gate\.k \(0\) must be >= 1"):
        build_gate(GateConfig(type=GateType.topk, k=0), 8, 4)
    with pytest.raises(ValueError, match=r"model\.num_experts \(0\)"):
        build_gate(GateConfig(type=GateType.dselect_k), 0, 4)
