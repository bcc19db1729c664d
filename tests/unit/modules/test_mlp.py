"""modules/mlp.py: TaskTowers stores every task's tower and head stacked and runs them as one
batched MLP, with the initial values, outputs and gradients of the per-task modules it replaces
(float64)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from recsys_moe.modules.mlp import MLP, TaskTowers


def _per_task(T: int, width: int, hidden: list[int], dropout: float = 0.0):
    """T towers and T heads as separate modules, built in the order TaskTowers draws its init."""
    towers = nn.ModuleList(MLP(width, hidden, dropout) for _ in range(T))
    heads = nn.ModuleList(nn.Linear(towers[0].out_dim, 1) for _ in range(T))
    return towers, heads


def _linears(towers: nn.ModuleList, heads: nn.ModuleList, layer: int) -> list[nn.Linear]:
    """Layer `layer` of every task, the heads being the last."""
    by_task = [[m for m in tower if isinstance(m, nn.Linear)] for tower in towers]
    return [linears[layer] for linears in by_task] if layer < len(by_task[0]) else list(heads)


@pytest.mark.parametrize("hidden", [[], [16], [16, 8]])
def test_task_towers_draw_the_init_of_per_task_modules_from_the_same_seed(hidden):
    T, width = 3, 5
    torch.manual_seed(7)
    towers, heads = _per_task(T, width, hidden)
    torch.manual_seed(7)
    stacked = TaskTowers(T, width, hidden)
    assert len(stacked.weights) == len(hidden) + 1
    for layer, (w_TIO, b_TO) in enumerate(zip(stacked.weights, stacked.biases)):
        want = _linears(towers, heads, layer)
        assert w_TIO.shape == (T, want[0].in_features, want[0].out_features)
        for t, lin in enumerate(want):
            assert torch.equal(w_TIO[t], lin.weight.t()), (layer, t)
            assert torch.equal(b_TO[t], lin.bias), (layer, t)


def _copy_into(stacked: TaskTowers, towers: nn.ModuleList, heads: nn.ModuleList) -> None:
    with torch.no_grad():
        for layer, (w_TIO, b_TO) in enumerate(zip(stacked.weights, stacked.biases)):
            for t, lin in enumerate(_linears(towers, heads, layer)):
                w_TIO[t].copy_(lin.weight.t())
                b_TO[t].copy_(lin.bias)


@pytest.mark.parametrize("hidden", [[], [16], [16, 8]])
def test_task_towers_equal_the_towers_and_heads_called_one_by_one(hidden):
    T, B, width = 3, 11, 5
    torch.manual_seed(0)
    towers, heads = _per_task(T, width, hidden)
    towers.double()
    heads.double()
    stacked = TaskTowers(T, width, hidden).double()
    _copy_into(stacked, towers, heads)
    g = torch.Generator().manual_seed(0)
    y = torch.randn(T, B, width, dtype=torch.float64, generator=g)
    up = torch.randn(B, T, dtype=torch.float64, generator=g)

    x = y.clone().requires_grad_()
    raw = stacked(x)
    (raw * up).sum().backward()
    x_ref = y.clone().requires_grad_()
    want = torch.cat([h(t(x_ref[i])) for i, (t, h) in enumerate(zip(towers, heads))], dim=1)
    (want * up).sum().backward()

    assert raw.shape == (B, T) and raw.is_contiguous()
    torch.testing.assert_close(raw, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-12, atol=1e-12)
    for layer, (w_TIO, b_TO) in enumerate(zip(stacked.weights, stacked.biases)):
        for t, lin in enumerate(_linears(towers, heads, layer)):
            torch.testing.assert_close(w_TIO.grad[t], lin.weight.grad.t(), rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(b_TO.grad[t], lin.bias.grad, rtol=1e-12, atol=1e-12)


def test_task_towers_dropout_follows_the_module_mode():
    torch.manual_seed(0)
    stacked = TaskTowers(2, 4, [32], dropout=0.5).double()
    no_dropout = TaskTowers(2, 4, [32]).double()
    no_dropout.load_state_dict(stacked.state_dict())
    y = torch.randn(2, 3, 4, dtype=torch.float64)
    stacked.eval()
    torch.testing.assert_close(stacked(y), no_dropout(y), rtol=0, atol=0)
    stacked.train()
    assert not torch.allclose(stacked(y), no_dropout(y))  # masks drawn in training


def test_task_towers_gradients_have_their_parameters_layout():
    # DDP copies each gradient into a bucket view of the parameter's strides and warns on every
    # multi-rank run when they differ (the heads' [T, I, 1] weights included)
    torch.manual_seed(0)
    stacked = TaskTowers(3, 8, [6, 5])
    stacked(torch.randn(3, 4, 8)).sum().backward()
    params = list(stacked.parameters())
    assert len(params) == 6  # 3 layers (2 tower layers and the heads) x weight and bias
    for p in params:
        assert p.grad.stride() == p.stride(), (tuple(p.shape), p.grad.stride())


def test_task_towers_refuse_no_tasks():
    with pytest.raises(ValueError, match="num_tasks"):
        TaskTowers(0, 4, [8])
