"""Expert linear layers: every expert's own weight on its own rows, bias and ReLU fused.

Legend: N = experts, B = examples, P = (example, expert) pairs sorted by expert, I, O = in and
out widths.

Three layouts of the input, one stacked [N, I, O] weight shared by all of them:
- shared  x [B, I]: every expert on the same rows (the dense bank's first layer) -> [N, B, O];
- stacked x [N, B, I]: expert e on its own slice (the dense bank's later layers) -> [N, B, O];
- grouped x [P, I] with counts [N]: rows already sorted by expert (sparse dispatch) -> [P, O].

Why these kernels: forward + backward of a two-layer bank, arms interleaved in one process,
at three shapes (batch 512, 8 experts 128-256-64; batch 4096, 16 experts 128-256-128; batch
8192, 8 experts), 1 and 2 threads, twice; medians of the 12 ratios to the broadcast
`relu(matmul(x, W) + b)` they replace (which copies the shared input once per expert, and sums
N copies of its gradient in backward): one `addmm` per expert reading the shared input in
place, 0.56; one GEMM over the experts' concatenated [I, N*O] weight (a copy of the weights and
a transpose of the output), 0.64; a `baddbmm` over the expanded input, 0.63. Later layers are
one `baddbmm` (a per-expert `addmm` loop: 0.57, the same within noise). Bias and ReLU are
fused: the bias is the GEMM's initial value, ReLU runs in place on its output
(`torch._addmm_activation`: a cuBLASLt epilogue on CUDA, addmm + in-place ReLU on CPU, where it
measured the same as addmm + one ReLU pass, 0.58), and backward masks the gradient with the
saved output (the next layer's input anyway), so no pre-activation tensor is kept.

The dense bank's whole MLP has two kernels (model.expert_kernel, chosen by `batched_pays` under
`auto`): _ExpertMLP runs each expert's layers forward and backward before the next expert's,
while its activations are in cache; _BatchedExpertMLP runs each layer and each gradient as one
GEMM batch over the experts (`baddbmm`/`bmm` over the stride-0 expanded input), which the BLAS
spreads over its threads expert by expert, where each expert's narrow GEMM split over two
threads gained little (the eight experts' 512 x 256 x 64 layers as eight `addmm`: 1.03 ms on 2
threads, 1.02 on 1; as one `baddbmm`: 0.76 ms on 2). The batch streams every expert's
activations through memory layer by layer, so it pays while they fit in cache
(BATCHED_MAX_BYTES_PER_THREAD).

Gradients of the stacked weight are written into one [N, I, O] buffer (as grouped-GEMM kernels
do), never N full-size zero tensors. Under autocast the matmuls run in the autocast dtype (the
inputs are cast before the kernel, and autograd casts the gradients back to the parameters').
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import torch
from torch.autograd.function import once_differentiable


def _relu_mask(grad: torch.Tensor, out: torch.Tensor, relu: bool) -> torch.Tensor:
    """The gradient before the ReLU, from the gradient after it and the ReLU's output."""
    return torch.ops.aten.threshold_backward(grad, out, 0.0) if relu else grad


class _SharedLinear(torch.autograd.Function):
    """out[e] = act(x @ w[e] + b[e]): x [B, I] read in place by every expert -> [N, B, O]."""

    @staticmethod
    def forward(ctx, x_BI, w_NIO, b_NO, relu: bool):
        num_experts, _, out_dim = w_NIO.shape
        out = x_BI.new_empty(num_experts, x_BI.shape[0], out_dim)
        for e in range(num_experts):
            if relu:
                torch._addmm_activation(b_NO[e], x_BI, w_NIO[e], out=out[e])
            else:
                torch.addmm(b_NO[e], x_BI, w_NIO[e], out=out[e])
        ctx.relu = relu
        ctx.save_for_backward(x_BI, w_NIO, out)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_NBO):
        x_BI, w_NIO, out = ctx.saved_tensors
        g = _relu_mask(grad_NBO, out, ctx.relu)
        N = w_NIO.shape[0]
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:  # sum over experts, accumulated in place
            grad_x = torch.mm(g[0], w_NIO[0].t())
            for e in range(1, N):
                grad_x.addmm_(g[e], w_NIO[e].t())
        if ctx.needs_input_grad[1]:
            grad_w = torch.empty_like(w_NIO)
            x_t = x_BI.t()
            for e in range(N):
                torch.mm(x_t, g[e], out=grad_w[e])
        if ctx.needs_input_grad[2]:
            grad_b = g.sum(1)
        return grad_x, grad_w, grad_b, None


