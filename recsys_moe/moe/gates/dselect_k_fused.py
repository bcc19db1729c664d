"""DSelect-k's per-example gates as one autograd Function (model.gate.kernel=fused|native|compiled).

Legend: T = gates (tasks) computed together, B = examples, D = gate input width,
H = K*M + K affine outputs per gate, K = selectors, M = bits per code, C = 2^M codes,
N = experts (the first N codes).

The same values and gradients as the eager reference in dselect_k.py (tests/unit/moe/
test_dselect_k_fused.py checks them in float64), computed differently:
- batch last: the affine map writes [H, B] (one addmm of W [H, D] and x^T), and every
  elementwise pass runs over B contiguous values; the reference's [B, K, M] and [B, K, N]
  layouts have innermost dims of 2 to 16 that neither eager kernels nor inductor vectorise well;
- a hand-written backward: autograd's replay of the reference keeps and revisits every
  intermediate of the Kronecker product (about 20 passes forward, 40 backward); here forward
  keeps the prefix products r(s_0..s_{j-1}) (together about the size of r) and, while the
  entropy term is on, its derivative in r; backward walks the code tree back once from them,
  and the affine map's gradients are two GEMMs on the [H, B] gradient;
- the T tasks' gates of a layer run as one call (forward_gates): one GEMM for all their affine
  maps and every elementwise pass over all their selectors, instead of T calls of small passes
  (at the default job's batch of 512, per-call overhead is most of a gate's time);
- `compiled` runs the forward and backward math each as one torch.compile'd kernel (inductor: a
  C++ loop on CPU, Triton on CUDA); the first call of each shape compiles (seconds), later ones
  reuse it (batch sizes become dynamic after the first change);
- `native` runs them each as one numba loop on CPU float tensors (dselect_k_native.py: compiled
  once per dtype and cached on disk; forward also counts the active (example, expert) pairs for
  the layer's sparse/dense decision; dselect_k_native_available), and as `fused` elsewhere.

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
import importlib
import warnings
from collections.abc import Sequence
from typing import Any, Optional

import torch
from torch.autograd.function import once_differentiable

from recsys_moe.moe.gates.base import Gate, GateOutput
from recsys_moe.moe.gates.dselect_k import (
    ENTROPY_EPS,
    REACH_EPS,
    DSelectKGate,
    cubic,
    selector_stats_by_gate,
)


def _codes(s_XMB: torch.Tensor) -> list[torch.Tensor]:
    """Prefix products R_0 .. R_M: R_j [X, 2^j, B] over bits 0..j-1; R_M is r over all C codes.
    R_{j+1}[2a + 1] = R_j[a] s_j and R_{j+1}[2a] = R_j[a] (1 - s_j) = R_j[a] - R_j[a] s_j."""
    x, m, b = s_XMB.shape
    prefixes = [s_XMB.new_ones(x, 1, b)]
    for j in range(m):
        s_j = s_XMB[:, j : j + 1]
        r = prefixes[-1]
        if torch.compiler.is_compiling():  # inductor fuses the pair into one loop anyway
            hi = r * s_j
            prefixes.append(torch.stack([r - hi, hi], dim=2).view(x, -1, b))
            continue
        # eager: both halves written in place into the next prefix, no stacking copy
        pairs = r.new_empty(x, r.shape[1], 2, b)
        hi = torch.mul(r, s_j, out=pairs[:, :, 1])
        torch.sub(r, hi, out=pairs[:, :, 0])
        prefixes.append(pairs.view(x, -1, b))
    return prefixes


def forward_math(
    lin_THB: torch.Tensor,
    k: int,
    m: int,
    n: int,
    with_entropy: bool,
    with_reach: bool,
    hard: bool = False,
):
    """lin [T, H, B] (per gate, rows [0, K*M): u before the clamp; [K*M, H): mixing logits) ->
    (w [T, B, N], entropy [T] and reachability [T] summed over selectors and averaged over the
    batch, u [T*K, M, B], s [T*K, M, B], mix [T, K, B], and with_entropy the derivative of
    -r log(r + eps) in r, [T, K, N, B], for backward, else None; the prefix products R_0 ..
    R_M of the codes, for backward). hard: s is S rounded (u >= 1/2), the gate's
    hard_inference; u stays the soft one."""
    t, _, b = lin_THB.shape
    km = k * m
    u = lin_THB[:, :km].clamp(0.0, 1.0).reshape(t * k, m, b)
    s = (u >= 0.5).to(u.dtype) if hard else cubic(u)  # smooth_step
    prefixes = _codes(s)
    r = prefixes[-1][:, :n].reshape(t, k, n, b)
    mix = torch.softmax(lin_THB[:, km:], dim=1)  # over each gate's K selectors
    w_TBN = (mix.unsqueeze(2) * r).sum(1).transpose(1, 2).contiguous()
    zeros = lin_THB.new_zeros(t)
    ent, d_ent = zeros, None
    if with_entropy:  # its backward's passes over [T, K, N, B] made here, from what is at hand
        ent, d_ent = entropy_terms(r)
    reach = (1.0 / (r.sum(2) + REACH_EPS)).sum((1, 2)) / b if with_reach else zeros
    return w_TBN, ent, reach, u, s, mix, d_ent, prefixes


def entropy_terms(r_TKNB: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The entropy of the codes r [T, K, N, B], -r log(r + eps) summed over selectors and codes
    and averaged over the batch, [T], and its derivative for backward, -d(-r log(r + eps))/dr,
    [T, K, N, B] (the fused and native kernels' own, from what forward has at hand)."""
    r_eps = r_TKNB + ENTROPY_EPS
    log_r = torch.log(r_eps)
    return -(r_TKNB * log_r).sum((1, 2, 3)) / r_TKNB.shape[-1], log_r + r_TKNB / r_eps


