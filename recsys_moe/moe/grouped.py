"""Grouped linear: rows already sorted by expert, each group multiplied by its own expert's weight.

Legend: P = (example, expert) pairs, sorted by expert; N = experts; I, O = in and out widths.

The weights stay one stacked [N, I, O] parameter shared with the dense path. Autograd through
W[e] for every expert would materialise N full-size zero gradients per layer; this function
writes each expert's gradient into one [N, I, O] buffer instead (as grouped-GEMM kernels do).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.autograd.function import once_differentiable


class _GroupedLinear(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, x_PI: torch.Tensor, w_NIO: torch.Tensor, b_NO: torch.Tensor, counts: Sequence[int]
    ) -> torch.Tensor:
        ctx.save_for_backward(x_PI, w_NIO)
        ctx.counts = counts
        out = x_PI.new_empty(x_PI.shape[0], w_NIO.shape[2])
        start = 0
        for e, c in enumerate(counts):
            if c:
                torch.addmm(b_NO[e], x_PI[start : start + c], w_NIO[e], out=out[start : start + c])
            start += c
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_PO: torch.Tensor):
        x_PI, w_NIO = ctx.saved_tensors
        grad_x = x_PI.new_empty(x_PI.shape) if ctx.needs_input_grad[0] else None
        grad_w = torch.zeros_like(w_NIO) if ctx.needs_input_grad[1] else None
        grad_b = (
            w_NIO.new_zeros(w_NIO.shape[0], w_NIO.shape[2]) if ctx.needs_input_grad[2] else None
        )
        start = 0
        for e, c in enumerate(ctx.counts):
            if c:
                g = grad_PO[start : start + c]
                if grad_x is not None:
                    torch.mm(g, w_NIO[e].t(), out=grad_x[start : start + c])
                if grad_w is not None:
                    torch.mm(x_PI[start : start + c].t(), g, out=grad_w[e])
                if grad_b is not None:
                    grad_b[e] = g.sum(0)
            start += c
        return grad_x, grad_w, grad_b, None


def grouped_linear(
    x_PI: torch.Tensor, w_NIO: torch.Tensor, b_NO: torch.Tensor, counts: Sequence[int]
) -> torch.Tensor:
    """out[rows of expert e] = x[rows of expert e] @ w[e] + b[e]; rows grouped by expert.

    counts[e] rows belong to expert e, in order; sum(counts) == P. Returns [P, O].
    """
    if sum(counts) != x_PI.shape[0] or len(counts) != w_NIO.shape[0]:
        raise ValueError(
            f"counts ({len(counts)} groups, {sum(counts)} rows) do not match x {tuple(x_PI.shape)} and w {tuple(w_NIO.shape)}"
        )
    return _GroupedLinear.apply(x_PI, w_NIO, b_NO, list(counts))