class _StackedLinear(torch.autograd.Function):
    """out[e] = act(x[e] @ w[e] + b[e]): x [N, B, I] -> [N, B, O], one batched GEMM."""

    @staticmethod
    def forward(ctx, x_NBI, w_NIO, b_NO, relu: bool):
        out = torch.baddbmm(b_NO.unsqueeze(1), x_NBI, w_NIO)
        if relu:
            out.relu_()
        ctx.relu = relu
        ctx.save_for_backward(x_NBI, w_NIO, out)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_NBO):
        x_NBI, w_NIO, out = ctx.saved_tensors
        g = _relu_mask(grad_NBO, out, ctx.relu)
        grad_x = torch.bmm(g, w_NIO.transpose(1, 2)) if ctx.needs_input_grad[0] else None
        grad_w = torch.bmm(x_NBI.transpose(1, 2), g) if ctx.needs_input_grad[1] else None
        grad_b = g.sum(1) if ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_b, None


class _GroupedLinear(torch.autograd.Function):
    """out[rows of e] = act(x[rows of e] @ w[e] + b[e]): x [P, I] sorted by expert -> [P, O]."""

    @staticmethod
    def forward(ctx, x_PI, w_NIO, b_NO, counts: list[int], relu: bool):
        out = x_PI.new_empty(x_PI.shape[0], w_NIO.shape[2])
        x_e, out_e = x_PI.split(counts), out.split(counts)
        linear = torch._addmm_activation if relu else torch.addmm
        for e in _experts(len(counts), counts):
            linear(b_NO[e], x_e[e], w_NIO[e], out=out_e[e])
        ctx.counts, ctx.relu = counts, relu
        ctx.save_for_backward(x_PI, w_NIO, out)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_PO):
        x_PI, w_NIO, out = ctx.saved_tensors
        g = _relu_mask(grad_PO, out, ctx.relu)
        # experts without rows get zero gradients
        grad_x = x_PI.new_empty(x_PI.shape) if ctx.needs_input_grad[0] else None
        grad_w = torch.zeros_like(w_NIO) if ctx.needs_input_grad[1] else None
        grad_b = g.new_zeros(w_NIO.shape[0], w_NIO.shape[2]) if ctx.needs_input_grad[2] else None
        counts = ctx.counts
        g_e, x_e = g.split(counts), x_PI.split(counts)
        gx_e = grad_x.split(counts) if grad_x is not None else None
        for e in _experts(len(counts), counts):
            if gx_e is not None:
                torch.mm(g_e[e], w_NIO[e].t(), out=gx_e[e])
            if grad_w is not None:
                torch.mm(x_e[e].t(), g_e[e], out=grad_w[e])
            if grad_b is not None:
                torch.sum(g_e[e], 0, out=grad_b[e])
        return grad_x, grad_w, grad_b, None, None