def backward_math(
    grad_w_TBN: torch.Tensor,
    grad_ent_T: torch.Tensor,
    grad_reach_T: torch.Tensor,
    u: torch.Tensor,
    s: torch.Tensor,
    mix: torch.Tensor,
    d_ent: Optional[torch.Tensor],
    prefixes: Sequence[torch.Tensor],
    n: int,
    with_reach: bool,
) -> torch.Tensor:
    """The gradient of the affine outputs, [T, H, B], from those of forward_math's outputs
    (d_ent: forward_math's entropy derivative, None without the entropy term; prefixes: its
    prefix products of the codes)."""
    tk, m, b = u.shape
    t, k = mix.shape[:2]
    r = prefixes[-1][:, :n].reshape(t, k, n, b)
    g_TNB = grad_w_TBN.transpose(1, 2).contiguous()  # batch last, as everything else here
    g_mix = (g_TNB.unsqueeze(1) * r).sum(2)  # [T, K, B]
    g_alpha = mix * (g_mix - (mix * g_mix).sum(1, keepdim=True))  # softmax backward
    G = mix.unsqueeze(2) * g_TNB.unsqueeze(1)  # dL/dr [T, K, N, B]
    if d_ent is not None:  # d(-r log(r + eps))/dr = -d_ent
        G = torch.addcmul(G, (grad_ent_T / b).view(t, 1, 1, 1), d_ent, value=-1.0)
    if with_reach:
        scale = (grad_reach_T / b).view(t, 1, 1, 1)
        G = G - scale / (r.sum(2, keepdim=True) + REACH_EPS) ** 2
    G = G.reshape(tk, n, b)
    codes = prefixes[-1].shape[1]
    if n < codes:  # unreachable codes: no gradient
        G = torch.cat([G, G.new_zeros(tk, codes - n, b)], dim=1)
    g_s: list[torch.Tensor] = [u] * m  # placeholders: level j sets g_s[j]
    for j in range(m - 1, -1, -1):
        pairs = G.view(tk, -1, 2, b)  # [T*K, 2^j, 2, B]
        lo, diff = pairs[:, :, 0], pairs[:, :, 1] - pairs[:, :, 0]
        g_s[j] = (diff * prefixes[j]).sum(1)
        if j:  # G[2a] (1 - s_j) + G[2a + 1] s_j, as one pass
            G = torch.addcmul(lo, diff, s[:, j : j + 1])
    g_u = (torch.stack(g_s, dim=1) if m else u) * (6.0 * u * (1.0 - u))  # [T*K, M, B]
    return torch.cat([g_u.reshape(t, k * m, b), g_alpha], dim=1)


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
    def forward(ctx, x_BD, w_THD, b_TH, k, m, n, with_entropy, with_reach, kernel, hard, pairs):
        t, h, d = w_THD.shape
        lin = torch.addmm(b_TH.reshape(t * h, 1), w_THD.reshape(t * h, d), x_BD.t())
        lin = lin.view(t, h, x_BD.shape[0])
        # on lin's dtype: under autocast (a gate called outside the MoE layer) addmm gives bf16
        native = kernel == "native" and dselect_k_native_available(lin)
        if native:  # one compiled loop each way (dselect_k_native.py)
            w_TBN, ent, reach, u, mix, d_ent, pairs[0] = _native().forward_native(
                lin, k, m, n, with_entropy, with_reach, hard, REACH_EPS
            )
            ctx.save_for_backward(x_BD, w_THD, lin, mix, d_ent)
        else:
            w_TBN, ent, reach, u, s, mix, d_ent, prefixes = _run(
                kernel == "compiled", 0, lin, k, m, n, with_entropy, with_reach, hard
            )
            ctx.save_for_backward(x_BD, w_THD, u, s, mix, d_ent, *prefixes)
        ctx.options = (k, m, n, with_reach, kernel == "compiled", hard, native)
        ctx.mark_non_differentiable(u)
        return w_TBN, ent, reach, u

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_w_TBN, grad_ent, grad_reach, _grad_u):
        k, m, n, with_reach, compiled, hard, native = ctx.options
        if native:
            x_BD, w_THD, lin, mix, d_ent = ctx.saved_tensors
            g_THB = _native().backward_native(
                lin,
                mix,
                grad_w_TBN,
                grad_ent,
                grad_reach,
                d_ent,
                k,
                m,
                n,
                with_reach,
                hard,
                REACH_EPS,
            )
        else:
            x_BD, w_THD, u, s, mix, d_ent, *prefixes = ctx.saved_tensors
            if hard:  # rounded selectors: S is a step, flat almost everywhere; alpha still mixes
                u = torch.where((u > 0.0) & (u < 1.0), s, u)  # saturated there: 6u(1 - u) = 0
            g_THB = _run(
                compiled,
                1,
                grad_w_TBN.contiguous(),
                grad_ent,
                grad_reach,
                u,
                s,
                mix,
                d_ent,
                prefixes,
                n,
                with_reach,
            )
        t, h, d = w_THD.shape
        g = g_THB.reshape(t * h, x_BD.shape[0])  # [T*H, B]
        grad_x = g.t() @ w_THD.reshape(t * h, d) if ctx.needs_input_grad[0] else None
        grad_w = (g @ x_BD).view(t, h, d) if ctx.needs_input_grad[1] else None
        grad_b = g.sum(1).view(t, h) if ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_b, None, None, None, None, None, None, None, None


