"""Top-k gate (Shazeer et al., 2017): keep the k largest logits, softmax over them, 0 elsewhere.

Legend: B = examples, D = gate input width, N = experts.

Not continuous: the selection jumps when the ranking of the logits changes (the baseline the
DSelect-k paper compares against). Unselected experts get exactly 0.0 and zero gradient, so the
sparse expert path is exact for this gate too.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from recsys_moe.moe.gates.base import Gate, GateOutput, check_k


class TopKGate(Gate):
    """w = softmax over the top-k of (A x + b) (per-example) or of v (static); zeros elsewhere.

    noise=True adds Shazeer et al.'s tunable noise during training only:
    logits + N(0, 1) * softplus(W_noise x) (per-example) or * softplus(u) (static).

    Example:
        >>> gate = TopKGate(num_experts=8, in_dim=16, k=2)
        >>> (gate(torch.randn(4, 16)).weights > 0).sum(-1)
        tensor([2, 2, 2, 2])
    """

    sparse = True

    def __init__(
        self,
        num_experts: int,
        in_dim: int,
        k: int = 2,
        per_example: bool = True,
        noise: bool = False,
    ) -> None:
        super().__init__(num_experts)
        check_k(num_experts, k)
        self.k = k
        self.per_example = per_example
        self.noise = noise
        if per_example:
            self.proj = nn.Linear(in_dim, num_experts)
            self.noise_proj = nn.Linear(in_dim, num_experts) if noise else None
        else:
            # small random logits: a zero init would tie every expert and let topk pick by index
            self.logits_param = nn.Parameter(torch.empty(num_experts).uniform_(-0.05, 0.05))
            self.noise_param = nn.Parameter(torch.zeros(num_experts)) if noise else None

    def forward(self, x_BD: torch.Tensor) -> GateOutput:
        if self.per_example:
            logits = self.proj(x_BD)
        else:
            logits = self.logits_param.expand(x_BD.shape[0], -1)
        if self.noise and self.training:
            scale = F.softplus(self.noise_proj(x_BD) if self.per_example else self.noise_param)
            logits = logits + torch.randn_like(logits) * scale
        top_v, top_i = logits.topk(self.k, dim=-1)
        masked = torch.full_like(logits, float("-inf")).scatter(-1, top_i, top_v)
        return GateOutput(weights=torch.softmax(masked, dim=-1), aux_loss=x_BD.new_zeros(()))
