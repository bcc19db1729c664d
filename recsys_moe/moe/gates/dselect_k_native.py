"""DSelect-k's per-example gate math as two compiled CPU loops (model.gate.kernel=native).

Legend: T = gates, H = K*M + K affine outputs per gate, K = selectors, M = bits per code,
C = 2^M codes, N = experts (the first N codes), B = examples.

The same math as dselect_k_fused.forward_math and backward_math, on the same [T, H, B] affine
outputs, in one numba loop each way instead of about 30 torch operators each way. At the default
job's shapes (4 gates, 8 experts, batch 512) every one of those operators works on a few
thousand values, so the time went to their per-call cost, not to the arithmetic. The loops
run batch-innermost over contiguous rows, so LLVM vectorises them. Each kernel is
compiled once per dtype and cached on disk (numba's cache=True).

Forward also counts the (example, expert) pairs to which some gate gives a nonzero weight:
the MoE layer's sparse/dense decision, which otherwise takes four operators over [T, B, N].

The softmax of the mixing logits and the entropy's logs are torch operators (vectorised exp
and log; the loops would call them one value at a time). Backward recomputes the selectors
and the code tree from the affine outputs (cheaper here than keeping them) and takes the
mixing weights and the entropy's derivative in r from forward.

The loops run the batch in tiles of 128 to 512 examples (tile()), every gate of a tile before
the next tile, so a tile's code tree and weights stay in the core's cache: at 64 experts and
batch 4096 the tree of the whole batch is 2 MiB, and the untiled loops took 1.3x (backward) to
2x (forward) the tiled ones' time. The loops run on one thread, and measured faster than the
fused kernel's torch math on 2 threads at every size tried (README, "Benchmarks"), so
`native` runs them on every CPU float tensor (dselect_k_fused.dselect_k_native_available); on
other devices and dtypes, the fused kernel's torch math (dselect_k_fused.py).
"""

from __future__ import annotations

from typing import Optional

import numba
import numpy as np
import torch

from recsys_moe.moe.gates.dselect_k_fused import entropy_terms

# Compiled at the first call of each dtype, then cached on disk next to this file, or in
# numba's user cache where that folder is read-only (where neither is writable, numba raises
# here and kernel=native computes as fused: dselect_k_fused._native). nogil: loader threads
# run meanwhile. fastmath without its no-NaN/no-inf assumptions: a NaN weight must stay NaN
# and count as active, as on the fused path.
_jit = numba.njit(
    cache=True,
    nogil=True,
    error_model="numpy",
    fastmath={"reassoc", "contract", "arcp", "nsz", "afn"},
)


# Examples per tile of the loops: as many as keep a tile's code tree, 2 * 2^M values per
# example, within 16K values, and from 128 to 512. Forward + backward, float32
# (docs/benchmarks.md): at 64 experts (one gate, batch 4096) 128 was the fastest (256 and 512
# took up to 1.15x and 1.4x its time); at 8 experts (4 gates, batch 8192) 512 was as fast as
# any, and 64 up to 1.3x slower.
TILE_VALUES = 16384
TILE_MIN, TILE_MAX = 128, 512


