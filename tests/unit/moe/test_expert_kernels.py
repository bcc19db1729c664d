"""The expert kernels (moe/grouped.py) equal the plain formulas, in values and gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from recsys_moe.config.schema import ExpertKernel
from recsys_moe.moe.experts import ExpertBank
from recsys_moe.moe.grouped import expert_linear, expert_mlp

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


@pytest.mark.parametrize("kernel", ["batched", "per_expert", "grouped"])
def test_autocast_runs_the_matmuls_in_bf16_and_keeps_fp32_gradients(kernel):
    torch.manual_seed(0)
    grouped = kernel == "grouped"
    bank = ExpertBank(N, D_IN, [8], D_OUT, kernel="auto" if grouped else kernel).float()
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


@pytest.mark.parametrize("grouped", [False, True])
def test_whole_mlp_per_expert_equals_layer_by_layer(grouped):
    """expert_mlp (each expert's layers at once) against expert_linear layer after layer, and
    against finite differences; an expert without rows gets zero gradients."""
    torch.manual_seed(0)
    widths = [D_IN, 7, 6, D_OUT]
    ws = [torch.randn(N, a, b, requires_grad=True) for a, b in zip(widths[:-1], widths[1:])]
    bs = [torch.randn(N, b, requires_grad=True) for b in widths[1:]]
    counts = [3, 0, 2, 4] if grouped else None
    x = torch.randn(sum(counts) if grouped else 6, D_IN, requires_grad=True)

    def layers(x, *params):
        h = x
        for w, b in zip(params[:3], params[3:]):
            h = expert_linear(h, w, b, counts, relu=True)
        return h

    def whole(x, *params):
        return expert_mlp(x, params[:3], params[3:], counts)

    assert torch.autograd.gradcheck(whole, (x, *ws, *bs))
    up = torch.randn_like(layers(x, *ws, *bs))
    want = torch.autograd.grad((layers(x, *ws, *bs) * up).sum(), (x, *ws, *bs))
    got = torch.autograd.grad((whole(x, *ws, *bs) * up).sum(), (x, *ws, *bs))
    torch.testing.assert_close(whole(x, *ws, *bs), layers(x, *ws, *bs), rtol=1e-12, atol=1e-12)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    if grouped:
        assert all((g[1] == 0).all() for g in got[1:])  # expert 1 has no rows


def test_dropout_runs_layer_by_layer_in_training_only():
    torch.manual_seed(0)
    bank = ExpertBank(N, D_IN, [8], D_OUT, dropout=0.5)
    x = torch.randn(6, D_IN)
    assert bank._layer_by_layer()
    bank.eval()
    assert not bank._layer_by_layer()
    bank.train()
    a, b = bank(x), bank(x)
    assert not torch.equal(a, b)  # dropout is on


def test_batched_kernel_equals_the_per_expert_kernel():
    """The batched kernel (one GEMM batch over the experts per layer) against the per-expert
    one, in values and in every gradient, and against finite differences."""
    torch.manual_seed(0)
    widths = [D_IN, 7, 6, D_OUT]
    ws = [torch.randn(N, a, b, requires_grad=True) for a, b in zip(widths[:-1], widths[1:])]
    bs = [torch.randn(N, b, requires_grad=True) for b in widths[1:]]
    x = torch.randn(6, D_IN, requires_grad=True)

    def run(batched):
        return lambda x, *p: expert_mlp(x, p[:3], p[3:], batched=batched)

    assert torch.autograd.gradcheck(run(True), (x, *ws, *bs))
    out = run(True)(x, *ws, *bs)
    assert out.grad_fn.name() == "_BatchedExpertMLPBackward"
    want_out = run(False)(x, *ws, *bs)
    torch.testing.assert_close(out, want_out, rtol=1e-12, atol=1e-12)
    up = torch.randn_like(out)
    got = torch.autograd.grad((out * up).sum(), (x, *ws, *bs))
    want = torch.autograd.grad((want_out * up).sum(), (x, *ws, *bs))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="shared input"):
        expert_mlp(x, ws, bs, counts=[2, 2, 1, 1], batched=True)


@pytest.fixture
def threads():
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


@pytest.mark.parametrize(
    ("rows", "num_threads", "dtype", "batched"),
    [
        (512, 1, torch.float32, True),  # 8 x 512 x 256 x 4 B = 4 MiB for one thread
        (513, 1, torch.float32, False),
        (1024, 2, torch.float32, True),  # 8 MiB over two threads
        (2048, 2, torch.float32, False),
        (1024, 1, torch.bfloat16, True),  # autocast: 2-byte activations
    ],
)
def test_auto_kernel_is_batched_while_the_activations_fit_each_thread(
    threads, rows, num_threads, dtype, batched
):
    threads(num_threads)
    bank = ExpertBank(8, 16, [256], 64).float()
    x = torch.randn(rows, 16, dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        assert bank.batched(x) is batched
        out = bank(x)
    want = "_BatchedExpertMLPBackward" if batched else "_ExpertMLPBackward"
    assert out.grad_fn.name() == want
    for kernel, fixed in ((ExpertKernel.batched, True), (ExpertKernel.per_expert, False)):
        bank.kernel = kernel
        assert bank.batched(x) is fixed
    assert bank.shard(2, 4).kernel == ExpertKernel.per_expert
