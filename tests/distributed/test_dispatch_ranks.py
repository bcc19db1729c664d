"""The all-to-all dispatcher over real gloo ranks equals the local dispatcher on one process, in
outputs and in every gradient (float64, 1e-12), for sparse and dense plans.

The weights are built so that the awkward cases occur: an expert no rank sends anything to, a
rank that receives no row from some other rank, a task that selects nothing remote on a rank,
and ranks with different batch sizes (one of them empty).
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from recsys_moe.moe.dispatch.all_to_all import AllToAllDispatcher
from recsys_moe.moe.dispatch.local import LocalDispatcher
from recsys_moe.moe.experts import ExpertBank
from tests.tests_support import run_gloo_ranks

N, D, T, OUT, HIDDEN = 8, 5, 3, 4, [6]
BATCH = {0: 7, 1: 5, 2: 0, 3: 6}  # examples per rank (rank 2 has none)


def _bank() -> ExpertBank:
    torch.manual_seed(0)
    return ExpertBank(N, D, HIDDEN, OUT).double()


def _inputs(rank: int, world: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [B, D], weights [T, B, N] (rows of convex weights with exact zeros), upstream grad."""
    g = torch.Generator().manual_seed(10 + rank)
    B = BATCH[rank]
    x = torch.randn(B, D, generator=g, dtype=torch.float64)
    logits = torch.randn(T, B, N, generator=g, dtype=torch.float64)
    keep = torch.rand(T, B, N, generator=g) < 0.3
    keep[:, :, N - 1] = False  # expert N-1 (the last rank's) is never selected
    fallback = 0
    if rank == 1:
        keep[:, :, : N // 2] = False  # rank 1's examples never reach the first half's experts
        fallback = N // 2
    if rank == 0:
        keep[0, :, N // 2 :] = False  # rank 0's task 0 selects only the first half's experts
    keep[:, :, fallback] |= ~keep.any(-1)  # every (task, example) keeps at least one expert
    w = torch.where(keep, logits.exp(), torch.zeros((), dtype=torch.float64))
    w = w / w.sum(-1, keepdim=True)
    up = torch.randn(T, B, OUT, generator=g, dtype=torch.float64)
    return x, w, up


def _step(dispatcher, bank: ExpertBank, x, w, up, sparse: bool):
    x = x.clone().requires_grad_()
    w = w.clone().requires_grad_()
    plan = dispatcher.plan(w.detach(), sparse)
    x_in = dispatcher.dispatch(x, plan)
    f = bank.forward_grouped(x_in, plan.counts) if plan.grouped else bank(x_in)
    y = dispatcher.combine(f, w, plan)
    (y * up).sum().backward()
    grads = [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in bank.parameters()]
    return y.detach(), x.grad, w.grad, grads, plan


def _rank(rank: int, world: int, eps: list[int], device: str = "cpu") -> dict:
    """For each ep: ranks in groups of `ep` consecutive ranks; this rank's results per plan."""
    dev = torch.device(device, rank) if device == "cuda" else torch.device(device)
    out = {}
    for ep in eps:
        groups = [dist.new_group(list(range(s, s + ep))) for s in range(0, world, ep)]
        d = AllToAllDispatcher(groups[rank // ep], N)
        for sparse in (True, False):
            bank = _bank().to(dev).shard(d.first_expert, d.num_local)
            x, w, up = (t.to(dev) for t in _inputs(rank, world))
            y, gx, gw, grads, plan = _step(d, bank, x, w, up, sparse)
            out[ep, sparse] = dict(
                y=y.cpu(),
                gx=gx.cpu(),
                gw=gw.cpu(),
                grads=[g.cpu() for g in grads],
                first=d.first_expert,
                counts=plan.count_matrix,
                stats={k: float(v) for k, v in plan.stats.items()},
            )
    return out


def _reference(world: int, ep: int, sparse: bool):
    """One process, every expert local; expert gradients summed over each expert group's ranks."""
    per_rank, bank_grads = [], {}
    for rank in range(world):
        bank = _bank()
        y, gx, gw, grads, _ = _step(LocalDispatcher(), bank, *_inputs(rank, world), sparse)
        per_rank.append((y, gx, gw))
        g = rank // ep
        bank_grads[g] = [a + b for a, b in zip(bank_grads[g], grads)] if g in bank_grads else grads
    return per_rank, bank_grads


@pytest.mark.parametrize("world,eps", [(2, [2]), (4, [2, 4])])
def test_all_to_all_equals_local_dispatch(world, eps):
    out = run_gloo_ranks(_rank, world, world, eps)
    for ep in eps:
        _check(out, world, ep)


def _check(out: list[dict], world: int, ep: int) -> None:
    """Every rank's outputs and gradients equal the one-process reference's."""
    L = N // ep
    for sparse in (True, False):
        ref, ref_grads = _reference(world, ep, sparse)
        for rank in range(world):
            got = out[rank][ep, sparse]
            y, gx, gw = ref[rank]
            torch.testing.assert_close(got["y"], y, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(got["gx"], gx, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(got["gw"], gw, rtol=1e-12, atol=1e-12)
            first = got["first"]
            for mine, full in zip(got["grads"], ref_grads[rank // ep]):
                torch.testing.assert_close(mine, full[first : first + L], rtol=1e-12, atol=1e-12)
    # the awkward cases really occurred (sparse plans)
    counts = out[0][ep, True]["counts"]  # [E_src, 2, E_dst] of rank 0's group
    assert (counts[:, 0, :] == 0).any(), "some rank received no row from some rank"
    assert out[0][ep, True]["stats"]["ep/imbalance"] >= 1.0
    dense_bytes = out[0][ep, False]["stats"]["ep/a2a_bytes"]
    sparse_bytes = out[0][ep, True]["stats"]["ep/a2a_bytes"]
    assert 0 < sparse_bytes < dense_bytes
