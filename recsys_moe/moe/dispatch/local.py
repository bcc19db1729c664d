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
    """The active pairs, sorted by expert, and which tasks use each of them.

    example_ids: [P] example of each pair; expert_ids: [P] its expert (non-decreasing);
    counts: pairs per expert (host ints, N of them);
    use_pairs, use_tasks: [Q] the (pair, task) uses with a nonzero weight (Q <= T * P): combine
    touches only those, not every task for every pair of the union.
    """

    example_ids: torch.Tensor
    expert_ids: torch.Tensor
    counts: list[int]
    use_pairs: torch.Tensor
    use_tasks: torch.Tensor

    @property
    def num_pairs(self) -> int:
        return int(self.example_ids.numel())


class LocalDispatcher:
    """Example:
    >>> d = LocalDispatcher()
    >>> plan = d.plan(weights_TBN)                 # pairs some task gives nonzero weight
    >>> y_TBO = d.combine(experts.forward_grouped(d.dispatch(x_BD, plan), plan.counts), weights_TBN, plan)
    """

    def plan(
        self, weights_TBN: torch.Tensor, nonzero_TBN: torch.Tensor | None = None
    ) -> DispatchPlan:
        """Pairs (b, e) with weights_TBN[t, b, e] != 0 for some task t (the union over tasks).

        nonzero_TBN: weights_TBN != 0, when the caller has it already."""
        if nonzero_TBN is None:
            nonzero_TBN = weights_TBN != 0
        active_NB = nonzero_TBN.any(0).t()
        counts = active_NB.sum(1).tolist()  # host sync: the group sizes are needed on the host
        expert_ids, example_ids = active_NB.nonzero(as_tuple=True)  # row-major: sorted by expert
        use_tasks, use_pairs = nonzero_TBN[:, example_ids, expert_ids].nonzero(as_tuple=True)
        return DispatchPlan(example_ids, expert_ids, counts, use_pairs, use_tasks)

    def dispatch(self, x_BD: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
        """x rows of every pair, grouped by expert: [P, D]."""
        return x_BD.index_select(0, plan.example_ids)

    def combine(
        self, f_PO: torch.Tensor, weights_TBN: torch.Tensor, plan: DispatchPlan
    ) -> torch.Tensor:
        """y[t, b] = sum over pairs (b, e) of weights[t, b, e] * f(pair): [T, B, O]."""
        T, B, _ = weights_TBN.shape
        examples = plan.example_ids[plan.use_pairs]
        w_Q = weights_TBN[plan.use_tasks, examples, plan.expert_ids[plan.use_pairs]]
        rows_QO = f_PO.index_select(0, plan.use_pairs) * w_Q.unsqueeze(-1)
        y = f_PO.new_zeros(T * B, f_PO.shape[1])
        return y.index_add(0, plan.use_tasks * B + examples, rows_QO).view(T, B, -1)