class _ExpertMLP(torch.autograd.Function):
    """Every layer of expert e (Linear -> ReLU each), one expert after the other: x [B, I]
    shared by all experts -> [N, B, O], or x [P, I] grouped by expert (counts) -> [P, O].

    Forward and backward run the whole MLP of one expert before the next, so its intermediate
    activations and their gradients ([rows, hidden], a few hundred KiB at batch 512) are reused
    while in cache; layer by layer, each pass streamed the [N, B, hidden] tensors of all experts
    through memory (measured on the default job's bank, forward + backward, interleaved medians:
    0.87 of the layer-by-layer kernels at batch 512 and 0.74 to 0.81 at batch 4096 and 8192 on
    1 thread, 0.75 to 0.99 on 2). The outputs of every layer are kept for backward (the ReLU masks
    and the next layer's inputs), as layer by layer.
    """

    @staticmethod
    def forward(ctx, x, counts: Optional[list[int]], *params):
        num_layers = len(params) // 2
        ws, bs = params[:num_layers], params[num_layers:]
        num_experts = ws[0].shape[0]
        lead = () if counts is not None else (num_experts,)
        acts = [x.new_empty(*lead, x.shape[0], w.shape[2]) for w in ws]
        # per-expert views made once per tensor (one unbind or split, not a select per use)
        n = num_experts
        w_e, b_e = [w.unbind(0) for w in ws], [b.unbind(0) for b in bs]
        a_e, x_e = [_per_expert(a, counts, n) for a in acts], _per_expert(x, counts, n)
        for e in _experts(num_experts, counts):
            h = x_e[e]
            for layer in range(num_layers):
                out = a_e[layer][e]
                torch._addmm_activation(b_e[layer][e], h, w_e[layer][e], out=out)
                h = out
        ctx.counts = counts
        return _save_mlp(ctx, x, ws, acts)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        x, ws, acts = _saved_mlp(ctx)
        num_layers, counts = len(ws), ctx.counts
        num_experts, grouped = ws[0].shape[0], counts is not None
        n = num_experts
        # experts without rows (grouped) keep zero gradients
        new = torch.zeros_like if grouped else torch.empty_like
        grad_ws = [new(w) for w in ws]
        grad_bs = [w.new_zeros(num_experts, w.shape[2]) for w in ws]
        grad_x = torch.zeros_like(x) if ctx.needs_input_grad[0] else None
        # per-expert views, each made once: activations, their transposes (the weight
        # gradients' left operands), the weights' transposes and the gradient buffers
        a_e = [_per_expert(a, counts, n) for a in acts]
        at_e = [_per_expert(x, counts, n, transpose=True)]
        at_e += [_per_expert(a, counts, n, transpose=True) for a in acts[:-1]]
        wt_e = [w.transpose(1, 2).unbind(0) for w in ws]
        gw_e, gb_e = [g.unbind(0) for g in grad_ws], [g.unbind(0) for g in grad_bs]
        go_e = _per_expert(grad_out, counts, n)
        gx_e = _per_expert(grad_x, counts, n) if grad_x is not None and grouped else None
        for e in _experts(num_experts, counts):
            g = torch.ops.aten.threshold_backward(go_e[e], a_e[-1][e], 0.0)
            for layer in range(num_layers - 1, -1, -1):
                torch.mm(at_e[layer][e], g, out=gw_e[layer][e])
                torch.sum(g, 0, out=gb_e[layer][e])
                if layer:  # the gradient before the previous layer's ReLU, in place (ours)
                    g_in = torch.mm(g, wt_e[layer][e])
                    g = torch.ops.aten.threshold_backward.grad_input(
                        g_in, a_e[layer - 1][e], 0.0, grad_input=g_in
                    )
                elif gx_e is not None:
                    torch.mm(g, wt_e[0][e], out=gx_e[e])
                elif grad_x is not None:
                    grad_x.addmm_(g, wt_e[0][e])
        return (grad_x, None, *grad_ws, *grad_bs)


