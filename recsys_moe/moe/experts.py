"""A bank of MLP experts with identical shapes, stored stacked; kernels in moe/grouped.py.

Legend: N = experts, B = examples, D = input width, H = a hidden width, O = output width.
Experts compute only: which examples an expert sees is decided by the gates and the dispatcher.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from recsys_moe.config.schema import ExpertKernel
from recsys_moe.moe.grouped import batched_pays, expert_linear, expert_mlp


class ExpertBank(nn.Module):
    """N experts, each Linear -> ReLU (-> Dropout) per width of `hidden + [out_dim]`.

    forward(x [B, D]) -> [N, B, O]: every expert on every example (the dense path).
    forward_grouped(x [P, D], counts [N]) -> [P, O]: rows already grouped by expert, counts[e]
    of them for expert e (the sparse path; same parameters, same values).
    kernel: how forward runs the experts' GEMMs (ExpertKernel; forward_grouped's groups differ
    in size and always run expert by expert).

    Example:
        >>> bank = ExpertBank(num_experts=8, in_dim=32, hidden=[64], out_dim=16)
        >>> bank(torch.randn(4, 32)).shape
        torch.Size([8, 4, 16])
    """

    def __init__(
        self,
        num_experts: int,
        in_dim: int,
        hidden: Sequence[int],
        out_dim: int,
        dropout: float = 0.0,
        kernel: ExpertKernel = ExpertKernel.auto,
    ) -> None:
        super().__init__()
        if num_experts < 1:
            raise ValueError(f"model.num_experts ({num_experts}) must be >= 1")
        self.num_experts = num_experts
        self.in_dim = in_dim
        self.out_dim = out_dim
        self.dropout = dropout
        self.kernel = ExpertKernel(kernel)
        widths = [in_dim, *hidden, out_dim]
        # weights[l]: [N, widths[l], widths[l+1]]; biases[l]: [N, widths[l+1]]
        self.weights = nn.ParameterList(
            nn.Parameter(torch.empty(num_experts, a, b)) for a, b in zip(widths[:-1], widths[1:])
        )
        self.biases = nn.ParameterList(
            nn.Parameter(torch.empty(num_experts, b)) for b in widths[1:]
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # The init of nn.Linear, per expert: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weight and bias.
        for w, b in zip(self.weights, self.biases):
            bound = 1.0 / math.sqrt(w.shape[1])
            nn.init.uniform_(w, -bound, bound)
            nn.init.uniform_(b, -bound, bound)

    def shard(self, first: int, num: int) -> ExpertBank:
        """A bank of experts [first, first + num) of this one, with copies of their parameters
        (expert parallelism keeps only a rank's own experts)."""
        if not (0 <= first and num >= 1 and first + num <= self.num_experts):
            raise ValueError(
                f"experts [{first}, {first + num}) are not in a bank of {self.num_experts}"
            )
        hidden = [w.shape[2] for w in self.weights[:-1]]
        with torch.random.fork_rng(devices=[]):  # its throwaway init must not move the RNG
            bank = ExpertBank(num, self.in_dim, hidden, self.out_dim, self.dropout, self.kernel)
        ref = self.weights[0]
        bank.to(device=ref.device, dtype=ref.dtype)
        with torch.no_grad():
            for mine, full in zip(bank.parameters(), self.parameters()):
                mine.copy_(full[first : first + num])
        bank.train(self.training)
        return bank

    def _layer_by_layer(self) -> bool:
        """Dropout between the layers needs them one at a time; else each expert's whole MLP
        runs at once (moe/grouped.py: expert_mlp, the same values, fewer passes over memory)."""
        return self.dropout > 0 and self.training

    def batched(self, x_BD: torch.Tensor) -> bool:
        """Whether forward(x_BD) runs the batched kernel (ExpertKernel; auto: batched_pays)."""
        if self.kernel == ExpertKernel.auto:
            return batched_pays(x_BD, list(self.weights))
        return self.kernel == ExpertKernel.batched

    def forward(self, x_BD: torch.Tensor) -> torch.Tensor:
        if not self._layer_by_layer():
            weights, biases = list(self.weights), list(self.biases)
            return expert_mlp(x_BD, weights, biases, batched=self.batched(x_BD))
        h = x_BD  # the first layer reads the shared [B, D] input in place (no copy per expert)
        for w_NIO, b_NO in zip(self.weights, self.biases):
            h = expert_linear(h, w_NIO, b_NO, relu=True)  # [B, I] or [N, B, I] -> [N, B, O]
            if self.dropout > 0:
                h = F.dropout(h, self.dropout, self.training)
        return h

    def forward_grouped(self, x_PD: torch.Tensor, counts: Sequence[int]) -> torch.Tensor:
        counts = list(counts)
        if not self._layer_by_layer():
            return expert_mlp(x_PD, list(self.weights), list(self.biases), counts)
        h = x_PD
        for w_NIO, b_NO in zip(self.weights, self.biases):
            h = expert_linear(h, w_NIO, b_NO, counts, relu=True)  # [P, I] -> [P, O]
            if self.dropout > 0:
                h = F.dropout(h, self.dropout, self.training)
        return h
