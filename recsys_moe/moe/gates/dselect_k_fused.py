"""DSelect-k's per-example gate as one autograd Function (model.gate.kernel=fused|compiled).

Legend: B = examples, D = gate input width, H = K*M + K affine outputs, K = selectors,
M = bits per code, C = 2^M codes, N = experts (the first N codes).

The same values and gradients as the eager reference in dselect_k.py (tests/unit/moe/
test_dselect_k_fused.py checks them in float64), computed differently:
- batch last: the affine map writes [H, B] (one addmm of W [H, D] and x^T), and every
  elementwise pass runs over B contiguous values; the reference's [B, K, M] and [B, K, N]
  layouts have innermost dims of 2 to 16 that neither eager kernels nor inductor vectorise well;
- a hand-written backward: autograd's replay of the reference keeps and revisits every
  intermediate of the Kronecker product (about 20 passes forward, 40 backward); here backward
  rebuilds the small prefix products r(s_0..s_{j-1}) and walks the code tree back once, and the
  affine map's gradients are two GEMMs on the [H, B] gradient;
- `compiled` runs the forward and backward math each as one torch.compile'd kernel (inductor: a
  C++ loop on CPU, Triton on CUDA); the first call of each shape compiles (seconds), later ones
  reuse it (batch sizes become dynamic after the first change).

Static gates (per_example=false) compute their weights once per batch on [K, N], not per
example: they keep the reference path whatever the kernel.

Backward of r (the Kronecker product of the pairs (1 - s_j, s_j), most significant bit first):
with R_j the prefix product over bits 0..j-1 ([K, 2^j, B]) and G the gradient of R_{j+1},
    dL/ds_j = sum_a R_j[a] (G[2a + 1] - G[2a]),   dL/dR_j[a] = G[2a] (1 - s_j) + G[2a + 1] s_j,
and ds/du = 6 u (1 - u), which is 0 where the clamp saturates (u = 0 or 1), exactly as autograd
gives through clamp and the cubic.
"""

from __future__ import annotations

import functools

import torch
from torch.autograd.function import once_differentiable

from recsys_moe.moe.gates.base import GateOutput
from recsys_moe.moe.gates.dselect_k import (
    ENTROPY_EPS,
    REACH_EPS,
    DSelectKGate,
    entropy,
    selector_outputs,
)


def _codes(s_KMB: torch.Tensor) -> list[torch.Tensor]:
    """Prefix products R_0 .. R_M: R_j [K, 2^j, B] over bits 0..j-1; R_M is r over all C codes."""
    k, m, b = s_KMB.shape
    prefixes = [s_KMB.new_ones(k, 1, b)]
    for j in range(m):
        s_j = s_KMB[:, j : j + 1]
        r = prefixes[-1]
        prefixes.append(torch.stack([r * (1.0 - s_j), r * s_j], dim=2).view(k, -1, b))
    return prefixes


def forward_math(
    lin_HB: torch.Tensor, k: int, m: int, n: int, with_entropy: bool, with_reach: bool
):
    """lin [H, B] (rows [0, K*M): u before the clamp; [K*M, H): mixing logits) ->
    (w [B, N], entropy sum / B, reachability sum / B, u [K, M, B], s [K, M, B], mix [K, B])."""
    km, b = k * m, lin_HB.shape[1]
    u = lin_HB[:km].clamp(0.0, 1.0).view(k, m, b)
    s = u * u * (3.0 - 2.0 * u)  # smooth_step
    r = _codes(s)[-1][:, :n]  # [K, N, B]
    mix = torch.softmax(lin_HB[km:], dim=0)  # over the K selectors
    w_BN = (mix.unsqueeze(1) * r).sum(0).t().contiguous()
    zero = lin_HB.new_zeros(())
    ent = -(r * torch.log(r + ENTROPY_EPS)).sum() / b if with_entropy else zero
    reach = (1.0 / (r.sum(1) + REACH_EPS)).sum() / b if with_reach else zero
    return w_BN, ent, reach, u, s, mix


