"""Expert-gradient all-reduce benchmark: started inside backward vs after it, on gloo ranks.

    python -m recsys_moe.bench.expert_grads --out bench_expert_grads.json

Spawns --world CPU ranks (gloo, one thread each) that train the default job's model
(conf/train.yaml on synthetic data, dense expert compute) with parallel.ep_size = --ep, so that
world / ep groups hold replicas of each expert shard and their gradients are all-reduced every
step (distributed/expert_parallel.py, ExpertGradSync). Two arms alternate in blocks of --steps
steps (the order flips every block), the same batches in memory:
- overlap: the all-reduce starts inside backward, once the experts' gradients have all arrived
  (parallel.overlap_expert_grads=true, the default);
- after_backward: it runs after backward.
Each step starts after a barrier and is timed from zero_grad to the optimizer step. Reported per
rank: the medians of the step and of the wait in ExpertGradSync after backward, and
`overlap_step_vs_after_backward` (ratio of the step medians; below 1 is faster).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist

from recsys_moe.bench.common import environment, table, write_report
from recsys_moe.distributed.local_ranks import run_gloo_ranks

ARMS = ("overlap", "after_backward")


def _rank(rank: int, data: str, work: str, args: dict[str, Any]) -> dict[str, Any]:
    from recsys_moe.bench.trainer import compose_config, held_batches, training_only
    from recsys_moe.distributed.expert_parallel import ExpertGradSync
    from recsys_moe.trainer import Trainer

    torch.set_num_threads(1)
    cfg = compose_config(
        [
            *training_only(Path(data)),
            "trainer.num_threads=1",
            f"parallel.ep_size={args['ep']}",
            f"data.batch_size={args['batch']}",
            "model.expert_compute=dense",
            *args["override"],
        ]
    )
    trainer = Trainer(cfg, Path(work) / f"rank{rank}")
    try:
        batches = held_batches(trainer, args["steps"])
        params, dims = trainer.expert_grad_sync.params, trainer.expert_grad_sync.dims
        step_s: dict[str, list[float]] = {a: [] for a in ARMS}
        wait_s: dict[str, list[float]] = {a: [] for a in ARMS}
        overlapped = dict.fromkeys(ARMS, 0)
        trainer.model.train()
        for block in range(args["blocks"]):
            for arm in ARMS if block % 2 == 0 else ARMS[::-1]:
                trainer.expert_grad_sync.close()
                sync = ExpertGradSync(params, dims, overlap=arm == "overlap")
                trainer.expert_grad_sync = sync
                for batch in batches:
                    dist.barrier()
                    t0 = time.perf_counter()
                    trainer.optimizer.zero_grad(set_to_none=True)
                    loss, _ = trainer.forward(batch)
                    loss.backward()
                    t1 = time.perf_counter()
                    sync()
                    t2 = time.perf_counter()
                    trainer.optimizer.step()
                    step_s[arm].append(time.perf_counter() - t0)
                    wait_s[arm].append(t2 - t1)
                overlapped[arm] += sync.overlapped_steps
        return {
            "step_ms": {a: 1000 * statistics.median(v) for a, v in step_s.items()},
            "wait_ms": {a: 1000 * statistics.median(v) for a, v in wait_s.items()},
            "overlapped_steps": overlapped,
            "expert_floats": sum(p.numel() for p in params),
            "dp": dims.dp,
        }
    finally:
        trainer.close()


def run(args: argparse.Namespace) -> dict[str, Any]:
    from recsys_moe.data.synthetic import SyntheticSpec, write

    if args.world // args.ep < 2:
        raise ValueError(
            f"--world {args.world} / --ep {args.ep}: the experts need at least 2 replicas "
            "(world / ep >= 2) to be all-reduced"
        )
    with tempfile.TemporaryDirectory(prefix="bench_expert_grads_") as work:
        data = Path(work) / "data"
        rows = max(2 * args.steps * args.batch, 65_536)  # row groups for every rank's shards
        write(SyntheticSpec(train_rows=rows, eval_rows=1000, row_group_size=4096), data)
        knobs = {k: getattr(args, k) for k in ("ep", "batch", "steps", "blocks", "override")}
        ranks = run_gloo_ranks(_rank, args.world, str(data), work, knobs)
    ratios = [r["step_ms"]["overlap"] / r["step_ms"]["after_backward"] for r in ranks]
    return {
        "benchmark": "expert_grads",
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "environment": environment() | {"threads": 1},
        "ranks": ranks,
        "ratios": {
            "overlap_step_vs_after_backward": max(ratios),  # the slowest rank's
            "per_rank": ratios,
        },
    }


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description="Expert-gradient all-reduce: in vs after backward.")
    p.add_argument("--out", type=Path, default=None, help="write the JSON report here")
    p.add_argument("--world", type=int, default=4)
    p.add_argument("--ep", type=int, default=2)
    p.add_argument("--batch", type=int, default=2048, help="global batch")
    p.add_argument("--steps", type=int, default=8, help="steps per block")
    p.add_argument("--blocks", type=int, default=8, help="blocks per arm (alternated)")
    p.add_argument("--override", action="append", default=[], help="a Hydra override")
    args = p.parse_args(argv)
    report = run(args)
    rows = [
        {
            "rank": r,
            "step_overlap_ms": x["step_ms"]["overlap"],
            "step_after_ms": x["step_ms"]["after_backward"],
            "wait_overlap_ms": x["wait_ms"]["overlap"],
            "wait_after_ms": x["wait_ms"]["after_backward"],
            "ratio": report["ratios"]["per_rank"][r],
        }
        for r, x in enumerate(report["ranks"])
    ]
    print(table(rows, list(rows[0])))
    print(
        "overlap_step_vs_after_backward (slowest rank): "
        f"{report['ratios']['overlap_step_vs_after_backward']:.3f}"
    )
    write_report(args.out, report)
    return report


if __name__ == "__main__":
    main()
