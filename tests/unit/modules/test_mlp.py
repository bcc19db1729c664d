"""modules/mlp.py: task_mlps runs every task's tower and head as one batched MLP, with the
values and gradients of the per-task calls it replaces (float64)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from recsys_moe.modules.mlp import MLP, task_mlps


def _towers(T: int, width: int, hidden: list[int], dropout: float = 0.0):
    torch.manual_seed(0)
    towers = nn.ModuleList(MLP(width, hidden, dropout) for _ in range(T)).double()
    heads = nn.ModuleList(nn.Linear(towers[0].out_dim, 1) for _ in range(T)).double()
    return towers, heads


@pytest.mark.parametrize("hidden", [[], [16], [16, 8]])
def test_task_mlps_equal_the_towers_and_heads_called_one_by_one(hidden):
    T, B, width = 3, 11, 5
    towers, heads = _towers(T, width, hidden)
    g = torch.Generator().manual_seed(0)
    y = torch.randn(T, B, width, dtype=torch.float64, generator=g)
    up = torch.randn(B, T, dtype=torch.float64, generator=g)

    def run(batched: bool):
        x = y.clone().requires_grad_()
        if batched:
            raw = task_mlps(x, towers, heads)
        else:
            raw = torch.cat([h(t(x[i])) for i, (t, h) in enumerate(zip(towers, heads))], dim=1)
        (raw * up).sum().backward()
        grads = [p.grad.clone() for p in [*towers.parameters(), *heads.parameters()]]
        towers.zero_grad(set_to_none=True)
        heads.zero_grad(set_to_none=True)
        return [raw.detach(), x.grad, *grads]

    got, want = run(batched=True), run(batched=False)
    assert got[0].shape == (B, T) and got[0].is_contiguous()
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_task_mlps_dropout_follows_the_towers_mode():
    towers, heads = _towers(2, 4, [32], dropout=0.5)
    y = torch.randn(2, 64, 4, dtype=torch.float64)
    towers.eval()
    want = torch.cat([h(t(y[i])) for i, (t, h) in enumerate(zip(towers, heads))], dim=1)
    torch.testing.assert_close(task_mlps(y, towers, heads), want, rtol=1e-12, atol=1e-12)
    towers.train()
    assert not torch.allclose(task_mlps(y, towers, heads), want)  # masks drawn in training


def test_task_mlps_refuses_towers_of_different_depths():
    towers = nn.ModuleList([MLP(4, [8]), MLP(4, [8, 8])])
    heads = nn.ModuleList([nn.Linear(8, 1), nn.Linear(8, 1)])
    with pytest.raises(ValueError, match="differ in depth"):
        task_mlps(torch.randn(2, 3, 4), towers, heads)


def test_task_mlps_gradients_have_their_parameters_layout():
    # DDP copies each gradient into a bucket view of the parameter's strides and warns on every
    # multi-rank run when they differ (a [1, I] head's slice of the batched gradient had (1, 1))
    torch.manual_seed(0)
    towers = [MLP(8, [6, 5]) for _ in range(3)]
    heads = [nn.Linear(5, 1) for _ in range(3)]
    task_mlps(torch.randn(3, 4, 8), towers, heads).sum().backward()
    params = [p for m in (*towers, *heads) for p in m.parameters()]
    assert len(params) == 18
    for p in params:
        assert p.grad.stride() == p.stride(), (tuple(p.shape), p.grad.stride())