def backward_math(
    grad_w_BN: torch.Tensor,
    grad_ent: torch.Tensor,
    grad_reach: torch.Tensor,
    u: torch.Tensor,
    s: torch.Tensor,
    mix: torch.Tensor,
    n: int,
    with_entropy: bool,
    with_reach: bool,
) -> torch.Tensor:
    """The gradient of the affine outputs, [H, B], from those of forward_math's outputs."""
    k, m, b = u.shape
    prefixes = _codes(s)
    r = prefixes[-1][:, :n]
    g_NB = grad_w_BN.t().contiguous()  # batch last, as everything else here
    g_mix = (g_NB.unsqueeze(0) * r).sum(1)  # [K, B]
    g_alpha = mix * (g_mix - (mix * g_mix).sum(0, keepdim=True))  # softmax backward
    G = mix.unsqueeze(1) * g_NB.unsqueeze(0)  # dL/dr [K, N, B]
    if with_entropy:  # d(-r log(r + eps))/dr
        G = G - (grad_ent / b) * (torch.log(r + ENTROPY_EPS) + r / (r + ENTROPY_EPS))
    if with_reach:
        G = G - (grad_reach / b) / (r.sum(1, keepdim=True) + REACH_EPS) ** 2
    codes = prefixes[-1].shape[1]
    if n < codes:  # unreachable codes: no gradient
        G = torch.cat([G, G.new_zeros(k, codes - n, b)], dim=1)
    g_s = [u.new_zeros(k, b)] * m
    for j in range(m - 1, -1, -1):
        pairs = G.view(k, -1, 2, b)  # [K, 2^j, 2, B]
        g_s[j] = ((pairs[:, :, 1] - pairs[:, :, 0]) * prefixes[j]).sum(1)
        s_j = s[:, j : j + 1]
        G = pairs[:, :, 0] * (1.0 - s_j) + pairs[:, :, 1] * s_j
    g_u = (torch.stack(g_s, dim=1) if m else u) * (6.0 * u * (1.0 - u))  # [K, M, B]
    return torch.cat([g_u.reshape(k * m, b), g_alpha], dim=0)


@functools.cache
def _compiled():
    """forward_math and backward_math compiled once per process (kernel=compiled)."""
    return (
        torch.compile(forward_math, fullgraph=True),
        torch.compile(backward_math, fullgraph=True),
    )


def _run(compiled: bool, which: int, *args):
    if not compiled:
        return (forward_math, backward_math)[which](*args)
    try:
        return _compiled()[which](*args)
    except Exception as e:  # a missing or broken compiler surfaces at the first call
        raise RuntimeError(
            "model.gate.kernel (compiled): torch.compile failed on this machine "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
            "model.gate.kernel=fused computes the same without a compiler"
        ) from e


class _DSelectKFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_BD, w_HD, b_H, k, m, n, with_entropy, with_reach, compiled):
        lin_HB = torch.addmm(b_H.unsqueeze(1), w_HD, x_BD.t())
        w_BN, ent, reach, u, s, mix = _run(compiled, 0, lin_HB, k, m, n, with_entropy, with_reach)
        ctx.save_for_backward(x_BD, w_HD, u, s, mix)
        ctx.options = (n, with_entropy, with_reach, compiled)
        ctx.mark_non_differentiable(u)
        return w_BN, ent, reach, u

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_w_BN, grad_ent, grad_reach, _grad_u):
        x_BD, w_HD, u, s, mix = ctx.saved_tensors
        n, with_entropy, with_reach, compiled = ctx.options
        g_HB = _run(
            compiled,
            1,
            grad_w_BN.contiguous(),
            grad_ent,
            grad_reach,
            u,
            s,
            mix,
            n,
            with_entropy,
            with_reach,
        )
        grad_x = g_HB.t() @ w_HD if ctx.needs_input_grad[0] else None
        grad_w = g_HB @ x_BD if ctx.needs_input_grad[1] else None
        grad_b = g_HB.sum(1) if ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_b, None, None, None, None, None, None


def fused_forward(gate: DSelectKGate, x_BD: torch.Tensor) -> GateOutput:
    """gate(x) for a per-example gate, through _DSelectKFunction: the GateOutput of the
    reference forward (weights, aux_loss, stats), the same values and gradients."""
    w, b, scale = gate.proj.weight, gate.proj.bias, gate.fold_scale
    lam = gate.current_entropy_reg()
    with_entropy = gate.training and gate.entropy_reg > 0
    with_reach = gate.training and not gate.power_of_two
    weights, ent, reach, u_KMB = _DSelectKFunction.apply(
        x_BD,
        w * scale[:, None],  # u = Z / gamma + 1/2 folded into the map, as the reference does
        b * scale + gate.fold_shift,
        gate.k,
        gate.num_bits,
        gate.num_experts,
        with_entropy,
        with_reach,
        gate.kernel == "compiled",
    )
    aux = x_BD.new_zeros(())
    if with_entropy:
        aux = aux + lam * ent
    if with_reach:
        aux = aux + reach

    def stats() -> dict[str, torch.Tensor]:
        u = u_KMB.permute(2, 0, 1)  # [B, K, M], as the reference keeps it
        r = selector_outputs(u * u * (3.0 - 2.0 * u), gate.num_experts)
        return {
            "saturated_fraction": ((u == 0.0) | (u == 1.0)).all(-1).float().mean(),
            "selector_entropy": entropy(r).mean(),
            "entropy_reg": lam,
        }

    return GateOutput(weights=weights, aux_loss=aux, stats_fn=stats)