def dselect_k_native_available(x: torch.Tensor) -> bool:
    """Whether kernel=native runs its compiled loops on x (CPU, float32 or float64), rather
    than the fused kernel's torch math (also where numba cannot load: _native). Not while torch
    traces (torch.export, torch.compile): its fake tensors have no memory for the loops, and
    the fused math traces.

    Any number of experts and threads: the loops, single-threaded and tiled over the batch,
    measured faster than the fused math on 2 threads at every size tried (4 gates, k = 2,
    8 to 128 experts, batch 512 to 8192: README, "Benchmarks")."""
    return (
        x.device.type == "cpu"
        and x.dtype in (torch.float32, torch.float64)
        and type(x) is torch.Tensor  # not a tracer's subclass (FakeTensor, FunctionalTensor)
        and not torch.compiler.is_compiling()
        and _native() is not None
    )


@functools.cache
def _native():
    """The native loops' module, imported at the first use (numba takes 0.2-0.3 s to import),
    or None, with a warning, where numba cannot load or cache them (not installed, or neither
    this package's folder nor numba's user cache is writable): kernel=native then computes
    as fused, the same values."""
    try:
        native = importlib.import_module("recsys_moe.moe.gates.dselect_k_native")
    except (ImportError, RuntimeError, OSError) as e:
        warnings.warn(
            f"model.gate.kernel=native: its numba loops cannot load ({type(e).__name__}: {e}); "
            "the fused kernel's torch math computes the same values instead",
            RuntimeWarning,
            stacklevel=2,
        )
        return None
    return native


def _batch_key(gate: Gate):
    """Gates with equal keys run as one call; None: this gate takes its own forward."""
    if not (isinstance(gate, DSelectKGate) and gate.per_example and gate.kernel != "reference"):
        return None
    with_entropy = gate.entropy_on  # training, lambda > 0 now
    with_reach = gate.training and not gate.power_of_two
    return (gate.k, gate.num_experts, gate.kernel, with_entropy, with_reach, gate.hard)


def forward_gates(gates: Sequence[Gate], x_BD: torch.Tensor) -> list[GateOutput]:
    """[gate(x_BD) for gate in gates], with the per-example DSelect-k gates of the same shape,
    kernel and regularisers computed in one fused call (the same values and gradients)."""
    return stacked_forward_gates(gates, x_BD)[0]


