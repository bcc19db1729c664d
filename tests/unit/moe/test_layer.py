"""Sparse expert computation equals dense computation, in outputs and in every gradient."""

from __future__ import annotations

import pytest
import torch

from recsys_moe.config.schema import ExpertCompute
from recsys_moe.moe.dispatch.local import LocalDispatcher
from recsys_moe.moe.experts import ExpertBank
from recsys_moe.moe.gates import DSelectKGate, SoftmaxGate, TopKGate
from recsys_moe.moe.grouped import grouped_linear
from recsys_moe.moe.layer import MultiTaskMoE

B, D, N, T, OUT = 48, 10, 16, 4, 6  # examples, input width, experts, tasks, expert output


def _dselect_gates(per_example: bool, kernel: str = "fused"):
    gates = []
    for t in range(T):
        g = DSelectKGate(
            N, D, k=2, gamma=1.0, per_example=per_example, entropy_reg=0.2, kernel=kernel
        )
        with torch.no_grad():
            # tasks 0, 1: every bit saturated; task 2: selector 0 saturated, selector 1 in 2 of
            # its 4 bits; task 3: selector 1 in 3 of its 4 bits. Saturated bits: |z| >> gamma/2.
            saturated_bits = [8, 8, 6, 7][t]
            if per_example:
                km = g.k * g.num_bits  # rows 0-3: selector 0's bits, rows 4-7: selector 1's
                g.proj.weight[:km] = 0.1 * torch.randn_like(g.proj.weight[:km])
                g.proj.weight[:saturated_bits] = 1e6 * torch.randn_like(
                    g.proj.weight[:saturated_bits]
                )
            else:
                flat = g.z.view(-1)
                flat.copy_(
                    torch.where(torch.arange(flat.numel()) < saturated_bits, 10.0, 0.1)
                    * torch.sign(flat)
                )
        gates.append(g)
    return gates


def _gates(kind: str):
    if kind == "dselect_k":
        return _dselect_gates(per_example=True)
    if kind == "dselect_k_static":
        return _dselect_gates(per_example=False)
    if kind == "topk":
        return [TopKGate(N, D, k=2) for _ in range(T)]
    return [SoftmaxGate(N, D) for _ in range(T)]


def _run(kind: str, mode: ExpertCompute, x: torch.Tensor):
    torch.manual_seed(0)
    moe = MultiTaskMoE(ExpertBank(N, D, [12], OUT), _gates(kind), compute=mode)
    moe.train()
    x = x.clone().requires_grad_()
    out = moe(x)
    loss = (out.y * torch.linspace(-1, 1, OUT)).pow(2).sum() + out.aux_loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in moe.named_parameters() if p.grad is not None}
    return out, grads, x.grad.clone()


