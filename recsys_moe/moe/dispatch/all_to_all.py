"""All-to-all dispatch: the experts are split over the ranks of an expert-parallel group.

Legend: T = tasks, B = examples on this rank, N = experts in all, E = ranks in the group,
L = experts per rank (N / E), D = input width, O = output width; R = rows (examples) sent or
received, P = (example, expert) pairs.

Rank d of the group owns the experts [d L, (d + 1) L). One step:

1. plan: each example goes ONCE to each rank that owns an expert to which some task gives it a
   nonzero weight (dense plans: to every rank), with an L-bit mask of which of that rank's
   experts it needs. Every rank all-gathers the [2, E] counts (rows, pairs) of every rank, so all
   of them know the split sizes (and the load of every rank: ep/ telemetry) without a second
   exchange; the masks follow in one small all-to-all (dense plans need none).
2. dispatch: the rows go out in one variable-size all-to-all (autograd: their gradients come
   back by the reverse all-to-all); the owner expands them to (row, expert) pairs grouped by
   expert.
3. combine: the owner sends back one output row per pair, in the order the source sent them
   (source, then example, then expert), in one all-to-all; each task mixes its own weights at
   the source.

Nothing is dropped and there is no capacity factor: the same pairs run as on one device, so
outputs and gradients equal the local dispatcher's (tests/distributed/test_dispatch_ranks.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch.distributed._functional_collectives import all_to_all_single_autograd

from recsys_moe.moe.dispatch.base import combine_pairs, pair_uses


@dataclass
class AllToAllPlan:
    grouped: bool  # always True: owners run their experts on rows grouped by expert
    counts: list[int]  # pairs per local expert on this rank (the owner side)
    send_rows: torch.Tensor  # [R_send] examples to send, by destination then example
    send_splits: list[int]  # rows to each rank
    recv_splits: list[int]  # rows from each rank
    own_rows: torch.Tensor  # [P_own] received row of each owner pair, grouped by expert
    own_to_source_order: torch.Tensor  # [P_own] permutation: expert order -> source order
    pairs_back_splits: list[int]  # output rows returned to each rank (owner side)
    pairs_in_splits: list[int]  # output rows coming back from each rank (source side)
    example_ids: torch.Tensor  # [P_src] example of each returned row (source side)
    expert_ids: torch.Tensor  # [P_src] global expert of each returned row
    use_pairs: torch.Tensor  # [Q] (pair, task) uses the combine touches
    use_tasks: torch.Tensor
    count_matrix: torch.Tensor  # [E_src, 2, E_dst] rows and pairs sent, every rank of the group
    sparse: bool  # masks were exchanged (dense plans send every row to every rank, no mask)
    dim_in: int = 0  # width of the dispatched rows (set by dispatch)
    stats: dict[str, torch.Tensor] = field(default_factory=dict)


class AllToAllDispatcher:
    """Dispatch over the ranks of `group`, which own `num_experts / group size` experts each.

    Example:
        >>> d = AllToAllDispatcher(dims.ep_group, num_experts=16)   # 8 per rank on 2 ranks
        >>> plan = d.plan(weights_TBN, sparse=True)
        >>> f = local_experts.forward_grouped(d.dispatch(x_BD, plan), plan.counts)
        >>> y_TBO = d.combine(f, weights_TBN, plan)
    """

    def __init__(self, group: dist.ProcessGroup, num_experts: int) -> None:
        self.group = group
        self.size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        if num_experts % self.size:
            raise ValueError(
                f"model.num_experts ({num_experts}) must be divisible by parallel.ep_size "
                f"({self.size})"
            )
        self.num_experts = num_experts
        self.num_local = num_experts // self.size

    @property
    def first_expert(self) -> int:
        """Global index of this rank's first expert."""
        return self.rank * self.num_local

    def agree(self, active_fraction: torch.Tensor) -> torch.Tensor:
        """The group's mean active fraction: every rank then takes the same path (one small
        all-reduce), so no rank waits in an all-to-all the others skip."""
        f = active_fraction.detach().reshape(1).double()
        dist.all_reduce(f, group=self.group)
        return f[0] / self.size

    def plan(
        self,
        weights_TBN: torch.Tensor,
        sparse: bool,
        nonzero_TBN: torch.Tensor | None = None,
    ) -> AllToAllPlan:
        T, B, N = weights_TBN.shape
        E, L, dev = self.size, self.num_local, weights_TBN.device
        if N != self.num_experts:
            raise ValueError(
                f"weights route over {N} experts, the dispatcher over {self.num_experts}"
            )
        if nonzero_TBN is None:
            nonzero_TBN = weights_TBN != 0
        if sparse:
            active_BEL = nonzero_TBN.any(0).view(B, E, L)
        else:
            active_BEL = torch.ones(B, E, L, dtype=torch.bool, device=dev)
        to_rank_BE = active_BEL.any(-1)
        dest_R, rows_R = to_rank_BE.t().nonzero(as_tuple=True)  # by destination, then example
        send_counts_2E = torch.stack([to_rank_BE.sum(0), active_BEL.sum((0, 2))])

        # counts of every rank of the group: [E_src, 2, E_dst] (host ints needed for the splits)
        gathered = send_counts_2E.new_empty(E * 2, E)
        _all_gather_single(gathered, send_counts_2E.contiguous(), self.group)
        counts = gathered.view(E, 2, E).cpu()
        send_splits = counts[self.rank, 0].tolist()
        recv_splits = counts[:, 0, self.rank].tolist()
        pairs_in_splits = counts[self.rank, 1].tolist()
        pairs_back_splits = counts[:, 1, self.rank].tolist()

        # which of the owner's experts each received row needs
        if sparse:
            mask_send = active_BEL[rows_R, dest_R].to(torch.uint8)  # [R_send, L]
            mask_recv = mask_send.new_empty(sum(recv_splits), L)
            dist.all_to_all_single(mask_recv, mask_send, recv_splits, send_splits, self.group)
            mask_recv = mask_recv.bool()
        else:
            mask_recv = torch.ones(sum(recv_splits), L, dtype=torch.bool, device=dev)
        own_rows_src, own_experts_src = mask_recv.nonzero(as_tuple=True)  # source order
        order = torch.argsort(own_experts_src, stable=True)  # -> grouped by expert
        local_counts = torch.bincount(own_experts_src, minlength=L).tolist()
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel(), device=dev)

        # the returned rows arrive by owner, then example, then the owner's expert
        d_P, b_P, l_P = active_BEL.permute(1, 0, 2).nonzero(as_tuple=True)
        expert_ids = d_P * L + l_P
        if sparse:
            use_pairs, use_tasks = pair_uses(nonzero_TBN, b_P, expert_ids)
        else:  # dense: every task mixes every expert, as the local dense combine does
            P = b_P.numel()
            use_pairs = torch.arange(P, device=dev).repeat(T)
            use_tasks = torch.arange(T, device=dev).repeat_interleave(P)
        return AllToAllPlan(
            grouped=True,
            counts=local_counts,
            send_rows=rows_R,
            send_splits=send_splits,
            recv_splits=recv_splits,
            own_rows=own_rows_src[order],
            own_to_source_order=inverse,
            pairs_back_splits=pairs_back_splits,
            pairs_in_splits=pairs_in_splits,
            example_ids=b_P,
            expert_ids=expert_ids,
            use_pairs=use_pairs,
            use_tasks=use_tasks,
            count_matrix=counts,
            sparse=sparse,
            stats=_load_stats(counts),
        )

    def dispatch(self, x_BD: torch.Tensor, plan: AllToAllPlan) -> torch.Tensor:
        """This rank's expert inputs: [P_own, D], grouped by local expert (plan.counts)."""
        plan.dim_in = x_BD.shape[1]
        x_send = x_BD.index_select(0, plan.send_rows)
        x_recv = _all_to_all(x_send, plan.recv_splits, plan.send_splits, self.group)
        return x_recv.index_select(0, plan.own_rows)

    def combine(
        self, f_PO: torch.Tensor, weights_TBN: torch.Tensor, plan: AllToAllPlan
    ) -> torch.Tensor:
        """Expert outputs back to their sources, mixed per task there: [T, B, O]."""
        f_back = f_PO.index_select(0, plan.own_to_source_order)
        f_src = _all_to_all(f_back, plan.pairs_in_splits, plan.pairs_back_splits, self.group)
        plan.stats["ep/a2a_bytes"] = torch.tensor(
            _off_rank_bytes(
                plan, plan.dim_in, f_PO.shape[1], f_PO.element_size(), f_PO.requires_grad
            )
        )
        return combine_pairs(
            f_src, weights_TBN, plan.example_ids, plan.expert_ids, plan.use_pairs, plan.use_tasks
        )


