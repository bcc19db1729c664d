"""Softmax gate (MMoE, Ma et al., KDD 2018): dense convex weights over all experts."""

from __future__ import annotations

import torch
from torch import nn

from recsys_moe.moe.gates.base import Gate, GateOutput


class SoftmaxGate(Gate):
    """w = softmax(A x + b) (per-example) or softmax(v) (static), over the N experts.

    Example:
        >>> gate = SoftmaxGate(num_experts=4, in_dim=8)
        >>> gate(torch.randn(2, 8)).weights.sum(-1)
        tensor([1.0000, 1.0000], grad_fn=<SumBackward1>)
    """

    sparse = False  # every weight is positive: the sparse expert path would gain nothing

    def __init__(self, num_experts: int, in_dim: int, per_example: bool = True) -> None:
        super().__init__(num_experts)
        self.per_example = per_example
        if per_example:
            self.proj = nn.Linear(in_dim, num_experts)
        else:
            # zeros: every expert starts with the same weight 1/N
            self.logits = nn.Parameter(torch.zeros(num_experts))

    def forward(self, x_BD: torch.Tensor) -> GateOutput:
        if self.per_example:
            logits_BN = self.proj(x_BD)
        else:
            logits_BN = self.logits.expand(x_BD.shape[0], -1)
        return GateOutput(weights=torch.softmax(logits_BN, dim=-1), aux_loss=x_BD.new_zeros(()))