class _BatchedExpertMLP(torch.autograd.Function):
    """Every expert's MLP (Linear -> ReLU each) on the shared input x [B, I] -> [N, B, O], one
    batched GEMM over the experts per layer and per gradient: x is read in place by every
    expert (a stride-0 expand), the experts' GEMMs go to the BLAS as one batch, which spreads
    them over the threads (one expert's narrow GEMM split over several threads scales worse).
    The input gradient sums the experts' products in place, expert after expert."""

    @staticmethod
    def forward(ctx, x, *params):
        num_layers = len(params) // 2
        ws, bs = params[:num_layers], params[num_layers:]
        h = x.expand(ws[0].shape[0], *x.shape)
        acts = []
        for w, b in zip(ws, bs):
            h = torch.baddbmm(b.unsqueeze(1), h, w).relu_()
            acts.append(h)
        return _save_mlp(ctx, x, ws, acts)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        x, ws, acts = _saved_mlp(ctx)
        num_layers, num_experts = len(ws), ws[0].shape[0]
        grad_ws: list[Optional[torch.Tensor]] = [None] * num_layers  # each layer sets its own
        grad_bs: list[Optional[torch.Tensor]] = [None] * num_layers
        grad_x = None
        x_t = x.t().expand(num_experts, x.shape[1], x.shape[0])  # read in place by every expert
        g = torch.ops.aten.threshold_backward(grad_out, acts[-1], 0.0)
        for layer in range(num_layers - 1, -1, -1):
            # the layer's input, transposed: [N, I, B]
            inp_t = acts[layer - 1].transpose(1, 2) if layer else x_t
            grad_ws[layer] = torch.bmm(inp_t, g)
            grad_bs[layer] = g.sum(1)
            if layer:  # the gradient before the previous layer's ReLU, in place (ours)
                g_in = torch.bmm(g, ws[layer].transpose(1, 2))
                g = torch.ops.aten.threshold_backward.grad_input(
                    g_in, acts[layer - 1], 0.0, grad_input=g_in
                )
            elif ctx.needs_input_grad[0]:
                wt = ws[0].transpose(1, 2)
                grad_x = torch.mm(g[0], wt[0])
                for e in range(1, num_experts):
                    grad_x.addmm_(g[e], wt[e])
        return (grad_x, *grad_ws, *grad_bs)


def _save_mlp(ctx, x: torch.Tensor, ws: Sequence[torch.Tensor], acts: list[torch.Tensor]):
    """Keeps what an MLP kernel's backward reads (its input, weights and every layer's output)
    and returns the last output."""
    ctx.num_layers = len(ws)
    ctx.save_for_backward(x, *ws, *acts)
    return acts[-1]


def _saved_mlp(ctx) -> tuple[torch.Tensor, Sequence[torch.Tensor], Sequence[torch.Tensor]]:
    """(x, weights, layer outputs) as _save_mlp kept them."""
    x, *rest = ctx.saved_tensors
    return x, rest[: ctx.num_layers], rest[ctx.num_layers :]


def _per_expert(
    t: torch.Tensor, counts: Optional[list[int]], num_experts: int, transpose: bool = False
) -> Sequence[torch.Tensor]:
    """Expert e's view of t (transposed: of its last two dims) at index e: t [N, rows, W] (or
    [rows, W] shared by every expert, counts None) or t [P, W] grouped by expert (counts)."""
    if counts is not None:
        return t.t().split(counts, dim=1) if transpose else t.split(counts)
    if t.dim() == 2:  # the shared input: the same rows for every expert
        return [t.t() if transpose else t] * num_experts
    return (t.transpose(1, 2) if transpose else t).unbind(0)


def _experts(num_experts: int, counts: Optional[list[int]]) -> list[int]:
    """The experts with rows: all (shared input) or those with a nonempty group."""
    if counts is None:
        return list(range(num_experts))
    return [e for e, c in enumerate(counts) if c]


def expert_mlp(
    x: torch.Tensor,
    weights: Sequence[torch.Tensor],
    biases: Sequence[torch.Tensor],
    counts: Optional[Sequence[int]] = None,
    batched: bool = False,
) -> torch.Tensor:
    """Every expert's MLP (Linear -> ReLU per layer; weights[l] [N, I_l, O_l], biases[l]
    [N, O_l]) on its rows: x [B, I] shared -> [N, B, O]; x [P, I] with counts -> [P, O].
    The same values and gradients as expert_linear(..., relu=True) layer after layer.

    batched (shared x only): one GEMM batch over the experts per layer (_BatchedExpertMLP),
    else each expert's whole MLP before the next (_ExpertMLP); `batched_pays` chooses."""
    if batched and counts is not None:
        raise ValueError("expert_mlp: the batched kernel needs the shared input (no counts)")
    x, weights, biases, counts = _prepare(x, list(weights), list(biases), counts)
    if batched:
        return _BatchedExpertMLP.apply(x, *weights, *biases)
    return _ExpertMLP.apply(x, counts, *weights, *biases)