def _all_to_all(
    t: torch.Tensor, out_splits: list[int], in_splits: list[int], group: dist.ProcessGroup
) -> torch.Tensor:
    """A variable-size all-to-all along dim 0 that autograd runs backwards (the reverse one)."""
    out = all_to_all_single_autograd(t.contiguous(), out_splits, in_splits, group)
    return out.wait() if hasattr(out, "wait") else out


def _all_gather_single(out: torch.Tensor, t: torch.Tensor, group: dist.ProcessGroup) -> None:
    """Every rank's `t`, concatenated along dim 0 into `out` (all_gather_into_tensor was renamed
    all_gather_single in torch 2.13)."""
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(out, t, group=group)


def _off_rank_bytes(
    plan: AllToAllPlan, dim_in: int, dim_out: int, itemsize: int, backward: bool
) -> float:
    """Bytes the whole group sends between different ranks in one step: the counts, the expert
    masks (sparse plans: one byte per local expert per row), the rows out and the outputs back;
    with backward, their gradients too (the same sizes, reversed)."""
    counts = plan.count_matrix.double()
    E, num_local = counts.shape[0], len(plan.counts)
    off = 1.0 - torch.eye(E, dtype=torch.float64)
    rows = float((counts[:, 0, :] * off).sum())
    pairs = float((counts[:, 1, :] * off).sum())
    moved = rows * dim_in * itemsize + pairs * dim_out * itemsize
    total = E * (E - 1) * counts[0].numel() * 8 + moved * (2 if backward else 1)
    if plan.sparse:
        total += rows * num_local
    return total


def _load_stats(counts: torch.Tensor) -> dict[str, torch.Tensor]:
    """Rows and pairs every rank of the group receives this step, and the imbalance of pairs
    (max over mean: 1.0 when every rank runs as many expert rows)."""
    rows = counts[:, 0, :].sum(0).double()  # [E_dst]
    pairs = counts[:, 1, :].sum(0).double()
    stats = {"ep/imbalance": pairs.max() / pairs.mean().clamp_min(1e-12)}
    for d in range(counts.shape[0]):
        stats[f"ep/rows_received/{d}"] = rows[d]
        stats[f"ep/pairs_received/{d}"] = pairs[d]
    return stats
