"""Local (single-device) dispatch: every expert is on this device.

Legend: T = tasks, B = examples, N = experts, D = input width, O = output width,
P = (example, expert) pairs, Q = (pair, task) uses.

Dense plans run the bank on every example (experts(x) [N, B, O], one batched GEMM to combine);
sparse plans group the active pairs (some task gives the expert a nonzero weight) by expert.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from recsys_moe.moe.dispatch.base import combine_pairs, pair_uses


@dataclass
class LocalPlan:
    """grouped=False: the dense bank on every example. grouped=True: the active pairs, sorted by
    expert (example_ids [P], expert_ids [P] non-decreasing, counts: pairs per expert, host
    ints), and the (pair, task) uses with a nonzero weight (use_pairs, use_tasks [Q])."""

    grouped: bool
    example_ids: torch.Tensor | None = None
    expert_ids: torch.Tensor | None = None
    counts: list[int] = field(default_factory=list)
    use_pairs: torch.Tensor | None = None
    use_tasks: torch.Tensor | None = None
    stats: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def num_pairs(self) -> int:
        return 0 if self.example_ids is None else int(self.example_ids.numel())


class LocalDispatcher:
    """Example:
    >>> d = LocalDispatcher()
    >>> plan = d.plan(weights_TBN, sparse=True)     # pairs some task gives a nonzero weight
    >>> f = experts.forward_grouped(d.dispatch(x_BD, plan), plan.counts)
    >>> y_TBO = d.combine(f, weights_TBN, plan)
    """

    def agree(self, active_fraction: torch.Tensor) -> torch.Tensor:
        """The active fraction the path is chosen on: one device has nothing to agree on."""
        return active_fraction

    def plan(
        self,
        weights_TBN: torch.Tensor,
        sparse: bool,
        nonzero_TBN: torch.Tensor | None = None,
    ) -> LocalPlan:
        """Dense, or the pairs (b, e) with weights_TBN[t, b, e] != 0 for some task t.

        nonzero_TBN: weights_TBN != 0, when the caller has it already."""
        if not sparse:
            return LocalPlan(grouped=False)
        if nonzero_TBN is None:
            nonzero_TBN = weights_TBN != 0
        active_NB = nonzero_TBN.any(0).t()
        counts = active_NB.sum(1).tolist()  # host sync: the group sizes are needed on the host
        expert_ids, example_ids = active_NB.nonzero(as_tuple=True)  # row-major: sorted by expert
        use_pairs, use_tasks = pair_uses(nonzero_TBN, example_ids, expert_ids)
        return LocalPlan(True, example_ids, expert_ids, counts, use_pairs, use_tasks)

    def dispatch(self, x_BD: torch.Tensor, plan: LocalPlan) -> torch.Tensor:
        """x itself (dense) or the rows of every pair, grouped by expert: [P, D]."""
        if not plan.grouped:
            return x_BD
        return x_BD.index_select(0, plan.example_ids)

    def combine(self, f: torch.Tensor, weights_TBN: torch.Tensor, plan: LocalPlan) -> torch.Tensor:
        """y[t, b] = sum_e weights[t, b, e] f_e(x_b): [T, B, O]. f is [N, B, O] (dense) or
        [P, O] (grouped)."""
        if not plan.grouped:
            # per example, [T, N] @ [N, O], the operands read in place: for N > 1,
            # einsum("tbn,nbo->tbo") makes this same bmm (the same values, to the bit) with more
            # operator calls around it (0.77-0.93 of its forward + backward time, batch 512 and
            # 2048, 1 and 2 threads); for one expert it multiplied and summed instead
            return torch.bmm(weights_TBN.transpose(0, 1), f.transpose(0, 1)).transpose(0, 1)
        return combine_pairs(
            f, weights_TBN, plan.example_ids, plan.expert_ids, plan.use_pairs, plan.use_tasks
        )
