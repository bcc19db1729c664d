"""What every dispatcher shares: the protocol the MoE layer calls, and the combine at the source.

Legend: T = tasks, B = examples, N = experts, D = input width, O = output width,
P = (example, expert) pairs, Q = (pair, task) uses.

A dispatcher owns where examples go; the layer only composes three steps:

    plan = dispatcher.plan(weights_TBN, sparse)        # which (example, expert) pairs run where
    f = experts(dispatcher.dispatch(x_BD, plan))         # grouped by expert (or dense), counts
    y_TBO = dispatcher.combine(f, weights_TBN, plan)     # back at the source, mixed per task

`agree(active_fraction)` returns the fraction every rank of the dispatcher's group decides the
dense/sparse path on, so the collectives that follow are the same on all of them.
"""

from __future__ import annotations

from typing import Protocol

import torch


class Plan(Protocol):
    grouped: bool  # True: experts.forward_grouped(x, counts); False: the dense bank
    counts: list[int]  # rows per (local) expert when grouped
    stats: dict[str, torch.Tensor]  # detached telemetry of this step's dispatch


class Dispatcher(Protocol):
    def agree(self, active_fraction: torch.Tensor) -> torch.Tensor: ...

    def plan(
        self, weights_TBN: torch.Tensor, sparse: bool, nonzero_TBN: torch.Tensor | None = None
    ) -> Plan: ...

    def dispatch(self, x_BD: torch.Tensor, plan: Plan) -> torch.Tensor: ...

    def combine(self, f: torch.Tensor, weights_TBN: torch.Tensor, plan: Plan) -> torch.Tensor: ...


def pair_uses(
    nonzero_TBN: torch.Tensor, example_ids_P: torch.Tensor, expert_ids_P: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The (pair, task) uses with a nonzero weight: (use_pairs [Q], use_tasks [Q])."""
    use_tasks, use_pairs = nonzero_TBN[:, example_ids_P, expert_ids_P].nonzero(as_tuple=True)
    return use_pairs, use_tasks


def combine_pairs(
    f_PO: torch.Tensor,
    weights_TBN: torch.Tensor,
    example_ids_P: torch.Tensor,
    expert_ids_P: torch.Tensor,
    use_pairs_Q: torch.Tensor,
    use_tasks_Q: torch.Tensor,
) -> torch.Tensor:
    """y[t, b] = sum over pairs (b, e) of weights[t, b, e] * f(pair): [T, B, O].

    Touches only the listed uses, not every task for every pair: exact where the other weights
    are 0.0, since their products (and, for DSelect-k and Top-k, their gradients) are 0."""
    T, B, _ = weights_TBN.shape
    examples = example_ids_P[use_pairs_Q]
    w_Q = weights_TBN[use_tasks_Q, examples, expert_ids_P[use_pairs_Q]]
    rows_QO = f_PO.index_select(0, use_pairs_Q) * w_Q.unsqueeze(-1)
    y = rows_QO.new_zeros(T * B, f_PO.shape[1])  # bf16 outputs, fp32 weights: mixed in fp32
    return y.index_add(0, use_tasks_Q * B + examples, rows_QO).view(T, B, f_PO.shape[1])
