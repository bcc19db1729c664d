"""The CUDA paths: the mixed gloo/nccl group, expert-parallel dispatch over NCCL, the trainer on a
GPU with TorchRec's pipeline. They skip where there is no GPU (CI has none)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from recsys_moe.config.schema import ParallelConfig
from recsys_moe.distributed.local_ranks import run_ranks
from recsys_moe.distributed.parallel_dims import ParallelDims
from tests.distributed.test_dispatch_ranks import _check, _rank

GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0
needs_gpu = pytest.mark.skipif(GPUS < 1, reason="needs a CUDA GPU")
needs_two_gpus = pytest.mark.skipif(GPUS < 2, reason="needs two CUDA GPUs")


def _reduce_both(rank: int) -> tuple[float, float]:
    host = torch.tensor([rank + 1.0])
    device = torch.tensor([10.0 * (rank + 1)], device=f"cuda:{rank}")
    dist.all_reduce(host)  # gloo
    dist.all_reduce(device)  # nccl
    return host.item(), device.item()


@needs_gpu
def test_one_process_group_reduces_host_and_device_tensors():
    dims = ParallelDims(world_size=1, ep=1).init("cuda", timeout_s=60)
    try:
        assert dist.get_backend() == "cpu:gloo,cuda:nccl"
        assert _reduce_both(0) == (1.0, 10.0)
    finally:
        dims.close()


@needs_two_gpus
def test_mixed_group_over_two_gpus():
    out = run_ranks(_reduce_both, 2, "cpu:gloo,cuda:nccl")
    assert out == [(3.0, 30.0), (3.0, 30.0)]


@needs_two_gpus
def test_all_to_all_dispatch_over_nccl_equals_local():
    out = run_ranks(_rank, 2, "cpu:gloo,cuda:nccl", 2, [2], "cuda")
    _check(out, 2, 2)


@needs_gpu
def test_trainer_on_a_gpu_with_the_sparse_dist_pipeline(tiny_train_config, tmp_path):
    pytest.importorskip("fbgemm_gpu")
    from tests.tests_support import train_run

    cfg = tiny_train_config
    cfg.trainer.device = "cuda"
    cfg.trainer.pipeline = "sparse_dist"
    cfg.trainer.max_steps = 10
    cfg.parallel = ParallelConfig()
    summary = train_run(cfg, tmp_path)
    assert summary["step"] == 10.0 and 0.0 < summary["eval/click/auc"] < 1.0
