"""Multi-layer perceptron used for the bottom MLP and the task towers, and the towers of all
tasks run as one batched MLP (`task_mlps`).

Legend: T = tasks, B = examples, I, O = in and out widths.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


class MLP(nn.Sequential):
    """Linear -> ReLU (-> Dropout) per width in `widths`.

    Input [B, in_dim] -> output [B, widths[-1]] (or [B, in_dim] when widths is empty).

    Example:
        >>> MLP(8, [64, 32])(torch.randn(4, 8)).shape
        torch.Size([4, 32])
    """

    def __init__(self, in_dim: int, widths: Sequence[int], dropout: float = 0.0) -> None:
        layers: list[nn.Module] = []
        for w in widths:
            layers += [nn.Linear(in_dim, w), nn.ReLU()]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            in_dim = w
        super().__init__(*layers)
        self.out_dim = in_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102 - see class docstring
        return super().forward(x)


class _StackParams(torch.autograd.Function):
    """torch.stack of parameters whose gradients come back in the parameters' own (row-major)
    layout. The batched GEMM's weight gradient is a transposed view; torch.stack's backward
    would hand each parameter a strided slice of it, which AccumulateGrad copies anyway, and a
    [1, I] head's slice keeps strides (1, 1), which DDP flags ("Grad strides do not match bucket
    view strides") on every multi-rank run."""

    @staticmethod
    def forward(ctx, *params: torch.Tensor) -> torch.Tensor:
        return torch.stack(params)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad.clone(memory_format=torch.contiguous_format).unbind(0)


def stacked_linear(x_TBI: torch.Tensor, linears: Sequence[nn.Linear]) -> torch.Tensor:
    """linears[t](x[t]) for every t, as one batched GEMM: [T, B, I] -> [T, B, O]."""
    w_TOI = _StackParams.apply(*[lin.weight for lin in linears])
    b_TO = torch.stack([lin.bias for lin in linears])
    return torch.baddbmm(b_TO.unsqueeze(1), x_TBI, w_TOI.transpose(1, 2))


def task_mlps(x_TBI: torch.Tensor, mlps: Sequence[MLP], heads: Sequence[nn.Linear]) -> torch.Tensor:
    """heads[t](mlps[t](x[t])) for every task t, [T, B, I] -> raw outputs [B, T] (one column
    per task, each head of width 1). The same parameters and values as the T calls, as one
    batched GEMM per layer (the T towers of the default job are 64 x 64 each: per-call overhead
    was most of their time). The MLPs must be alike (widths, dropout), as the ranker builds them.
    Dropout, when on, draws one mask over all tasks' activations."""
    if len({len(m) for m in mlps}) != 1:
        raise ValueError(f"task_mlps: the towers differ in depth ({[len(m) for m in mlps]})")
    h = x_TBI
    for group in zip(*mlps):
        first = group[0]
        if isinstance(first, nn.Linear):
            h = stacked_linear(h, group)  # type: ignore[arg-type]
        elif isinstance(first, nn.ReLU):
            h = torch.relu_(h)  # in place on the GEMM's output (its backward does not need it)
        elif isinstance(first, nn.Dropout):
            h = F.dropout(h, first.p, first.training)
        else:
            raise TypeError(f"task_mlps: no batched form of {type(first).__name__}")
    # [B, T] in row-major order, as torch.cat of the T columns gave: elementwise kernels on a
    # column (predict's sigmoid) then take the same (strided) path as before, to the bit
    return stacked_linear(h, heads).squeeze(-1).t().contiguous()
