"""run_gloo_ranks, the harness of every multi-rank test and benchmark: a rank's process groups
are gone before its interpreter's teardown, where freeing one can abort the process (gloo's
threads: "terminate called without an active exception"), which would fail a test at random."""

from __future__ import annotations

import atexit
import sys
from pathlib import Path

import pytest
import torch.distributed as dist

from tests.tests_support import gloo_threads, run_gloo_ranks


def _group_in_a_cycle(rank: int, out: str) -> int:
    # as a trainer's modules do: a subgroup reachable only through a reference cycle
    holder: dict = {"group": dist.new_group([0, 1])}
    holder["self"] = holder
    dist.barrier(group=holder["group"])
    atexit.register(lambda: Path(out, f"rank{rank}").write_text(str(gloo_threads(settle_s=1.0))))
    return gloo_threads()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="counts threads in /proc")
def test_a_ranks_groups_are_freed_before_its_interpreter_exits(tmp_path):
    during = run_gloo_ranks(_group_in_a_cycle, 2, str(tmp_path))
    assert all(n > 0 for n in during)  # the count sees the groups' threads while they live
    at_exit = [int((tmp_path / f"rank{r}").read_text()) for r in range(2)]
    assert at_exit == [0, 0]
