"""optim.dense.fused: the fused kernels where torch has them, the same steps as the default."""

from __future__ import annotations

import pytest
import torch

from recsys_moe.config.schema import DenseOptimConfig
from recsys_moe.trainer import build_dense_optimizer


def _steps(cfg: DenseOptimConfig) -> tuple[torch.optim.Optimizer, list[torch.Tensor]]:
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(7, 3)), torch.nn.Parameter(torch.randn(5))]
    opt = build_dense_optimizer(params, cfg)
    for step in range(4):
        opt.zero_grad()
        loss = sum((p * (step + 1)).sin().sum() for p in params)
        loss.backward()
        opt.step()
    return opt, [p.detach() for p in params]


@pytest.mark.parametrize("name", ["adam", "adamw", "sgd"])
def test_fused_by_default_where_available_and_the_same_steps(name):
    fused, got = _steps(DenseOptimConfig(name=name, lr=0.01, weight_decay=0.01))
    plain, want = _steps(DenseOptimConfig(name=name, lr=0.01, weight_decay=0.01, fused=False))
    assert fused.defaults["fused"] is True  # torch 2.13 has CPU kernels for all three
    assert not plain.defaults.get("fused")
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_required_fused_names_the_key_where_torch_has_none():
    params = [torch.nn.Parameter(torch.empty(3, device="meta"))]  # no fused kernel on meta
    with pytest.raises(ValueError, match=r"optim\.dense\.fused \(true\)"):
        build_dense_optimizer(params, DenseOptimConfig(fused=True))
    opt = build_dense_optimizer(params, DenseOptimConfig())  # null: falls back
    assert not opt.defaults.get("fused")


def test_unknown_name():
    with pytest.raises(ValueError, match=r"optim\.dense\.name \(lamb\)"):
        build_dense_optimizer([torch.nn.Parameter(torch.ones(1))], DenseOptimConfig(name="lamb"))
