"""DSelect-k is exactly the method of ../shared/DSELECT_K.md: each property, tested."""

from __future__ import annotations

import math

import pytest
import torch
from torch.func import functional_call

from recsys_moe.moe.gates.dselect_k import (
    DSelectKGate,
    binary_codes,
    entropy,
    num_bits,
    selector_outputs,
    smooth_step,
)

# ------------------------------------------------------------------------------ smooth-step


@pytest.mark.parametrize("gamma", [0.1, 1.0, 3.0])
def test_smooth_step_values_and_derivatives(gamma):
    t = torch.tensor([-gamma, -gamma / 2, 0.0, gamma / 2, gamma], requires_grad=True)
    s = smooth_step(t, gamma)
    assert s.tolist() == [0.0, 0.0, 0.5, 1.0, 1.0]  # exact, not approximately
    (grad,) = torch.autograd.grad(s.sum(), t)
    assert grad[2].item() == pytest.approx(3 / (2 * gamma), rel=1e-12)  # S'(0), its maximum
    assert grad[[0, 1, 3, 4]].tolist() == [0.0, 0.0, 0.0, 0.0]  # flat at and beyond +-gamma/2


@pytest.mark.parametrize("gamma", [0.5, 2.0])
def test_smooth_step_is_the_cubic_polynomial_inside_the_window(gamma):
    t = torch.linspace(-gamma / 2, gamma / 2, 101)
    poly = -(2 / gamma**3) * t**3 + (3 / (2 * gamma)) * t + 0.5
    torch.testing.assert_close(smooth_step(t, gamma), poly, rtol=0, atol=1e-14)
    # C^1: the derivative is continuous and vanishes at both ends of the window
    t = torch.linspace(-gamma, gamma, 401, requires_grad=True)
    (d,) = torch.autograd.grad(smooth_step(t, gamma).sum(), t)
    assert d.max().item() == pytest.approx(3 / (2 * gamma), rel=1e-3)
    assert (d[1:] - d[:-1]).abs().max().item() < 0.05 * 3 / (2 * gamma)


# ------------------------------------------------------------------------------ selectors


def test_binary_codes_are_msb_first_and_only_reachable():
    assert num_bits(1) == 0 and num_bits(2) == 1 and num_bits(5) == 3 and num_bits(16) == 4
    assert binary_codes(5).int().tolist() == [[0, 0, 0], [0, 0, 1], [0, 1, 0], [0, 1, 1], [1, 0, 0]]


@pytest.mark.parametrize("n", [2, 5, 8, 16])
def test_selector_outputs_match_the_product_formula(n):
    torch.manual_seed(n)
    s = torch.rand(7, num_bits(n))
    codes = binary_codes(n)
    brute = torch.stack(
        [torch.where(codes[e], s, 1 - s).prod(-1) for e in range(n)], dim=-1
    )  # r_e = prod_j (s_j if b_j(e) else 1 - s_j)
    torch.testing.assert_close(selector_outputs(s, n), brute, rtol=0, atol=1e-15)
    full = selector_outputs(s, 2 ** num_bits(n))
    torch.testing.assert_close(full.sum(-1), torch.ones(7))  # over all 2^m codes: sums to 1


def test_binary_selector_is_one_hot():
    s = torch.tensor([1.0, 0.0, 1.0])  # code 101 = expert 5
    r = selector_outputs(s, 8)
    assert r.tolist() == [0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0]


# ------------------------------------------------------------------------------ the gate


def _gate(n=8, k=2, per_example=True, gamma=1.0, **kw):
    torch.manual_seed(0)
    return DSelectKGate(n, in_dim=6, k=k, gamma=gamma, per_example=per_example, **kw)


def _saturate(gate):
    """Pushes every selector logit far outside the window (per example: |z| ~ 1e6 |W x|)."""
    with torch.no_grad():
        if gate.per_example:
            km = gate.k * gate.num_bits
            gate.proj.weight[:km] = 1e6 * torch.randn_like(gate.proj.weight[:km])
            gate.proj.bias[:km] = 0.0
        else:
            gate.z.copy_(10.0 * torch.sign(gate.z))


