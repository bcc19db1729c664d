"""ExpertGradSync on two gloo ranks (dp 2): the all-reduce starts inside backward once every
expert gradient has arrived, and gives the same gradients as reducing after backward, also on a
step where one rank's parameter got no gradient (that rank reduces late, the other early)."""

from __future__ import annotations

import torch
from torch import nn

from recsys_moe.distributed.expert_parallel import ExpertGradSync
from recsys_moe.distributed.parallel_dims import ParallelDims
from tests.tests_support import run_gloo_ranks


def _coef(rank: int, shape) -> torch.Tensor:
    g = torch.Generator().manual_seed(100 + rank)
    return torch.randn(shape, generator=g, dtype=torch.float64)


def _sync_steps(rank: int) -> dict:
    dims = ParallelDims(world_size=2, ep=1, rank=rank).init("cpu", timeout_s=60)
    a = nn.Parameter(torch.zeros(3, 4, dtype=torch.float64))
    b = nn.Parameter(torch.zeros(5, dtype=torch.float64))
    sync = ExpertGradSync([a, b], dims)
    out: dict = {}
    try:
        # step 1: both parameters get gradients on both ranks
        ((a * _coef(rank, (3, 4))).sum() + (b * _coef(rank, (5,))).sum()).backward()
        out["started_in_backward"] = sync._pending is not None
        sync()
        out["step1"] = (a.grad.clone(), b.grad.clone())
        # step 2: rank 1 does not use b (no gradient): it reduces after backward, rank 0 inside
        a.grad = b.grad = None
        loss = (a * _coef(rank, (3, 4))).sum()
        if rank == 0:
            loss = loss + (b * _coef(rank, (5,))).sum()
        loss.backward()
        out["step2_started"] = sync._pending is not None
        sync()
        out["step2"] = (a.grad.clone(), b.grad.clone())
        out["overlapped_steps"] = sync.overlapped_steps
        # two backward passes before one step: refused, not silently half-reduced
        a.grad = b.grad = None
        ((a + b.sum()).sum()).backward()
        try:
            ((a + b.sum()).sum()).backward()
            out["second_backward"] = "accepted"
        except RuntimeError as e:
            out["second_backward"] = str(e)
        sync()  # completes the started all-reduce on both ranks
        sync.close()
        a.grad = b.grad = None
        ((a + b.sum()).sum()).backward()
        out["after_close_started"] = sync._pending is not None
    finally:
        dims.close()
    return out


def test_the_all_reduce_starts_in_backward_and_equals_reducing_after_it():
    r0, r1 = run_gloo_ranks(_sync_steps, 2)
    c = [(_coef(r, (3, 4)), _coef(r, (5,))) for r in (0, 1)]
    want1 = ((c[0][0] + c[1][0]) / 2, (c[0][1] + c[1][1]) / 2)
    want2 = ((c[0][0] + c[1][0]) / 2, c[0][1] / 2)  # rank 1's b: zero, not missing
    for r in (r0, r1):
        assert r["started_in_backward"] is True
        for got, want in zip(r["step1"], want1):
            torch.testing.assert_close(got, want, rtol=0, atol=1e-15)
        for got, want in zip(r["step2"], want2):
            torch.testing.assert_close(got, want, rtol=0, atol=1e-15)
        assert "two backward passes" in r["second_backward"]
        assert r["after_close_started"] is False
    assert (r0["step2_started"], r1["step2_started"]) == (True, False)
    assert (r0["overlapped_steps"], r1["overlapped_steps"]) == (2, 1)


def test_without_replicas_nothing_is_reduced_in_backward():
    dims = ParallelDims(world_size=1, ep=1, rank=0)  # dp 1: no group needed, none made
    p = nn.Parameter(torch.ones(2))
    sync = ExpertGradSync([p], dims)
    (p * 3).sum().backward()
    assert sync._pending is None
    sync()
    torch.testing.assert_close(p.grad, torch.full((2,), 3.0))
    assert sync.overlapped_steps == 0
