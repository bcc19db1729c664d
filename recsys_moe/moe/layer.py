"""Multi-task mixture-of-experts layer: T gates over one shared bank of N experts.

Legend: T = tasks, B = examples, D = input width, N = experts, O = expert output width.

Compute modes (model.expert_compute):
- dense: every expert on every example, y_t = sum_e w_t,e f_e(x) as one batched matmul;
- sparse: each expert only on the examples to which some task gives it a nonzero weight (the
  union over tasks), then each task combines its own weights. Exact, not approximate: where all
  weights of a pair are 0.0, the dense path adds 0 * f_e(x) and the gates' gradients there are
  exactly zero (DSelect-k and Top-k), so outputs and gradients are the same;
- auto: sparse when at most `sparse_max_active_fraction` of the (example, expert) pairs are
  active in this batch (averaged over the expert-parallel group, so that all its ranks take the
  same path), else dense. Gates that are never sparse (softmax) always run dense.

Where the experts are is the dispatcher's business (moe/dispatch): all of them on this device
(LocalDispatcher), or split over an expert-parallel group (AllToAllDispatcher, installed by
distributed/expert_parallel.py with `use_experts`).

Mixed precision (under torch.autocast, trainer.precision=bf16): the gates route in fp32 (the
selection is sensitive to rounding, as routers usually are kept), the examples go to the experts
in the autocast dtype (half the all-to-all bytes), the experts and the dense mixing run in it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

from recsys_moe.config.schema import ExpertCompute
from recsys_moe.moe.dispatch.base import Dispatcher
from recsys_moe.moe.dispatch.local import LocalDispatcher
from recsys_moe.moe.experts import ExpertBank
from recsys_moe.moe.gates.base import Gate, GateOutput
from recsys_moe.moe.gates.dselect_k_fused import stacked_forward_gates
from recsys_moe.moe.grouped import autocast_dtype


@dataclass
class MoEOutput:
    """y: [T, B, O] per-task mixtures; gates: each task's GateOutput (weights [B, N]);
    stats: "active_fraction" (active pairs / (B * N), union over tasks; only measured when the
    layer needs it) and "sparse" (1.0 when the sparse path ran)."""

    y: torch.Tensor
    gates: list[GateOutput]
    stats: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def aux_loss(self) -> torch.Tensor:
        return torch.stack([g.aux_loss for g in self.gates]).sum()


class MultiTaskMoE(nn.Module):
    """y_t = sum_e w_t,e(x) f_e(x) for every task t (MMoE layout, any gate).

    forward(x [B, D]) -> MoEOutput with y [T, B, O].

    Example:
        >>> moe = MultiTaskMoE(ExpertBank(4, 8, [16], 8), [SoftmaxGate(4, 8) for _ in range(2)])
        >>> moe(torch.randn(3, 8)).y.shape
        torch.Size([2, 3, 8])
    """

    def __init__(
        self,
        experts: ExpertBank,
        gates: Sequence[Gate],
        compute: ExpertCompute = ExpertCompute.auto,
        sparse_max_active_fraction: float = 0.5,
        dispatcher: Optional[Dispatcher] = None,
    ) -> None:
        super().__init__()
        for t, g in enumerate(gates):
            if g.num_experts != experts.num_experts:
                raise ValueError(
                    f"gate {t} routes over {g.num_experts} experts, the bank has {experts.num_experts}"
                )
        if not 0.0 <= sparse_max_active_fraction <= 1.0:
            raise ValueError(
                f"model.sparse_max_active_fraction ({sparse_max_active_fraction}) must be in [0, 1]"
            )
        self.experts = experts
        self.gates = nn.ModuleList(gates)
        self.compute = ExpertCompute(compute)
        self.sparse_max_active_fraction = sparse_max_active_fraction
        self.dispatcher: Dispatcher = dispatcher or LocalDispatcher()
        self.any_sparse_gate = any(g.sparse for g in gates)

    def set_train_progress(self, step: int, total_steps: int) -> None:
        """Forwards the run's position to every gate (see Gate.set_train_progress)."""
        for g in self.gates:
            g.set_train_progress(step, total_steps)

    def use_experts(self, experts: ExpertBank, dispatcher: Dispatcher) -> None:
        """Replaces the bank and its dispatcher (expert parallelism: a rank's own experts and the
        all-to-all that reaches the others)."""
        self.experts = experts
        self.dispatcher = dispatcher

    def _sparse_path(
        self, w_TBN: torch.Tensor, stats: dict[str, torch.Tensor], pairs: Optional[int] = None
    ) -> tuple[bool, Optional[torch.Tensor]]:
        """Whether this step runs sparse, and the nonzero mask when it was computed. `auto`
        decides on the active fraction that the dispatcher's group agrees on, so every rank of
        an expert-parallel group takes the same path (and runs the same collectives).
        pairs: the active (example, expert) pairs where the gates counted them already."""
        if self.compute == ExpertCompute.dense or not self.any_sparse_gate:
            return False, None
        if self.compute == ExpertCompute.auto and pairs is not None:
            _, b, n = w_TBN.shape
            frac = torch.tensor(pairs / max(b * n, 1), dtype=torch.float32, device=w_TBN.device)
            stats["active_fraction"] = frac = self.dispatcher.agree(frac)
            return frac.item() <= self.sparse_max_active_fraction, None  # the plan masks
        nonzero_TBN = w_TBN.detach() != 0  # reused by the plan
        frac = nonzero_TBN.any(0).float().mean()
        if self.compute == ExpertCompute.sparse:
            stats["active_fraction"] = frac
            return True, nonzero_TBN
        stats["active_fraction"] = frac = self.dispatcher.agree(frac)
        return frac.item() <= self.sparse_max_active_fraction, nonzero_TBN  # host sync: the path

    def forward(self, x_BD: torch.Tensor) -> MoEOutput:
        amp = autocast_dtype(x_BD)
        with torch.autocast(x_BD.device.type, enabled=False):  # gates in full precision
            x_gate = x_BD.float() if x_BD.element_size() < 4 else x_BD
            # DSelect-k's: one fused call, whose [T, B, N] output is w_TBN itself
            outs, w_TBN, pairs = stacked_forward_gates(self.gates, x_gate)
        stats: dict[str, torch.Tensor] = {}
        sparse, nonzero_TBN = self._sparse_path(w_TBN, stats, pairs)
        plan = self.dispatcher.plan(w_TBN.detach(), sparse, nonzero_TBN)
        x_in = self.dispatcher.dispatch(x_BD if amp is None else x_BD.to(amp), plan)
        f = self.experts.forward_grouped(x_in, plan.counts) if plan.grouped else self.experts(x_in)
        y_TBO = self.dispatcher.combine(f, w_TBN, plan)
        stats.update(plan.stats)
        stats["sparse"] = x_BD.new_tensor(float(sparse))
        return MoEOutput(y=y_TBO, gates=outs, stats=stats)
