"""Local (single-device) dispatch: group the active (example, expert) pairs by expert, and
combine expert outputs back into per-task mixtures.

Legend: T = tasks, B = examples, N = experts, D = input width, O = output width,
P = active (example, expert) pairs.

This is the only MoE code that knows where examples go; an all-to-all dispatcher for experts on
other ranks keeps the same three steps (plan, dispatch, combine).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class DispatchPlan:
    """The active pairs, sorted by expert.

    example_ids: [P] example of each pair; expert_ids: [P] its expert (non-decreasing);
    counts: pairs per expert (host ints, N of them).
    """

    example_ids: torch.Tensor
    expert_ids: torch.Tensor
    counts: list[int]

    @property
    def num_pairs(self) -> int:
        return int(self.example_ids.numel())


class LocalDispatcher:
    """Example:
    >>> d = LocalDispatcher()
    >>> plan = d.plan(weights_TBN)                 # pairs some task gives nonzero weight
    >>> y_TBO = d.combine(experts.forward_grouped(d.dispatch(x_BD, plan), plan.counts), weights_TBN, plan)
    """

    def plan(self, weights_TBN: torch.Tensor) -> DispatchPlan:
        """Pairs (b, e) with weights_TBN[t, b, e] != 0 for some task t (the union over tasks)."""
        active_NB = (weights_TBN != 0).any(0).t()
        counts = active_NB.sum(1).tolist()  # one host sync: the group sizes are needed on the host
        expert_ids, example_ids = active_NB.nonzero(as_tuple=True)  # row-major: sorted by expert
        return DispatchPlan(example_ids=example_ids, expert_ids=expert_ids, counts=counts)

    def dispatch(self, x_BD: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
        """x rows of every pair, grouped by expert: [P, D]."""
        return x_BD.index_select(0, plan.example_ids)

    def combine(
        self, f_PO: torch.Tensor, weights_TBN: torch.Tensor, plan: DispatchPlan
    ) -> torch.Tensor:
        """y[t, b] = sum over pairs (b, e) of weights[t, b, e] * f(pair): [T, B, O]."""
        T, B, _ = weights_TBN.shape
        w_TP = weights_TBN[:, plan.example_ids, plan.expert_ids]
        contrib_TPO = w_TP.unsqueeze(-1) * f_PO.unsqueeze(0)
        y = f_PO.new_zeros(T, B, f_PO.shape[1])
        return y.index_add(1, plan.example_ids, contrib_TPO)