@pytest.mark.parametrize("kind", ["dselect_k", "dselect_k_static", "topk"])
def test_sparse_equals_dense_in_outputs_and_gradients(kind):
    torch.manual_seed(1)
    x = torch.randn(B, D)
    dense, g_dense, x_dense = _run(kind, ExpertCompute.dense, x)
    sparse, g_sparse, x_sparse = _run(kind, ExpertCompute.sparse, x)
    assert sparse.stats["sparse"].item() == 1.0 and dense.stats["sparse"].item() == 0.0
    assert sparse.stats["active_fraction"].item() < 1.0  # the sparse path really skipped pairs
    torch.testing.assert_close(sparse.y, dense.y, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(x_sparse, x_dense, rtol=1e-12, atol=1e-12)
    assert g_sparse.keys() == g_dense.keys() and len(g_dense) > 0
    for name in g_dense:
        torch.testing.assert_close(g_sparse[name], g_dense[name], rtol=1e-12, atol=1e-12, msg=name)


def test_mixed_saturation_really_is_mixed():
    w = torch.stack([g(torch.randn(B, D)).weights for g in _dselect_gates(per_example=True)])
    nonzero = (w != 0).sum(-1).double().mean(-1)  # per task
    assert nonzero[0] <= 2 and nonzero[1] <= 2
    assert 2 < nonzero[2] <= 5 and 2 < nonzero[3] <= 3


def test_auto_switches_on_the_active_fraction():
    torch.manual_seed(0)
    x = torch.randn(B, D)
    saturated = [g for g in _dselect_gates(per_example=True)[:2]]
    moe = MultiTaskMoE(
        ExpertBank(N, D, [8], OUT),
        saturated,
        compute=ExpertCompute.auto,
        sparse_max_active_fraction=0.5,
    )
    out = moe(x)
    assert out.stats["sparse"].item() == 1.0 and out.stats["active_fraction"].item() <= 4 / N
    moe.sparse_max_active_fraction = 0.01
    assert moe(x).stats["sparse"].item() == 0.0
    dense_gates = MultiTaskMoE(
        ExpertBank(N, D, [8], OUT), [SoftmaxGate(N, D)], compute=ExpertCompute.auto
    )
    out = dense_gates(x)
    assert out.stats["sparse"].item() == 0.0 and "active_fraction" not in out.stats  # no sync spent


@pytest.mark.parametrize("threshold", [0.2, 0.6])
def test_auto_on_the_native_kernels_count_decides_as_on_the_weights(threshold):
    """model.gate.kernel=native counts the active (example, expert) pairs in its forward loop,
    and `auto` decides on that count: the same fraction, path, outputs and gradients as the
    fused kernel, whose layer measures the fraction on the weights."""
    x = torch.randn(B, D, generator=torch.Generator().manual_seed(2))
    runs = {}
    for kernel in ("fused", "native"):
        torch.manual_seed(0)
        gates = _dselect_gates(per_example=True, kernel=kernel)
        torch.manual_seed(1)
        moe = MultiTaskMoE(
            ExpertBank(N, D, [8], OUT),
            gates,
            compute=ExpertCompute.auto,
            sparse_max_active_fraction=threshold,
        )
        xg = x.clone().requires_grad_()
        out = moe(xg)
        ((out.y * torch.linspace(-1, 1, OUT)).pow(2).sum() + out.aux_loss).backward()
        w = torch.stack([g.weights for g in out.gates])
        runs[kernel] = (out, xg.grad, {n: p.grad for n, p in moe.named_parameters()}, w)
    (fused, fx, fg, fw), (native, nx, ng, nw) = runs["fused"], runs["native"]
    frac = (nw != 0).any(0).float().mean()
    assert 0.2 < frac < 0.6  # between the thresholds: one run of each path
    assert native.stats["active_fraction"].item() == frac.item()
    assert fused.stats["active_fraction"].item() == frac.item()
    assert native.stats["sparse"].item() == fused.stats["sparse"].item() == float(threshold > 0.5)
    close = dict(rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(native.y, fused.y, **close)
    torch.testing.assert_close(nw, fw, **close)
    torch.testing.assert_close(nx, fx, **close)
    for name in fg:
        torch.testing.assert_close(ng[name], fg[name], msg=name, **close)


def test_dispatch_plan_groups_the_union_of_tasks_by_expert():
    w = torch.zeros(2, 3, 4)
    w[0, 0, 1] = 1.0
    w[1, 0, 3] = 1.0
    w[0, 1, 1] = 0.5
    w[0, 1, 2] = 0.5
    w[1, 2, 1] = 1.0
    plan = LocalDispatcher().plan(w, sparse=True)
    assert plan.counts == [0, 3, 1, 1]
    assert plan.expert_ids.tolist() == [1, 1, 1, 2, 3]
    assert plan.example_ids.tolist() == [0, 1, 2, 1, 0]


def test_grouped_linear_gradcheck_with_empty_groups():
    torch.manual_seed(0)
    counts = [3, 0, 2, 4]
    x = torch.randn(9, 5, requires_grad=True)
    w = torch.randn(4, 5, 3, requires_grad=True)
    b = torch.randn(4, 3, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w, b: grouped_linear(x, w, b, counts), (x, w, b))
    out = grouped_linear(x, w, b, counts)
    torch.testing.assert_close(out[3:5], x[3:5] @ w[2] + b[2])
    with pytest.raises(ValueError, match="counts"):
        grouped_linear(x, w, b, [3, 0, 2, 3])


def test_bad_threshold():
    with pytest.raises(ValueError, match=r"model\.sparse_max_active_fraction \(1\.5\)"):
        MultiTaskMoE(ExpertBank(N, D, [], OUT), [SoftmaxGate(N, D)], sparse_max_active_fraction=1.5)