# The experts' widest activations a CPU thread may hold for the batched kernel to pay: 4 MiB,
# twice this host's L2 per core (2 MiB). Measured on the default bank (8 experts 128 -> 256 ->
# 64, forward + backward): the batched kernel took 0.97x the per-expert one's training step
# at batch 512 on 1 thread (4 MiB), 0.89x on 2; the bank alone 1.05x at batch 1024 on 1 thread
# (8 MiB) and 0.88x on 2 (4 MiB a thread), 1.13x-1.16x at batch 8192 on 1 and 2 threads.
BATCHED_MAX_BYTES_PER_THREAD = 4 << 20


def batched_pays(x: torch.Tensor, weights: Sequence[torch.Tensor]) -> bool:
    """model.expert_kernel=auto: the batched kernel on CPU where the experts' widest
    activations, split over torch's threads, fit in BATCHED_MAX_BYTES_PER_THREAD; the
    per-expert kernel elsewhere (bigger batches, whose activations stream through memory
    layer by layer, and accelerators, where the per-expert kernel is the one measured)."""
    if x.device.type != "cpu":
        return False
    dtype = autocast_dtype(x) or x.dtype
    widest = max(w.shape[2] for w in weights)
    size = weights[0].shape[0] * x.shape[0] * widest * dtype.itemsize
    return size <= BATCHED_MAX_BYTES_PER_THREAD * torch.get_num_threads()


def _prepare(
    x: torch.Tensor,
    weights: list[torch.Tensor],
    biases: list[torch.Tensor],
    counts: Optional[Sequence[int]],
) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor], Optional[list[int]]]:
    """The checks and casts every expert kernel's entry point shares: counts (grouped rows)
    that match x and the experts; x in the autocast dtype where autocast is on, and the
    weights in x's dtype (autocast, or parameters kept in another dtype than activations)."""
    if counts is not None:
        counts = list(counts)
        if x.dim() != 2 or sum(counts) != x.shape[0] or len(counts) != weights[0].shape[0]:
            raise ValueError(
                f"counts ({len(counts)} groups, {sum(counts)} rows) do not match x "
                f"{tuple(x.shape)} and w {tuple(weights[0].shape)}"
            )
    dtype = autocast_dtype(x)
    if dtype is not None and dtype != x.dtype:
        x = x.to(dtype)
    if any(w.dtype != x.dtype for w in weights):
        weights = [w.to(x.dtype) for w in weights]
        biases = [b.to(x.dtype) for b in biases]
    return x, weights, biases, counts


def autocast_dtype(t: torch.Tensor) -> Optional[torch.dtype]:
    """The dtype autocast gives matmuls on t's device, or None where autocast is off."""
    kind = t.device.type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else None


def expert_linear(
    x: torch.Tensor,
    w_NIO: torch.Tensor,
    b_NO: torch.Tensor,
    counts: Optional[Sequence[int]] = None,
    relu: bool = False,
) -> torch.Tensor:
    """Each expert's affine map (and ReLU) on its rows.

    x [B, I] (every expert on every row) or [N, B, I] (expert e on x[e]) -> [N, B, O];
    x [P, I] with counts [N] (counts[e] rows of expert e, in order) -> [P, O].
    """
    x, (w_NIO,), (b_NO,), counts = _prepare(x, [w_NIO], [b_NO], counts)
    if counts is not None:
        return _GroupedLinear.apply(x, w_NIO, b_NO, counts, relu)
    if x.dim() == 2:
        return _SharedLinear.apply(x, w_NIO, b_NO, relu)
    return _StackedLinear.apply(x, w_NIO, b_NO, relu)


def grouped_linear(
    x_PI: torch.Tensor, w_NIO: torch.Tensor, b_NO: torch.Tensor, counts: Sequence[int]
) -> torch.Tensor:
    """out[rows of expert e] = x[rows of expert e] @ w[e] + b[e]; rows grouped by expert.

    counts[e] rows belong to expert e, in order; sum(counts) == P. Returns [P, O].
    """
    return expert_linear(x_PI, w_NIO, b_NO, counts)