def tile(m: int) -> int:
    """Examples per tile of the loops for codes of M bits."""
    return min(max(TILE_VALUES // (2 << m), TILE_MIN), TILE_MAX)


_NP = {torch.float32: np.float32, torch.float64: np.float64}


def _consts(dtype: torch.dtype, reach_eps: float, batch: int) -> np.ndarray:
    """The loops' constants in the data's dtype (a float64 literal, or an int divisor, would
    promote float32 math to float64)."""
    return np.array([0.0, 1.0, 2.0, 3.0, 0.5, 6.0, batch, reach_eps], dtype=_NP[dtype])


@_jit
def _forward_loop(
    lin, mix, k, m, n, hard, with_entropy, with_reach, consts, width, w, u, reach, r_out
):
    """w [T, B, N], u [T*K, M, B], reach [T] (0 without with_reach) and (with_entropy) the
    codes r_out [T, K, N, B] from lin [T, H, B] and the mixing weights mix [T, K, B]; returns
    the number of (example, expert) pairs with a nonzero weight in some gate. The batch runs
    in tiles of `width` examples, every gate of a tile before the next tile: the tile's code
    tree and weights stay in cache."""
    zero, one, reach_eps = consts[0], consts[1], consts[7]
    t_n, _, b_n = lin.shape
    codes = 1 << m
    last = codes - 1
    prefixes = np.empty((2 * codes, width), lin.dtype)  # level j: rows [2^j - 1, 2^(j+1) - 1)
    s = np.empty((m, width), lin.dtype)
    w_nb = np.empty((n, width), lin.dtype)
    r_sum = np.empty(width, lin.dtype)
    active = np.empty((n, width), np.bool_)
    reach[:] = zero
    pairs = 0
    for b0 in range(0, b_n, width):
        bt = min(width, b_n - b0)
        active[:] = False
        for t in range(t_n):
            w_nb[:] = zero
            for kk in range(k):
                for j in range(m):
                    _selector(
                        lin[t, kk * m + j, b0 : b0 + bt],
                        hard,
                        consts,
                        u[t * k + kk, j, b0 : b0 + bt],
                        s[j],
                    )
                _code_tree(s, m, bt, one, prefixes)
                mix_k = mix[t, kk, b0 : b0 + bt]
                for c in range(n):
                    r, w_c = prefixes[last + c], w_nb[c]
                    for b in range(bt):
                        w_c[b] += mix_k[b] * r[b]
                    if with_entropy:  # its logs are torch's (vectorised), on these codes
                        r_c = r_out[t, kk, c, b0 : b0 + bt]
                        for b in range(bt):
                            r_c[b] = r[b]
                if with_reach:
                    _code_sums(prefixes, last, n, bt, zero, r_sum)
                    acc = zero
                    for b in range(bt):
                        acc += one / (r_sum[b] + reach_eps)
                    reach[t] += acc
            for c in range(n):
                w_c, act_c = w_nb[c], active[c]
                for b in range(bt):
                    act_c[b] |= w_c[b] != zero
            for b in range(bt):  # [N, tile] -> the layer's [B, N]
                for c in range(n):
                    w[t, b0 + b, c] = w_nb[c, b]
        for c in range(n):
            act_c = active[c]
            for b in range(bt):
                pairs += act_c[b]
    for t in range(t_n):
        reach[t] /= consts[6]  # the batch size, in the data's dtype
    return pairs


@_jit
def _backward_loop(
    lin, mix, g_w, grad_ent, grad_reach, d_ent, k, m, n, hard, with_reach, consts, width, g_lin
):
    """The gradient g_lin [T, H, B] of lin from those of w [T, B, N], the entropy [T] and the
    reachability [T] (d_ent: the entropy's derivative in r, [T, K, N, B], or empty), in tiles of
    `width` examples as forward."""
    zero, one, six, reach_eps = consts[0], consts[1], consts[5], consts[7]
    t_n, _, b_n = lin.shape
    km, codes = k * m, 1 << m
    last = codes - 1
    with_entropy = d_ent.shape[0] > 0
    prefixes = np.empty((2 * codes, width), lin.dtype)
    grads = np.empty((codes, width), lin.dtype)  # dL/d(codes of the current level)
    u = np.empty((m, width), lin.dtype)  # the tile's selectors before the step
    s = np.empty((m, width), lin.dtype)
    g_mix = np.empty((k, width), lin.dtype)
    g_nb = np.empty((n, width), lin.dtype)
    r_sum = np.empty(width, lin.dtype)
    g_s = np.empty(width, lin.dtype)
    dot = np.empty(width, lin.dtype)
    for b0 in range(0, b_n, width):
        bt = min(width, b_n - b0)
        for t in range(t_n):
            for b in range(bt):  # batch last, as everything else here
                for c in range(n):
                    g_nb[c, b] = g_w[t, b0 + b, c]
            g_ent, g_reach = grad_ent[t], grad_reach[t]  # divided by B already
            for kk in range(k):
                for j in range(m):
                    _selector(lin[t, kk * m + j, b0 : b0 + bt], hard, consts, u[j], s[j])
                _code_tree(s, m, bt, one, prefixes)
                if with_reach:
                    _code_sums(prefixes, last, n, bt, zero, r_sum)
                mix_k, g_mix_k = mix[t, kk, b0 : b0 + bt], g_mix[kk]
                g_mix_k[:] = zero
                for c in range(n):
                    r, g_c, out = prefixes[last + c], g_nb[c], grads[c]
                    for b in range(bt):
                        g_mix_k[b] += g_c[b] * r[b]
                        out[b] = mix_k[b] * g_c[b]
                    if with_entropy:  # d(-r log(r + eps))/dr = -d_ent
                        d_row = d_ent[t, kk, c, b0 : b0 + bt]
                        for b in range(bt):
                            out[b] -= g_ent * d_row[b]
                    if with_reach:
                        for b in range(bt):
                            d = r_sum[b] + reach_eps
                            out[b] -= g_reach / (d * d)
                grads[n:] = zero  # unreachable codes: no gradient
                for j in range(m - 1, -1, -1):  # walk the code tree back, level by level
                    level, s_row = (1 << j) - 1, s[j]
                    g_s[:] = zero
                    for a in range(1 << j):
                        lo, hi, r = grads[2 * a], grads[2 * a + 1], prefixes[level + a]
                        to = grads[a]  # a <= 2a: written after both are read
                        for b in range(bt):
                            diff = hi[b] - lo[b]
                            g_s[b] += diff * r[b]
                            to[b] = lo[b] + diff * s_row[b]
                    u_row, out = u[j], g_lin[t, kk * m + j, b0 : b0 + bt]
                    if hard:  # rounded selectors: S is flat where unsaturated, as the fused kernel
                        for b in range(bt):
                            if zero < u_row[b] < one:
                                u_row[b] = s_row[b]
                    for b in range(bt):  # dS/du = 6u(1 - u): 0 where the clamp saturates
                        out[b] = g_s[b] * (six * u_row[b] * (one - u_row[b]))
            dot[:] = zero  # softmax backward
            for kk in range(k):
                mix_k, g_mix_k = mix[t, kk, b0 : b0 + bt], g_mix[kk]
                for b in range(bt):
                    dot[b] += mix_k[b] * g_mix_k[b]
            for kk in range(k):
                mix_k, g_mix_k = mix[t, kk, b0 : b0 + bt], g_mix[kk]
                out = g_lin[t, km + kk, b0 : b0 + bt]
                for b in range(bt):
                    out[b] = mix_k[b] * (g_mix_k[b] - dot[b])


@_jit
def _selector(row, hard, consts, u_row, s_row):
    """u = clamp(row, 0, 1) and the smooth step S = 3u^2 - 2u^3 (hard: u >= 1/2), over the
    tile's examples (row's length): u into u_row, S into s_row."""
    zero, one, two, three, half = consts[0], consts[1], consts[2], consts[3], consts[4]
    for b in range(row.shape[0]):
        u_row[b] = min(max(row[b], zero), one)
    if hard:
        for b in range(row.shape[0]):
            s_row[b] = one if u_row[b] >= half else zero
    else:
        for b in range(row.shape[0]):
            x = u_row[b]
            s_row[b] = x * x * (three - two * x)


@_jit
def _code_tree(s, m, bt, one, prefixes):
    """Prefix products of the codes over the tile's first bt examples, most significant bit
    first: level j + 1 holds R[2a + 1] = R_j[a] s_j and R[2a] = R_j[a] - R_j[a] s_j (as
    dselect_k_fused._codes)."""
    for b in range(bt):
        prefixes[0, b] = one
    for j in range(m):
        src, dst = (1 << j) - 1, (1 << (j + 1)) - 1
        s_row = s[j]
        for a in range(1 << j):
            r, lo, hi = prefixes[src + a], prefixes[dst + 2 * a], prefixes[dst + 2 * a + 1]
            for b in range(bt):
                x = r[b] * s_row[b]
                hi[b] = x
                lo[b] = r[b] - x


@_jit
def _code_sums(prefixes, last, n, bt, zero, out):
    """out[b] = sum over the reachable codes (rows last .. last + n of prefixes) of r, over the
    tile's first bt examples."""
    for b in range(bt):
        out[b] = zero
    for c in range(n):
        for b in range(bt):
            out[b] += prefixes[last + c, b]


def forward_native(
    lin_THB: torch.Tensor,
    k: int,
    m: int,
    n: int,
    with_entropy: bool,
    with_reach: bool,
    hard: bool,
    reach_eps: float,
) -> tuple:
    """lin [T, H, B] (a CPU tensor of float32 or float64) -> (w [T, B, N], entropy [T],
    reachability [T], u [T*K, M, B], mix [T, K, B], the entropy's derivative in r
    [T, K, N, B] or None, and the number of (example, expert) pairs with a nonzero weight in
    some gate, an int): forward_math's values, and what backward_native reads."""
    lin = lin_THB.contiguous()
    t, _, b = lin.shape
    mix = torch.softmax(lin[:, k * m :], dim=1)  # over each gate's K selectors
    w, u, reach = lin.new_empty(t, b, n), lin.new_empty(t * k, m, b), lin.new_empty(t)
    r = lin.new_empty(t, k, n, b) if with_entropy else lin.new_empty(0, 0, 0, 0)
    pairs = _forward_loop(
        lin.numpy(),
        mix.numpy(),
        k,
        m,
        n,
        hard,
        with_entropy,
        with_reach,
        _consts(lin.dtype, reach_eps, b),
        tile(m),
        w.numpy(),
        u.numpy(),
        reach.numpy(),
        r.numpy(),
    )
    ent, d_ent = entropy_terms(r) if with_entropy else (lin.new_zeros(t), None)
    return w, ent, reach, u, mix, d_ent, int(pairs)


def backward_native(
    lin_THB: torch.Tensor,
    mix_TKB: torch.Tensor,
    grad_w_TBN: torch.Tensor,
    grad_ent_T: torch.Tensor,
    grad_reach_T: torch.Tensor,
    d_ent: Optional[torch.Tensor],
    k: int,
    m: int,
    n: int,
    with_reach: bool,
    hard: bool,
    reach_eps: float,
) -> torch.Tensor:
    """The gradient of the affine outputs, [T, H, B], as backward_math gives it (mix and d_ent:
    forward_native's)."""
    lin = lin_THB.contiguous()
    g_lin = torch.empty_like(lin)
    b = lin.shape[2]
    _backward_loop(
        lin.numpy(),
        mix_TKB.numpy(),
        grad_w_TBN.contiguous().numpy(),
        (grad_ent_T / b).to(lin.dtype).contiguous().numpy(),  # as backward_math: per example
        (grad_reach_T / b).to(lin.dtype).contiguous().numpy(),
        (d_ent if d_ent is not None else lin.new_empty(0, 0, 0, 0)).numpy(),
        k,
        m,
        n,
        hard,
        with_reach,
        _consts(lin.dtype, reach_eps, b),
        tile(m),
        g_lin.numpy(),
    )
    return g_lin


def warm() -> None:
    """Compiles (or loads from the disk cache) both loops for float32 and float64: `make install`
    and the images run it, so that the first training step does not wait for the compiler."""
    for dtype in (torch.float32, torch.float64):
        lin = torch.linspace(-1.0, 2.0, 2 * 8 * 3, dtype=dtype).view(2, 8, 3)  # T=2, K=2, M=3
        for with_entropy, hard in ((False, False), (True, True)):
            w, _, _, _, mix, d_ent, _ = forward_native(lin, 2, 3, 8, with_entropy, True, hard, 1e-6)
            backward_native(
                lin,
                mix,
                torch.ones_like(w),
                lin.new_ones(2),
                lin.new_ones(2),
                d_ent,
                2,
                3,
                8,
                True,
                hard,
                1e-6,
            )


if __name__ == "__main__":
    warm()