@pytest.mark.parametrize("per_example", [True, False])
def test_weights_are_a_convex_combination(per_example):
    gate = _gate(n=16, k=3, per_example=per_example)
    with torch.no_grad():  # move selectors well inside the window, away from the init
        if per_example:
            gate.proj.weight.normal_(0, 0.1)
        else:
            gate.z.uniform_(-0.4, 0.4)
    w = gate(torch.randn(32, 6)).weights
    assert w.shape == (32, 16)
    assert (w >= 0).all()
    torch.testing.assert_close(w.sum(-1), torch.ones(32), rtol=0, atol=1e-12)


@pytest.mark.parametrize("per_example", [True, False])
@pytest.mark.parametrize("n, k", [(8, 2), (16, 2), (16, 4), (5, 2)])
def test_at_most_k_exact_zeros_once_saturated(per_example, n, k):
    gate = _gate(n=n, k=k, per_example=per_example)
    _saturate(gate)
    w = gate(torch.randn(64, 6)).weights
    nonzero = (w != 0).sum(-1)
    assert (nonzero <= k).all()
    assert ((w == 0.0) | (w > 1e-6)).all()  # zeros are exactly 0.0, not tiny
    if n & (n - 1) == 0:
        assert (nonzero >= 1).all()
        torch.testing.assert_close(w.sum(-1), torch.ones(64))
    # else a saturated selector may sit on an unreachable code and its mass is lost: the
    # reachability penalty (tested below) is what keeps selectors off those codes


@pytest.mark.parametrize("per_example", [True, False])
@pytest.mark.parametrize("n", [6, 8])
def test_gradcheck(per_example, n):
    """Analytic gradients of the weights and the regulariser w.r.t. input and parameters."""
    gate = _gate(n=n, k=2, per_example=per_example, entropy_reg=0.3)
    gate.train()
    with torch.no_grad():  # inside the window but away from the init's near-zero logits
        for p in gate.parameters():
            p.uniform_(-0.3, 0.3)
    names = [name for name, _ in gate.named_parameters()]

    def f(x, *params):
        out = functional_call(gate, dict(zip(names, params)), (x,))
        return out.weights, out.aux_loss

    x = torch.randn(5, 6, requires_grad=True)
    params = [p.detach().clone().requires_grad_() for p in gate.parameters()]
    assert torch.autograd.gradcheck(f, (x, *params), eps=1e-6, atol=1e-7)


def _logits_from(gate, x, ps):
    if gate.per_example:
        weight, bias = ps
        out = x @ weight.t() + bias
        km = gate.k * gate.num_bits
        return out[:, :km].reshape(-1, gate.k, gate.num_bits), out[:, km:]
    z, alpha = ps
    return z, alpha


def _gate_math(gate, z, alpha):
    """The gate's forward from explicit logits, through the module's own functions."""
    r = selector_outputs(smooth_step(z, gate.gamma), gate.num_experts)
    w = (torch.softmax(alpha, -1).unsqueeze(-1) * r).sum(-2)
    reg = gate.entropy_reg * entropy(r).sum(-1).mean()
    if gate.num_experts != 2**gate.num_bits:
        reg = reg + (1.0 / (r.sum(-1) + 1e-6)).sum(-1).mean()  # COMET's + 1e-6
    return w, reg


