"""Gate telemetry summed over real gloo ranks equals one process that saw every batch."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from recsys_moe.metrics.gates import GateTelemetry
from recsys_moe.moe.gates import DSelectKGate
from tests.tests_support import run_gloo_ranks

WORLD = 2
TASKS = ["a", "b"]


def _batches(rank: int) -> list[torch.Tensor]:
    """Rank r's gate inputs: batches of different sizes (5 and 3 rows on rank 0, 7 on rank 1)."""
    g = torch.Generator().manual_seed(100 + rank)
    return [torch.randn(n, 4, generator=g) for n in ([5, 3] if rank == 0 else [7])]


def _gates() -> list[DSelectKGate]:
    torch.manual_seed(0)
    gates = [DSelectKGate(8, 4, k=2, gamma=1.0) for _ in TASKS]
    with torch.no_grad():  # logits spread over the window: some selectors saturated, some not
        for g in gates:
            g.proj.weight.mul_(300.0)
    return gates


def _update(tel: GateTelemetry, gates, x: torch.Tensor) -> None:
    with torch.no_grad():
        tel.update([g.eval()(x) for g in gates])


def _rank(rank: int) -> dict[str, float]:
    tel, gates = GateTelemetry(TASKS, 8, torch.device("cpu")), _gates()
    for x in _batches(rank):
        _update(tel, gates, x)
    tel.reduce(dist.group.WORLD)
    return tel.compute()


def test_reduced_telemetry_equals_the_single_process_one():
    out = run_gloo_ranks(_rank, WORLD)
    tel, gates = GateTelemetry(TASKS, 8, torch.device("cpu")), _gates()
    for rank in range(WORLD):
        for x in _batches(rank):
            _update(tel, gates, x)
    want = tel.compute()
    assert 0.0 < want["gate/a/saturated_fraction"] < 1.0  # a mix, so the weighting matters
    for rank in range(WORLD):
        got = dict(out[rank])
        assert got.keys() == want.keys()
        for key, value in want.items():
            assert got[key] == pytest.approx(value, rel=1e-12, abs=1e-12), key
