"""Multi-task mixture-of-experts layer: T gates over one shared bank of N experts.

Legend: T = tasks, B = examples, D = input width, N = experts, O = expert output width.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from recsys_moe.moe.experts import ExpertBank
from recsys_moe.moe.gates.base import Gate, GateOutput


@dataclass
class MoEOutput:
    """y: [T, B, O] per-task mixtures; gates: each task's GateOutput (weights [B, N])."""

    y: torch.Tensor
    gates: list[GateOutput]

    @property
    def aux_loss(self) -> torch.Tensor:
        return torch.stack([g.aux_loss for g in self.gates]).sum()


class MultiTaskMoE(nn.Module):
    """y_t = sum_e w_t,e(x) f_e(x) for every task t (MMoE layout).

    forward(x [B, D]) -> MoEOutput with y [T, B, O].

    Example:
        >>> moe = MultiTaskMoE(ExpertBank(4, 8, [16], 8), [SoftmaxGate(4, 8) for _ in range(2)])
        >>> moe(torch.randn(3, 8)).y.shape
        torch.Size([2, 3, 8])
    """

    def __init__(self, experts: ExpertBank, gates: Sequence[Gate]) -> None:
        super().__init__()
        for t, g in enumerate(gates):
            if g.num_experts != experts.num_experts:
                raise ValueError(
                    f"gate {t} routes over {g.num_experts} experts, the bank has {experts.num_experts}"
                )
        self.experts = experts
        self.gates = nn.ModuleList(gates)

    def forward(self, x_BD: torch.Tensor) -> MoEOutput:
        outs = [g(x_BD) for g in self.gates]
        w_TBN = torch.stack([o.weights for o in outs])
        f_NBO = self.experts(x_BD)
        y_TBO = torch.einsum("tbn,nbo->tbo", w_TBN, f_NBO)
        return MoEOutput(y=y_TBO, gates=outs)