@pytest.mark.parametrize("per_example", [True, False])
@pytest.mark.parametrize("n", [6, 8, 16])
def test_module_forward_equals_the_math_and_its_gradients(per_example, n):
    """The module (its affine map with 1/gamma and 1/2 folded in) against smooth_step of the
    plain logits, values and gradients, in a state where some bits are saturated and others are
    not, for the weights and the regulariser."""
    gate = _gate(n=n, k=2, per_example=per_example, entropy_reg=0.3)
    gate.train()
    with torch.no_grad():  # logits spread over [-2, 2] with gamma = 1: about half saturated
        for p in gate.parameters():
            p.uniform_(-1.0, 1.0)
        if n != 2**gate.num_bits:  # the MSB saturated at 0: no mass on the unreachable codes
            msb = torch.arange(gate.k) * gate.num_bits
            if per_example:
                gate.proj.weight[msb] = 0.0
                gate.proj.bias[msb] = -5.0
            else:
                gate.z[:, 0] = -5.0
    x = torch.randn(7, 6)
    ps = list(gate.parameters())
    z, alpha = _logits_from(gate, x, ps)
    assert (z.abs() >= 0.5).any() and (z.abs() < 0.5).any()  # mixed saturation
    w, reg = _gate_math(gate, z, alpha)
    out = gate(x)
    torch.testing.assert_close(out.weights, w.expand_as(out.weights), rtol=0, atol=1e-15)
    torch.testing.assert_close(out.aux_loss, reg, rtol=1e-14, atol=0)

    g_w = torch.randn_like(out.weights)
    mine = torch.autograd.grad((out.weights * g_w).sum() + out.aux_loss, ps)
    ref = torch.autograd.grad((w.expand_as(g_w) * g_w).sum() + reg, ps)
    for a, b in zip(mine, ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_zero_weight_means_zero_gradient_with_mixed_saturation():
    """Property 3: where w_e == 0 exactly, dw_e/dZ = 0 and dw_e/dalpha = 0."""
    torch.manual_seed(1)
    gate = _gate(n=8, k=3, per_example=False)
    with torch.no_grad():
        gate.z.copy_(torch.tensor([[5.0, -5.0, 5.0], [0.1, -5.0, 5.0], [0.2, -0.3, 5.0]]))
        gate.alpha.copy_(torch.tensor([0.3, -0.2, 0.1]))
    # selector 0 saturated (expert 5); 1 half-saturated (experts 1, 5); 2 not (experts 1, 3, 5, 7)
    w = gate(torch.zeros(1, 6)).weights[0]
    zero = (w == 0).nonzero().flatten().tolist()
    assert zero == [0, 2, 4, 6]
    for e in range(8):
        gz, ga = torch.autograd.grad(w[e], [gate.z, gate.alpha], retain_graph=True)
        if e in zero:
            assert (gz == 0).all() and (ga == 0).all(), e
        else:
            assert gz.abs().sum() > 0 or ga.abs().sum() > 0, e


@pytest.mark.parametrize("gamma", [0.5, 3.0])
def test_init_ranges(gamma):
    torch.manual_seed(0)
    static = DSelectKGate(16, in_dim=64, k=4, gamma=gamma, per_example=False)
    assert static.z.abs().max() <= gamma / 100 and static.z.abs().max() > gamma / 400
    assert static.alpha.abs().max() <= 0.05
    per_ex = DSelectKGate(16, in_dim=64, k=4, gamma=gamma)
    km = 4 * 4
    for t in (per_ex.proj.weight[:km], per_ex.proj.bias[:km]):
        assert t.abs().max() <= gamma / 100 and t.abs().max() > gamma / 400
    for t in (per_ex.proj.weight[km:], per_ex.proj.bias[km:]):
        assert t.abs().max() <= 0.05 and t.abs().max() > 0.05 / 4
    assert sum(p.numel() for p in per_ex.parameters()) == (64 + 1) * (4 * 4 + 4)
    assert sum(p.numel() for p in static.parameters()) == 4 * 4 + 4
    # near-uniform selectors at init: every expert gets weight close to 1/n
    w = per_ex(torch.randn(8, 64)).weights
    assert ((w > 0.5 / 16) & (w < 1.5 / 16)).all()


def test_reachability_penalty_for_n_not_a_power_of_two():
    gate = _gate(n=5, k=2, per_example=False, entropy_reg=0.0)
    gate.train()
    with torch.no_grad():
        gate.z.copy_(torch.tensor([[0.3, -0.1, 0.2], [-0.4, 0.4, 0.0]]))
    out = gate(torch.zeros(3, 6))
    r = selector_outputs(smooth_step(gate.z, gate.gamma), 5)
    expected = (1.0 / (r.sum(-1) + 1e-6)).sum()
    assert out.aux_loss.item() == pytest.approx(expected.item(), rel=1e-12)
    assert out.aux_loss.item() > 2.0  # both selectors lose mass to the 3 unreachable codes
    # a gradient step on the penalty moves mass back onto reachable experts
    before = r.sum(-1).detach()
    out.aux_loss.backward()
    with torch.no_grad():
        gate.z -= 0.1 * gate.z.grad
    after = selector_outputs(smooth_step(gate.z, gate.gamma), 5).sum(-1)
    assert (after > before).all()
    # powers of two have no such term
    g8 = _gate(n=8, k=2, per_example=False)
    g8.train()
    assert g8(torch.zeros(2, 6)).aux_loss.item() == 0.0


def test_saturated_static_selectors_are_frozen():
    """Property 4: a static selector whose z left the window gets zero gradient."""
    gate = _gate(n=8, k=2, per_example=False, entropy_reg=0.5)
    gate.train()
    with torch.no_grad():
        gate.z.copy_(torch.tensor([[0.7, -0.9, 2.0], [0.1, 0.2, -0.3]]))  # selector 0 saturated
    opt = torch.optim.SGD(gate.parameters(), lr=0.5)
    z0 = gate.z.detach().clone()
    for _ in range(5):
        out = gate(torch.randn(4, 6))
        loss = (out.weights * torch.arange(8.0)).sum() + out.aux_loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert torch.equal(gate.z[0], z0[0])  # frozen, bit for bit
    assert not torch.equal(gate.z[1], z0[1])  # the other one still learns


def test_reachability_penalty_is_finite_on_an_unreachable_code():
    """A selector saturated on code 7 of n = 5 has sum_e r_e = 0 exactly: the reference's
    1 / 0 would be +inf; with COMET's + 1e-6 the loss and its gradients stay finite."""
    gate = _gate(n=5, k=2, per_example=False)
    gate.train()
    with torch.no_grad():
        gate.z.copy_(torch.tensor([[5.0, 5.0, 5.0], [-5.0, -5.0, 5.0]]))  # codes 7 and 1
    out = gate(torch.zeros(3, 6))
    w = out.weights[0]
    assert w.sum().item() < 1.0 and (w[[0, 2, 3, 4]] == 0).all()  # selector 0 is lost off the end
    assert math.isfinite(out.aux_loss.item())
    assert out.aux_loss.item() == pytest.approx(1e6 + 1.0, rel=1e-6)  # 1 / 1e-6 + 1 / (1 + 1e-6)
    out.aux_loss.backward()
    assert torch.isfinite(gate.z.grad).all()


def _lambdas(gate, steps, total):
    lams = []
    for s in steps:
        gate.set_train_progress(s, total)
        lams.append(gate.current_entropy_reg().item())
    return lams


def test_entropy_regulariser_is_a_batch_mean_that_follows_the_training_step():
    gate = _gate(n=8, k=2, per_example=True, entropy_reg=0.4, entropy_warmup_steps=4)
    gate.train()
    x = torch.randn(10, 6)
    z, _ = gate.logits(x)
    h = entropy(selector_outputs(smooth_step(z, gate.gamma), 8)).sum(-1).mean().item()
    regs = []
    for step in range(6):
        gate.set_train_progress(step, 100)
        regs.append(gate(x).aux_loss.item())
    # lambda at step s (0-based) = 0.4 * min(1, s / 4)
    assert regs == pytest.approx([0.4 * min(1, s / 4) * h for s in range(6)], rel=1e-12)
    # forward calls do not move the schedule: a recomputed forward, an eval call, another forward
    gate.set_train_progress(2, 100)
    first = gate(x).aux_loss.item()
    gate.eval()
    assert gate(x).aux_loss.item() == 0.0  # no regulariser at eval
    gate.train()
    assert [gate(x).aux_loss.item() for _ in range(3)] == pytest.approx([first] * 3, rel=1e-12)
    assert first == pytest.approx(0.2 * h, rel=1e-12)
    # the batch mean does not depend on the batch size (the reference's sum would double)
    assert gate(torch.cat([x, x])).aux_loss.item() == pytest.approx(first, rel=1e-12)


@pytest.mark.parametrize("warmup", [0, 2])
def test_entropy_regulariser_starts_at_its_absolute_start_step(warmup):
    gate = _gate(
        n=8,
        k=2,
        entropy_reg=0.4,
        entropy_start_step=3,
        entropy_warmup_steps=warmup,
        entropy_start_fraction=0.9,  # overridden by the absolute step
    )
    want = [
        0.4 * (min(1, (s - 3) / warmup) if warmup else 1.0) if s >= 3 else 0.0 for s in range(7)
    ]
    assert _lambdas(gate, range(7), total=1000) == pytest.approx(want, rel=1e-12, abs=0)


def test_entropy_schedule_as_fractions_of_the_run():
    gate = _gate(n=8, k=2, entropy_reg=2.0, entropy_start_fraction=0.5, entropy_warmup_fraction=0.1)
    # run of 200 steps: 0 before step 100, ramp over 20 steps, full from step 120
    got = _lambdas(gate, [0, 99, 100, 105, 110, 119, 120, 199], total=200)
    assert got == pytest.approx([0, 0, 0, 0.5, 1.0, 1.9, 2.0, 2.0], rel=1e-6, abs=1e-12)
    # the same gate in a run of 2000 steps starts at step 1000
    assert _lambdas(gate, [999, 1000, 1100, 1200], total=2000) == pytest.approx(
        [0, 0, 1.0, 2.0], rel=1e-6, abs=1e-12
    )
    # before the trainer says how long the run is, a fractional start keeps lambda at 0
    assert (
        _gate(n=8, entropy_reg=2.0, entropy_start_fraction=0.5).current_entropy_reg().item() == 0.0
    )
    assert _gate(n=8, entropy_reg=2.0).current_entropy_reg().item() == 2.0  # start fraction 0


def test_schedule_position_is_saved_with_the_model():
    gate = _gate(n=8, k=2, entropy_reg=1.0, entropy_start_fraction=0.5, entropy_warmup_fraction=0.1)
    gate.set_train_progress(105, 200)
    state = gate.state_dict()
    assert state["train_step"].item() == 105 and state["total_steps"].item() == 200
    resumed = _gate(
        n=8, k=2, entropy_reg=1.0, entropy_start_fraction=0.5, entropy_warmup_fraction=0.1
    )
    assert resumed.current_entropy_reg().item() == 0.0
    resumed.set_train_progress(3, 300)  # a position the loaded state replaces
    resumed.load_state_dict(state)
    assert resumed.current_entropy_reg().item() == pytest.approx(0.25, rel=1e-6)
    # total_steps is written once a run, not every step: where it changes, and after a load
    resumed.set_train_progress(106, 300)
    assert [resumed.state_dict()[k].item() for k in ("train_step", "total_steps")] == [106, 300]
    gate.set_train_progress(106, 200)
    gate.set_train_progress(107, 400)
    assert [gate.state_dict()[k].item() for k in ("train_step", "total_steps")] == [107, 400]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(num_experts=0), "model.num_experts (0)"),
        (dict(entropy_start_step=-1), "model.gate.entropy_start_step (-1) must be >= 0"),
        (dict(entropy_warmup_steps=-2), "model.gate.entropy_warmup_steps (-2) must be >= 0"),
        (
            dict(entropy_start_fraction=1.5),
            "model.gate.entropy_start_fraction (1.5) must be in [0, 1]",
        ),
        (dict(entropy_warmup_fraction=-0.1), "model.gate.entropy_warmup_fraction (-0.1) must be"),
        (dict(k=0), "model.gate.k (0) must be >= 1"),
        (dict(k=9), "model.gate.k (9) must be <= model.num_experts (8)"),
        (dict(gamma=0.0), "model.gate.gamma (0.0) must be > 0"),
        (dict(entropy_reg=-0.1), "model.gate.entropy_reg (-0.1) must be >= 0"),
    ],
)
def test_bad_arguments_name_the_config_key(kwargs, message):
    args = dict(num_experts=8, in_dim=4, k=2)
    args.update(kwargs)
    with pytest.raises(ValueError) as e:
        DSelectKGate(**args)
    assert message in str(e.value)


def test_stats():
    gate = _gate(n=8, k=2, per_example=False)
    _saturate(gate)
    out = gate(torch.zeros(3, 6))
    assert out.stats["saturated_fraction"].item() == 1.0
    assert out.stats["selector_entropy"].item() == pytest.approx(0.0, abs=1e-5)
    assert math.isfinite(out.stats["entropy_reg"].item())
