"""DSelect-k (Hazimeh et al., NeurIPS 2021): a differentiable gate with exactly k-sparse weights.

Legend: B = examples, D = gate input width, N = experts, K = selectors (k), M = bits per code.

The method, as in ../shared/DSELECT_K.md and the authors' reference Keras layer:
- smooth-step S(t) = 3u^2 - 2u^3 with u = clamp(t / gamma + 1/2, 0, 1): exactly 0 for
  t <= -gamma/2, exactly 1 for t >= gamma/2, S(0) = 1/2, S'(0) = 3 / (2 gamma);
- a single-expert selector z in R^M gives r(z)_e = prod_j (s_j if bit j of e else 1 - s_j),
  with M = ceil(log2 N) bits, most significant first, over the N reachable codes only;
- the gate mixes K selectors: w = sum_i softmax(alpha)_i r(z_i);
- static gate: Z [K, M] and alpha [K] are parameters; per-example gate: Z(x) and alpha(x) are
  affine maps of the gate input x (one fused Linear here, the same parameters as two);
- init: Z (or its affine map) ~ U(-gamma/100, gamma/100), alpha (or its map) ~ U(-0.05, 0.05).

Regularisers (training only), returned as GateOutput.aux_loss:
- entropy: lambda * mean over the batch of sum_i H(r(z_i)), H(r) = -sum_e r_e log(r_e + 1e-6).
  The reference SUMS over the batch, which ties lambda to the batch size; we average, so
  lambda(batch B) here = lambda_reference * B. lambda follows the run, not the forward calls:
  it is 0 until the start of the schedule, then ramps linearly from 0 over the warm-up; start and
  warm-up are fractions of the run's training steps (or absolute steps). The trainer tells the
  gate where the run is with set_train_progress(step, total_steps) before each training forward;
  the position is kept in buffers saved with the model, so a resumed run continues the schedule,
  and a recomputed forward or an eval call never moves it. This is the reference's
  schedule_fn(num_calls), with the optimizer step in place of the call count;
- reachability (N not a power of two): mean over the batch of sum_i 1 / (sum_e r(z_i)_e + 1e-6),
  with coefficient 1 as in the reference (also summed over the batch there), so selectors do not
  park their mass on unreachable codes. Deviation from the reference: the + 1e-6 (as in the
  authors' follow-up, COMET). Without it a selector saturated on an unreachable code has
  sum_e r_e = 0 exactly and the penalty is +inf, which stops training with a non-finite loss.

Hard routing outside training (hard_inference, conf/model/gate/dselect_k.yaml sets it): in eval
mode every selector bit is rounded, s = 1 where Z >= 0 else 0 (the gamma -> 0 limit of S), so
every example gets at most k experts, exactly. Entropy pushes the *training* examples' selectors
out of the window, but S' = 0 there, so they stop just past its edge, and a fraction of unseen
examples (0.02-0.1% of the default job's eval (example, selector) pairs) still lands inside it,
with 3 experts on some examples at k = 2. Rounding changes the weights of those examples only
(a saturated selector is already 0 or 1): eval metrics, predict and export all see the routing
that serving pays for. The gate's "saturated_fraction" stat stays that of the soft selectors, so
it says how many were rounded. Training (and hard_inference=false) is the paper's soft gate.

Why the exact zeros matter: where w_e = 0, every path to it passes through a factor of S at a
flat point (S' = 0), so dw_e/dZ = dw_e/dalpha = 0 and experts with zero weight can be skipped
without changing values or gradients (see moe/layer.py, sparse mode).
"""

from __future__ import annotations

import functools
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from recsys_moe.moe.gates.base import Gate, GateOutput, check_k

ENTROPY_EPS = 1e-6  # inside the log of the entropy regulariser, as in the reference
REACH_EPS = 1e-6  # in the reachability penalty's denominator (COMET's; not in the reference)


def smooth_step(t: torch.Tensor, gamma: float) -> torch.Tensor:
    """Cubic smooth-step: 0 below -gamma/2, 1 above gamma/2, 3u^2 - 2u^3 in between."""
    return cubic((t / gamma + 0.5).clamp(0.0, 1.0))


def cubic(u: torch.Tensor) -> torch.Tensor:
    """S from u = clamp(t / gamma + 1/2, 0, 1): 3u^2 - 2u^3."""
    return u * u * (3.0 - 2.0 * u)


def num_bits(num_experts: int) -> int:
    """M = ceil(log2 N): bits of an expert code (0 for a single expert)."""
    return math.ceil(math.log2(num_experts)) if num_experts > 1 else 0


def binary_codes(num_experts: int) -> torch.Tensor:
    """[N, M] bool: row e is the M-bit code of expert e, most significant bit first."""
    m = num_bits(num_experts)
    e = torch.arange(num_experts)[:, None]
    shifts = torch.arange(m - 1, -1, -1)[None, :]
    return ((e >> shifts) & 1).bool()