def stacked_forward_gates(
    gates: Sequence[Gate], x_BD: torch.Tensor
) -> tuple[list[GateOutput], torch.Tensor, Optional[int]]:
    """forward_gates, every gate's weights stacked, [T, B, N] (the fused call's own output
    where it computed every gate: no copy, and no T slices to gather again in backward), and
    the number of (example, expert) pairs to which some gate gives a nonzero weight where the
    native kernel computed every gate and counted them (else None)."""
    groups: dict[Any, list[int]] = {}
    for i, gate in enumerate(gates):
        groups.setdefault(_batch_key(gate), []).append(i)
    outs: list[Optional[GateOutput]] = [None] * len(gates)
    for key, members in groups.items():
        if key is None:
            for i in members:
                outs[i] = gates[i](x_BD)
            continue
        group_outs, weights_TBN, pairs = _fused([gates[i] for i in members], x_BD, *key[3:])
        if len(members) == len(gates):  # one fused call computed them all, in order
            return group_outs, weights_TBN, pairs
        for i, out in zip(members, group_outs):
            outs[i] = out
    return outs, torch.stack([o.weights for o in outs]), None  # type: ignore[union-attr]


def fused_forward(gate: DSelectKGate, x_BD: torch.Tensor) -> GateOutput:
    """gate(x) for one per-example gate through _DSelectKFunction (DSelectKGate's hook)."""
    key = _batch_key(gate)
    return _fused([gate], x_BD, *key[3:])[0][0]


def _fused(
    gates: list[DSelectKGate],
    x_BD: torch.Tensor,
    with_entropy: bool,
    with_reach: bool,
    hard: bool = False,
) -> tuple[list[GateOutput], torch.Tensor, Optional[int]]:
    """The GateOutputs of the reference forward (weights, aux_loss, stats) for gates of one
    shape, in one _DSelectKFunction call, their weights [T, B, N], and the number of
    (example, expert) pairs with a nonzero weight in some of them (native kernel; else None)."""
    g0 = gates[0]
    # u = Z / gamma + 1/2 folded into each map, as the reference does (stacked once for all)
    scale = torch.stack([g.fold_scale for g in gates])  # [T, H]
    w = torch.stack([g.proj.weight for g in gates]) * scale.unsqueeze(-1)
    b = torch.stack([g.proj.bias for g in gates]) * scale + torch.stack(
        [g.fold_shift for g in gates]
    )
    pairs = [None]  # the native kernel counts the active (example, expert) pairs here
    weights_TBN, ent_T, reach_T, u = _DSelectKFunction.apply(
        x_BD,
        w,
        b,
        g0.k,
        g0.num_bits,
        g0.num_experts,
        with_entropy,
        with_reach,
        g0.kernel,
        hard,
        pairs,
    )
    u_TKMB = u.view(len(gates), g0.k, g0.num_bits, x_BD.shape[0])
    # every gate's regulariser at once; at lambda = 0 (entropy off) lambda * H is lambda itself
    aux_T: Optional[torch.Tensor] = None
    lams: list[Optional[torch.Tensor]] = [None] * len(gates)  # lambda: made where aux needs it
    if g0.training and g0.entropy_reg > 0:
        lams = [gate.current_entropy_reg() for gate in gates]
        aux_T = torch.stack(lams) * ent_T if with_entropy else torch.stack(lams)
    if with_reach:
        aux_T = reach_T if aux_T is None else aux_T + reach_T
    aux = [x_BD.new_zeros(())] * len(gates) if aux_T is None else list(aux_T.unbind())
    by_gate: dict[str, torch.Tensor] = {}  # every gate's stats, made when the first is read
    outs = [
        GateOutput(
            weights=weights_TBN[t], aux_loss=aux[t], stats_fn=_stats(gate, t, u_TKMB, lam, by_gate)
        )
        for t, (gate, lam) in enumerate(zip(gates, lams))
    ]
    return outs, weights_TBN, pairs[0]


def _stats(
    gate: DSelectKGate,
    t: int,
    u_TKMB: torch.Tensor,
    lam: Optional[torch.Tensor],
    by_gate: dict[str, torch.Tensor],
):
    """Gate t's stats_fn: selector_stats of its soft selectors, computed for every gate of the
    call at once when the first of them is read (one pass over [T, B*K, M], not T; kept in
    by_gate), and lambda (made when the stats are read where the forward did not need it: a
    forward outside training then reads nothing from the gate's schedule buffers, so it traces
    and exports also right after load_state_dict, when lambda would come from the buffers on
    the host)."""

    def stats() -> dict[str, torch.Tensor]:
        if not by_gate:
            T, K, M, B = u_TKMB.shape
            u = u_TKMB.permute(0, 3, 1, 2).reshape(T, B * K, M)  # as the reference: [B, K, M]
            by_gate["saturated"], by_gate["entropy"] = selector_stats_by_gate(u, gate.num_experts)
        return {
            "saturated_fraction": by_gate["saturated"][t],
            "selector_entropy": by_gate["entropy"][t],
            "entropy_reg": gate.current_entropy_reg() if lam is None else lam,
        }

    return stats
