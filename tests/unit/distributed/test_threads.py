"""trainer.num_threads: by default each rank takes its share of the cores it may run on."""

from __future__ import annotations

import pytest
import torch

from recsys_moe.distributed import threads


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("cores, local_world, want", [(16, None, 16), (16, "4", 4), (2, "4", 1)])
def test_threads_per_rank_is_the_share_of_the_affinity_set(monkeypatch, cores, local_world, want):
    monkeypatch.setattr(threads, "available_cores", lambda: cores)
    if local_world is None:
        monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    else:
        monkeypatch.setenv("LOCAL_WORLD_SIZE", local_world)
    assert threads.threads_per_rank() == want


def test_set_num_threads(monkeypatch, restore_threads):
    monkeypatch.setattr(threads, "available_cores", lambda: 6)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert threads.set_num_threads(None) == 3 == torch.get_num_threads()
    assert threads.set_num_threads(1) == 1 == torch.get_num_threads()
    assert threads.set_num_threads(0) == 1  # 0: left as it was
    with pytest.raises(ValueError, match=r"trainer\.num_threads \(-1\) must be >= 0"):
        threads.set_num_threads(-1)
