"""The expert kernels (moe/grouped.py) equal the plain formulas, in values and gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from recsys_moe.moe.experts import ExpertBank
from recsys_moe.moe.grouped import expert_linear

N, D_IN, D_OUT = 4, 5, 3  # experts, in and out widths


def _params(dtype=torch.float64):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(N, D_IN, D_OUT, generator=g, dtype=dtype, requires_grad=True)
    b = torch.randn(N, D_OUT, generator=g, dtype=dtype, requires_grad=True)
    return w, b


@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("layout", ["shared", "stacked", "grouped"])
def test_gradcheck_and_formula(layout, relu):
    w, b = _params()
    g = torch.Generator().manual_seed(1)
    counts = [3, 0, 2, 4]
    shape = {"shared": (6, D_IN), "stacked": (N, 6, D_IN), "grouped": (sum(counts), D_IN)}[layout]
    x = torch.randn(shape, generator=g, dtype=torch.float64, requires_grad=True)
    c = counts if layout == "grouped" else None

    def f(x, w, b):
        return expert_linear(x, w, b, c, relu=relu)

    assert torch.autograd.gradcheck(f, (x, w, b))
    act = F.relu if relu else (lambda t: t)
    out = f(x, w, b)
    if layout == "grouped":
        expert = torch.repeat_interleave(torch.arange(N), torch.tensor(counts))
        want = act(torch.einsum("pi,pio->po", x, w[expert]) + b[expert])
    else:
        want = act(torch.matmul(x, w) + b[:, None, :])
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)


def test_bank_equals_the_broadcast_reference():
    """The dense bank (shared first layer, stacked later ones) is the per-expert MLP."""
    torch.manual_seed(0)
    bank = ExpertBank(N, D_IN, [7, 6], D_OUT).double()
    x = torch.randn(9, D_IN, dtype=torch.float64, requires_grad=True)
    up = torch.randn(N, 9, D_OUT, dtype=torch.float64)
    (bank(x) * up).sum().backward()
    got = [x.grad.clone()] + [p.grad.clone() for p in bank.parameters()]
    bank.zero_grad()
    x.grad = None
    h = x
    for w, b in zip(bank.weights, bank.biases):
        h = F.relu(torch.matmul(h, w) + b[:, None, :])
    (h * up).sum().backward()
    want = [x.grad] + [p.grad for p in bank.parameters()]
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("grouped", [False, True])
def test_autocast_runs_the_matmuls_in_bf16_and_keeps_fp32_gradients(grouped):
    torch.manual_seed(0)
    bank = ExpertBank(N, D_IN, [8], D_OUT).float()
    x = torch.randn(6, D_IN, dtype=torch.float32, requires_grad=True)
    counts = [2, 1, 0, 3]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = bank.forward_grouped(x, counts) if grouped else bank(x)
    assert y.dtype == torch.bfloat16
    y.float().square().sum().backward()
    assert x.grad.dtype == torch.float32
    assert all(p.grad.dtype == torch.float32 for p in bank.parameters())
    with torch.no_grad():
        ref = bank.forward_grouped(x, counts) if grouped else bank(x)
    torch.testing.assert_close(y.float(), ref, rtol=0.05, atol=0.05)
