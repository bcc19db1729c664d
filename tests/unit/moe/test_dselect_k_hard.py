"""model.gate.hard_inference: in eval mode DSelect-k rounds its selectors, so every example gets at
most k experts exactly; where the selectors saturated the weights are the soft gate's; training
is untouched; the stats stay those of the soft selectors; every kernel agrees (float64)."""

from __future__ import annotations

import pytest
import torch

from recsys_moe.moe.gates import DSelectKGate
from recsys_moe.moe.gates.dselect_k import binary_codes
from recsys_moe.moe.gates.dselect_k_fused import forward_gates

B, D = 64, 5


def _gate(n: int, k: int, kernel: str, hard: bool, scale: float = 1.0) -> DSelectKGate:
    """Selector logits of order `scale` * gamma: with scale 1 about half the bits of every batch
    sit inside the smooth-step window (up to 2^m experts per selector on the soft gate)."""
    torch.manual_seed(n * 10 + k)
    gate = DSelectKGate(n, D, k=k, gamma=1.0, entropy_reg=0.5, kernel=kernel, hard_inference=hard)
    with torch.no_grad():
        km = k * gate.num_bits
        gate.proj.weight[:km] = scale * torch.randn(km, D)
        gate.proj.bias[:km] = 0.1 * torch.randn(km)
        gate.proj.weight[km:] = torch.randn(k, D)
    return gate.eval()


def _x(seed: int = 0) -> torch.Tensor:
    return torch.randn(B, D, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("kernel", ["reference", "fused", "native"])
@pytest.mark.parametrize("n, k", [(16, 2), (8, 4), (6, 2), (5, 3)])
def test_hard_eval_gives_at_most_k_experts_where_the_soft_gate_gives_more(kernel, n, k):
    hard = _gate(n, k, kernel, hard=True)
    soft = _gate(n, k, kernel, hard=False)
    x = _x()
    w_soft, w_hard = soft(x).weights, hard(x).weights
    assert ((w_soft > 0).sum(-1) > k).any()  # the setup: the soft gate is not k-sparse here
    assert ((w_hard > 0).sum(-1) <= k).all()
    # each selector picks the expert whose code is the signs of its logits: w is the softmax
    # mixture of k one-hot rows (weights sum to 1 wherever every selector's code is reachable)
    z, alpha = hard.logits(x)
    bits = z >= 0  # [B, K, M]
    codes = binary_codes(n)  # [N, M]
    onehot = (bits[:, :, None, :] == codes[None, None]).all(-1).to(w_hard.dtype)  # [B, K, N]
    want = (torch.softmax(alpha, -1)[..., None] * onehot).sum(1)
    torch.testing.assert_close(w_hard, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kernel", ["reference", "fused", "native"])
def test_where_every_selector_saturated_hard_and_soft_weights_are_equal(kernel):
    hard = _gate(16, 2, kernel, hard=True, scale=1e3)
    soft = _gate(16, 2, kernel, hard=False, scale=1e3)
    x = _x()
    assert soft(x).stats["saturated_fraction"] == 1.0
    assert torch.equal(hard(x).weights, soft(x).weights)


@pytest.mark.parametrize("kernel", ["reference", "fused", "native"])
def test_training_ignores_hard_inference(kernel):
    hard = _gate(8, 2, kernel, hard=True).train()
    soft = _gate(8, 2, kernel, hard=False).train()
    for g in (hard, soft):
        g.set_train_progress(5, 10)
    x = _x()
    out_h, out_s = hard(x), soft(x)
    assert torch.equal(out_h.weights, out_s.weights)
    assert torch.equal(out_h.aux_loss, out_s.aux_loss)
    assert ((out_h.weights > 0).sum(-1) > 2).any()


@pytest.mark.parametrize("kernel", ["reference", "fused", "native"])
def test_hard_eval_stats_are_the_soft_selectors(kernel):
    hard, soft = _gate(8, 2, kernel, hard=True), _gate(8, 2, kernel, hard=False)
    x = _x()
    got, want = hard(x).stats, soft(x).stats
    assert 0.0 < want["saturated_fraction"] < 1.0
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-12, atol=1e-12, msg=key)


def test_fused_hard_equals_the_reference_in_values_and_gradients():
    """Gradients in eval mode with autograd on: none through the rounded bits (a step), the
    mixing logits' and the input's through alpha, the same on both paths."""
    ref, fused = _gate(6, 2, "reference", hard=True), _gate(6, 2, "fused", hard=True)
    up = torch.randn(B, 6, generator=torch.Generator().manual_seed(1))
    results = []
    for gate in (ref, fused):
        x = _x().requires_grad_()
        out = gate(x)
        (out.weights * up).sum().backward()
        results.append((out.weights, x.grad, gate.proj.weight.grad, gate.proj.bias.grad))
    for got, want in zip(results[1], results[0]):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    km = 2 * ref.num_bits
    assert (results[0][2][:km] == 0).all() and (results[0][2][km:] != 0).any()


def test_batched_gates_with_and_without_hard_inference_keep_their_own_routing():
    """forward_gates groups gates by shape and mode: a hard and a soft gate in one layer each
    get their own routing."""
    hard, soft = _gate(8, 2, "fused", hard=True), _gate(8, 2, "fused", hard=False)
    x = _x()
    outs = forward_gates([hard, soft], x)
    assert torch.equal(outs[0].weights, hard(x).weights)
    assert torch.equal(outs[1].weights, soft(x).weights)
    assert not torch.equal(outs[0].weights, outs[1].weights)