def selector_outputs(s_XM: torch.Tensor, num_experts: int) -> torch.Tensor:
    """r [..., N] from smooth-stepped selectors s [..., M].

    r_e = prod_j (s_j if bit j of e else 1 - s_j). Built as the Kronecker product of the pairs
    (1 - s_j, s_j) with the first bit most significant, then cut to the N reachable codes:
    2^(M+1) multiplications per selector instead of N * M.
    """
    r = s_XM.new_ones(s_XM.shape[:-1] + (1,))
    for j in range(s_XM.shape[-1]):
        s_j = s_XM[..., j : j + 1]
        r = torch.stack([r * (1.0 - s_j), r * s_j], dim=-1).flatten(-2)
    return r[..., :num_experts]


def entropy(r: torch.Tensor) -> torch.Tensor:
    """H(r) over the last dim, as the reference computes it: -sum r log(r + 1e-6)."""
    return -(r * torch.log(r + ENTROPY_EPS)).sum(-1)


class DSelectKGate(Gate):
    """DSelect-k gate over N experts with at most k nonzero weights once its selectors saturate.

    forward(x [B, D]) -> GateOutput(weights [B, N], aux_loss, stats):
    stats: "saturated_fraction" (selectors whose M bits all left the smooth-step window),
    "selector_entropy" (mean H(r) per selector), "entropy_reg" (the current lambda).

    The entropy schedule: lambda = entropy_reg * clamp((step - start) / warmup, 0, 1) (a step
    at `start` when warmup is 0), where step is the training step of set_train_progress and
    start = entropy_start_step, or entropy_start_fraction * total_steps when no absolute step is
    given (likewise the warm-up). Until set_train_progress is first called the run's length is
    unknown: a schedule whose start is a positive fraction keeps lambda at 0 then.

    hard_inference: in eval mode, round every selector bit (S(Z) -> 1 where Z >= 0, else 0): at
    most k experts per example, exactly; the same weights wherever the selectors saturated. No
    gradient flows through the rounding (eval only).

    kernel: "reference" computes the per-example gate with the eager formulas below (the
    reference); "fused", "native" and "compiled" compute the same values and gradients in one
    autograd Function (moe/gates/dselect_k_fused.py; native: its math as numba loops on CPU,
    dselect_k_native.py). Static gates always take the reference path.

    Example:
        >>> gate = DSelectKGate(num_experts=16, in_dim=32, k=2)
        >>> out = gate(torch.randn(8, 32))
        >>> out.weights.shape, out.weights.sum(-1)      # [8, 16], all ones
    """

    sparse = True

    def __init__(
        self,
        num_experts: int,
        in_dim: int,
        k: int = 2,
        gamma: float = 1.0,
        per_example: bool = True,
        entropy_reg: float = 0.0,
        entropy_start_step: Optional[int] = None,
        entropy_warmup_steps: Optional[int] = None,
        entropy_start_fraction: float = 0.0,
        entropy_warmup_fraction: float = 0.0,
        kernel: str = "fused",
        hard_inference: bool = False,
    ) -> None:
        super().__init__(num_experts)
        _check(num_experts, k, gamma, entropy_reg)
        _check_kernel(kernel)
        _check_schedule("entropy_start", entropy_start_step, entropy_start_fraction)
        _check_schedule("entropy_warmup", entropy_warmup_steps, entropy_warmup_fraction)
        self.k = k
        self.gamma = gamma
        self.per_example = per_example
        self.entropy_reg = entropy_reg
        self.entropy_start_step = entropy_start_step
        self.entropy_warmup_steps = entropy_warmup_steps
        self.entropy_start_fraction = entropy_start_fraction
        self.entropy_warmup_fraction = entropy_warmup_fraction
        self.kernel = str(getattr(kernel, "value", kernel))  # see dselect_k_fused.py
        self.hard_inference = bool(hard_inference)
        self.num_bits = num_bits(num_experts)
        self.power_of_two = num_experts == 2**self.num_bits
        if per_example:
            # rows [0, K*M): selector logits Z(x); rows [K*M, K*M + K): mixing logits alpha(x)
            self.proj = nn.Linear(in_dim, k * self.num_bits + k)
            # u = Z / gamma + 1/2 folded into the map: scale and shift per output row
            km = k * self.num_bits
            scale = torch.cat([torch.full((km,), 1.0 / gamma), torch.ones(k)])
            shift = torch.cat([torch.full((km,), 0.5), torch.zeros(k)])
            self.register_buffer("fold_scale", scale, persistent=False)
            self.register_buffer("fold_shift", shift, persistent=False)
        else:
            self.z = nn.Parameter(torch.empty(k, self.num_bits))
            self.alpha = nn.Parameter(torch.empty(k))
        # where the run is (set_train_progress): drives lambda's schedule; saved with the model
        self.register_buffer("train_step", torch.zeros((), dtype=torch.long))
        self.register_buffer("total_steps", torch.zeros((), dtype=torch.long))
        # lambda at that position, made on the host (current_entropy_reg)
        self._progress: Optional[tuple[int, int]] = (0, 0)
        self._lam: Optional[torch.Tensor] = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        zr, ar = self.gamma / 100.0, 0.05
        if self.per_example:
            km = self.k * self.num_bits
            with torch.no_grad():
                nn.init.uniform_(self.proj.weight[:km], -zr, zr)
                nn.init.uniform_(self.proj.bias[:km], -zr, zr)
                nn.init.uniform_(self.proj.weight[km:], -ar, ar)
                nn.init.uniform_(self.proj.bias[km:], -ar, ar)
        else:
            nn.init.uniform_(self.z, -zr, zr)
            nn.init.uniform_(self.alpha, -ar, ar)

    def logits(self, x_BD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Selector logits Z [B, K, M] (static: [K, M]) and mixing logits alpha [B, K] (or [K])."""
        if not self.per_example:
            return self.z, self.alpha
        out = self.proj(x_BD)
        km = self.k * self.num_bits
        # the batch size spelt out: with one expert M = 0 and the reshape has no -1 to infer
        return out[:, :km].reshape(x_BD.shape[0], self.k, self.num_bits), out[:, km:]

    def _window_and_alpha(self, x_BD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """u = clamp(Z / gamma + 1/2, 0, 1) [B, K, M] and alpha [B, K] (static: [K, M], [K]).

        Per example, the scale 1/gamma and the shift 1/2 are folded into the affine map (a
        [K*M, D] weight, not a [B, K, M] activation): the same values and gradients as
        smooth_step(Z(x)), two fewer passes over the activations.
        """
        if not self.per_example:
            return (self.z / self.gamma + 0.5).clamp(0.0, 1.0), self.alpha
        km = self.k * self.num_bits
        w, b, scale = self.proj.weight, self.proj.bias, self.fold_scale
        out = F.linear(x_BD, w * scale[:, None], b * scale + self.fold_shift)
        u = out[:, :km].reshape(x_BD.shape[0], self.k, self.num_bits).clamp(0.0, 1.0)
        return u, out[:, km:]

    @property
    def hard(self) -> bool:
        """Round the selectors in this forward (hard_inference, in eval mode)."""
        return self.hard_inference and not self.training

    def set_train_progress(self, step: int, total_steps: int) -> None:
        """The run is at training step `step` (0-based: optimizer steps taken so far) of
        `total_steps`. Called by the trainer before each training forward."""
        if step < 0 or total_steps < 0:
            raise ValueError(f"set_train_progress({step}, {total_steps}): both must be >= 0")
        self.train_step.fill_(step)
        if self._progress is None or self._progress[1] != total_steps:  # once a run, not a step
            self.total_steps.fill_(total_steps)
        self._lam = None
        self._progress = (step, total_steps)

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._lam, self._progress = None, None  # the buffers hold a position set elsewhere

    def entropy_reg_at(self, step: int, total_steps: int) -> float:
        """lambda at training step `step` of a run of `total_steps`: 0 before the start, then a
        linear ramp from 0 to entropy_reg over the warm-up (a step at the start when the warm-up
        is 0). The start and warm-up are the absolute steps where given, else the fractions of
        total_steps; a start that is a positive fraction of a run of unknown length (0 steps)
        never comes: lambda stays 0."""
        if self.entropy_start_step is not None:
            start = float(self.entropy_start_step)
        elif self.entropy_start_fraction > 0 and total_steps <= 0:
            start = math.inf
        else:
            start = self.entropy_start_fraction * total_steps
        if self.entropy_warmup_steps is not None:
            warmup = float(self.entropy_warmup_steps)
        else:
            warmup = self.entropy_warmup_fraction * total_steps
        since = step - start
        ramp = min(max(since / warmup, 0.0), 1.0) if warmup > 0 else float(since >= 0)
        return self.entropy_reg * ramp

    def entropy_reg_now(self) -> float:
        """lambda now, on the host: entropy_reg_at the position of set_train_progress, or of the
        buffers a checkpoint loaded (only the first call after load_state_dict reads them: a
        host sync; set_train_progress never needs one)."""
        if self._progress is None:
            self._progress = (int(self.train_step), int(self.total_steps))
        return self.entropy_reg_at(*self._progress)

    def current_entropy_reg(self) -> torch.Tensor:
        """entropy_reg_now as a float64 device tensor, made once per position: the schedule is
        host arithmetic, not a dozen device ops per forward. Made by a fill on the device (no
        host-to-device copy, which would wait for the device's stream)."""
        device = self.train_step.device
        if self._lam is None or self._lam.device != device:
            lam = self.entropy_reg_now()
            self._lam = torch.full((), lam, dtype=torch.float64, device=device)
        return self._lam

    @property
    def entropy_on(self) -> bool:
        """Whether this forward computes the entropy term: in training, while lambda > 0. At
        lambda = 0 the term adds lambda * H = 0 and no gradient, so H is not computed (the
        first half of the default schedule)."""
        return self.training and self.entropy_reg > 0 and self.entropy_reg_now() > 0

    def forward(self, x_BD: torch.Tensor) -> GateOutput:
        if self.per_example and self.kernel != "reference":
            # the same values and gradients in one autograd Function (moe/gates/dselect_k_fused.py)
            from recsys_moe.moe.gates.dselect_k_fused import fused_forward

            return fused_forward(self, x_BD)
        u, alpha = self._window_and_alpha(x_BD)
        if self.hard:  # S rounded: 1 where Z >= 0 (u >= 1/2), else 0
            s = (u >= 0.5).to(u.dtype)
        else:
            s = cubic(u)  # smooth_step(Z, gamma)
        r = selector_outputs(s, self.num_experts)  # [B, K, N] or [K, N]
        mix = torch.softmax(alpha, dim=-1)  # softmax over the K selectors, not the experts
        w = (mix.unsqueeze(-1) * r).sum(-2)  # [B, N] or [N]
        if not self.per_example:
            w = w.expand(x_BD.shape[0], -1)

        aux = x_BD.new_zeros(())
        lam = self.current_entropy_reg()
        if self.training:
            if self.entropy_on:
                # mean over the batch (the reference sums), of the sum over the K selectors
                aux = aux + lam * entropy(r).sum(-1).mean()
            elif self.entropy_reg > 0:
                aux = aux + lam  # lambda * H at lambda = 0: zero, in lambda's dtype as above
            if not self.power_of_two:
                # + REACH_EPS: finite even when a selector saturates on an unreachable code
                aux = aux + (1.0 / (r.sum(-1) + REACH_EPS)).sum(-1).mean()

        stats = functools.partial(selector_stats, u.detach(), self.num_experts, lam)
        return GateOutput(weights=w, aux_loss=aux, stats_fn=stats)


def selector_stats(u: torch.Tensor, num_experts: int, lam: torch.Tensor) -> dict[str, torch.Tensor]:
    """A gate's own stats from its soft selectors u [..., M] (before any hard_inference
    rounding): the fraction saturated (every bit outside the window, u exactly 0 or 1), their
    mean entropy, and lambda now. Computed on demand (GateOutput.stats)."""
    u_1XM = u.reshape(1, math.prod(u.shape[:-1]), u.shape[-1])  # M may be 0 (one expert)
    saturated, selector_entropy = selector_stats_by_gate(u_1XM, num_experts)
    return {
        "saturated_fraction": saturated[0],
        "selector_entropy": selector_entropy[0],
        "entropy_reg": lam,
    }


def selector_stats_by_gate(
    u_TXM: torch.Tensor, num_experts: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """selector_stats' saturated fraction and mean selector entropy of T gates at once, [T]
    each, from their soft selectors u [T, X, M] (X: every selector of a gate)."""
    saturated = ((u_TXM == 0.0) | (u_TXM == 1.0)).all(-1).float().mean(1)
    return saturated, entropy(selector_outputs(cubic(u_TXM), num_experts)).mean(1)


def _check(num_experts: int, k: int, gamma: float, entropy_reg: float) -> None:
    check_k(num_experts, k)
    if not gamma > 0:
        raise ValueError(f"model.gate.gamma ({gamma}) must be > 0")
    if entropy_reg < 0:
        raise ValueError(f"model.gate.entropy_reg ({entropy_reg}) must be >= 0")


def _check_kernel(kernel: str) -> None:
    if str(getattr(kernel, "value", kernel)) not in ("reference", "fused", "compiled", "native"):
        raise ValueError(
            f"model.gate.kernel ({kernel}) must be reference, fused, compiled or native"
        )


def _check_schedule(name: str, steps: Optional[int], fraction: float) -> None:
    """<name>_step(s) (absolute, optional) and <name>_fraction (of the run's steps)."""
    key = "entropy_start_step" if name == "entropy_start" else "entropy_warmup_steps"
    if steps is not None and steps < 0:
        raise ValueError(f"model.gate.{key} ({steps}) must be >= 0")
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"model.gate.{name}_fraction ({fraction}) must be in [0, 1]")
