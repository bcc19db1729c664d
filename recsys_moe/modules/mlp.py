"""The multi-layer perceptron of the bottom MLP, and every task's tower and head stored stacked
and run as one batched MLP (`TaskTowers`).

Legend: T = tasks, B = examples, I, O = in and out widths.
"""

from __future__ import annotations

import math
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


class TaskTowers(nn.Module):
    """Every task's tower (Linear -> ReLU (-> Dropout) per width of `widths`) and head (Linear
    to width 1), stored stacked over the tasks and run as one batched GEMM per layer.

    forward(x [T, B, I]) -> raw outputs [B, T]: column t is head_t(tower_t(x[t])).
    weights[l]: [T, I_l, O_l] (the GEMM's layout, as ExpertBank's); biases[l]: [T, O_l]; the
    last layer is the heads (O = 1). Dropout, when on, draws one mask over all tasks.

    Why stacked: as separate modules the T towers of the default job (64 x 64 each) were 16 of
    its 32 dense parameter tensors, and every step paid per tensor: stacking them for the
    batched GEMM and splitting the gradient again, AccumulateGrad, the fused optimizer's step
    counters and bookkeeping. Stored stacked, the default job's training step took 0.980-0.999
    of its time (batch 512, 1 and 2 threads, 400 steps of each alternated, four runs).

    Example:
        >>> towers = TaskTowers(num_tasks=3, in_dim=8, widths=[16])
        >>> towers(torch.randn(3, 4, 8)).shape
        torch.Size([4, 3])
    """

    def __init__(
        self, num_tasks: int, in_dim: int, widths: Sequence[int], dropout: float = 0.0
    ) -> None:
        super().__init__()
        if num_tasks < 1:
            raise ValueError(f"TaskTowers: num_tasks ({num_tasks}) must be >= 1")
        self.num_tasks = num_tasks
        self.dropout = dropout
        dims = [in_dim, *widths, 1]
        self.weights = nn.ParameterList(
            nn.Parameter(torch.empty(num_tasks, a, b)) for a, b in zip(dims[:-1], dims[1:])
        )
        self.biases = nn.ParameterList(nn.Parameter(torch.empty(num_tasks, b)) for b in dims[1:])
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """nn.Linear's init, drawn in the order that T towers and then T heads built as separate
        modules draw it (each layer's [O, I] weight, then its bias): the same values from the
        same seed."""
        last = len(self.weights) - 1
        with torch.no_grad():
            for layers in (range(last), [last]):  # the towers' layers task by task, then heads
                for t in range(self.num_tasks):
                    for layer in layers:
                        w_IO, b_O = self.weights[layer][t], self.biases[layer][t]
                        w_OI = w_IO.new_empty(w_IO.shape[1], w_IO.shape[0])
                        nn.init.kaiming_uniform_(w_OI, a=math.sqrt(5))
                        w_IO.copy_(w_OI.t())
                        bound = 1.0 / math.sqrt(w_IO.shape[0])
                        nn.init.uniform_(b_O, -bound, bound)

    def forward(self, x_TBI: torch.Tensor) -> torch.Tensor:
        h = x_TBI
        last = len(self.weights) - 1
        for layer, (w_TIO, b_TO) in enumerate(zip(self.weights, self.biases)):
            h = torch.baddbmm(b_TO.unsqueeze(1), h, w_TIO)
            if layer < last:
                h = torch.relu_(h)  # in place on the GEMM's output (its backward does not need it)
                if self.dropout > 0:
                    h = F.dropout(h, self.dropout, self.training)
        # [B, T] in row-major order, as torch.cat of the T columns gives: elementwise kernels on
        # a column (predict's sigmoid) then take the same (strided) path as per-task heads'
        return h.squeeze(-1).t().contiguous()
