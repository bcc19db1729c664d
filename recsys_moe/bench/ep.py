"""Expert-parallel benchmark: gloo ranks on CPU, ratios of arms run side by side.

    python -m recsys_moe.bench.ep --out bench_ep.json

Two spawned ranks (one thread each), the MoE layer of bench.moe (T = 4 per-example DSelect-k
gates, k = 2, n = 16 experts of 128 -> 256 -> 128, batch 4096 per rank), forward + backward:
- `ep2_step_vs_single`: the layer with its experts split over the two ranks (8 each, all-to-all
  dispatch, sparse plan) vs the same layer with all 16 experts on each rank and no
  communication, at the same per-rank batch; both ranks run each arm at the same time (arms
  interleaved, medians; the slower rank's ratio). Goal <= 1.3 on CPU.
- `sparse_vs_dense_a2a_bytes`: bytes the group sends between ranks per step (both directions,
  forward and backward; counted from the split sizes) with the sparse plan vs the dense plan
  (every example to every rank), for gates at three stages of saturation, next to the fraction
  of active (example, expert) pairs and of (example, rank) pairs. Sparse bytes follow the active
  pairs for the outputs and the active (example, rank) pairs for the inputs.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch
import torch.distributed as dist

from recsys_moe.bench.common import environment, measure, table, write_report
from recsys_moe.bench.moe import converged_gates
from recsys_moe.config.schema import ExpertCompute
from recsys_moe.distributed.local_ranks import run_gloo_ranks
from recsys_moe.moe.dispatch.all_to_all import AllToAllDispatcher
from recsys_moe.moe.experts import ExpertBank
from recsys_moe.moe.gates import DSelectKGate
from recsys_moe.moe.layer import MultiTaskMoE

WORLD = 2


def _gates(args, scale: float) -> list[DSelectKGate]:
    """Per-example gates whose selector logits are scaled by `scale`: 1 is the init (every
    selector inside the smooth-step window: dense), large values saturate them (k-sparse)."""
    if scale >= 1e4:
        return converged_gates(args.experts, args.k, args.tasks, args.dim)
    gates = [DSelectKGate(args.experts, args.dim, k=args.k) for _ in range(args.tasks)]
    with torch.no_grad():
        for g in gates:
            km = g.k * g.num_bits
            g.proj.weight[:km] *= scale
    return gates


def _layers(args, gates, rank: int) -> dict[str, MultiTaskMoE]:
    bank = ExpertBank(args.experts, args.dim, [args.hidden], args.out_dim)
    single = MultiTaskMoE(bank, gates, compute=ExpertCompute.sparse)
    ep = MultiTaskMoE(bank, gates, compute=ExpertCompute.sparse)
    d = AllToAllDispatcher(dist.group.WORLD, args.experts)
    ep.use_experts(bank.shard(d.first_expert, d.num_local), d)
    return {"single": single, "ep2": ep}


def _rank(rank: int, args) -> dict:
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)  # the same gates and experts on both ranks
    x = torch.randn(args.batch, args.dim, generator=torch.Generator().manual_seed(rank))
    x.requires_grad_()
    grad = torch.randn(args.tasks, args.batch, args.out_dim)

    out: dict = {"bytes": []}
    for scale in (1.0, 30.0, 1e4):
        gates = _gates(args, scale)
        layer = _layers(args, gates, rank)["ep2"]
        row = {"selector_scale": scale}
        for mode in (ExpertCompute.sparse, ExpertCompute.dense):
            layer.compute = mode
            res = layer(x)
            res.y.backward(grad)
            row[f"{mode.value}_bytes"] = float(res.stats["ep/a2a_bytes"])
        with torch.no_grad():
            w = torch.stack([g(x).weights for g in gates])
        active = (w != 0).any(0)  # [B, N]
        row["active_pair_fraction"] = active.double().mean().item()
        row["active_example_rank_fraction"] = (
            active.view(args.batch, WORLD, -1).any(-1).double().mean().item()
        )
        row["sparse_vs_dense_a2a_bytes"] = row["sparse_bytes"] / row["dense_bytes"]
        out["bytes"].append(row)

    layers = _layers(args, _gates(args, 1e4), rank)

    def arm(layer: MultiTaskMoE):
        def run() -> None:
            dist.barrier()  # both ranks start each call together
            layer.zero_grad(set_to_none=True)
            layer(x).y.backward(grad)

        return run

    times = measure({name: arm(m) for name, m in layers.items()}, args.repeats)
    ratios = [e / s for e, s in zip(times["ep2"], times["single"])]
    out["single_ms"] = 1000 * statistics.median(times["single"])
    out["ep2_ms"] = 1000 * statistics.median(times["ep2"])
    out["ep2_step_vs_single"] = statistics.median(ratios)
    return out


def main(argv: list[str] | None = None) -> dict[str, object]:
    p = argparse.ArgumentParser(description="Expert-parallel benchmark on gloo ranks (ratios).")
    p.add_argument("--out", type=Path, default=None, help="write the JSON report here")
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--k", type=int, default=2)
    p.add_argument("--tasks", type=int, default=4)
    p.add_argument("--batch", type=int, default=4096, help="examples per rank")
    p.add_argument("--dim", type=int, default=128, help="MoE input width")
    p.add_argument("--hidden", type=int, default=256, help="expert hidden width")
    p.add_argument("--out-dim", type=int, default=128, help="expert output width")
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.experts % WORLD:
        raise ValueError(f"--experts ({args.experts}) must be divisible by {WORLD} ranks")

    results = run_gloo_ranks(_rank, WORLD, args)
    slow = max(range(WORLD), key=lambda r: results[r]["ep2_step_vs_single"])
    rows = results[0]["bytes"]  # byte counts cover the whole group: the same on every rank
    headline = rows[-1]
    ratios = {
        "ep2_step_vs_single": results[slow]["ep2_step_vs_single"],
        "sparse_vs_dense_a2a_bytes": headline["sparse_vs_dense_a2a_bytes"],
        "active_pair_fraction": headline["active_pair_fraction"],
    }
    goals = {"ep2_step_vs_single <= 1.3": ratios["ep2_step_vs_single"] <= 1.3}
    report = {
        "benchmark": "ep",
        "config": vars(args) | {"out": str(args.out) if args.out else None, "world": WORLD},
        "environment": environment() | {"threads_per_rank": 1},
        "ratios": ratios,
        "per_rank": [
            {k: r[k] for k in ("single_ms", "ep2_ms", "ep2_step_vs_single")} for r in results
        ],
        "bytes_by_saturation": rows,
        "goals_met": goals,
    }
    print(table(report["per_rank"], ["single_ms", "ep2_ms", "ep2_step_vs_single"]))
    print()
    print(
        table(
            rows,
            [
                "selector_scale",
                "active_pair_fraction",
                "active_example_rank_fraction",
                "sparse_bytes",
                "dense_bytes",
                "sparse_vs_dense_a2a_bytes",
            ],
        )
    )
    print("goals:", ", ".join(f"{k}: {'met' if v else 'MISSED'}" for k, v in goals.items()))
    write_report(args.out, report)
    return report


if __name__ == "__main__":
    main()
