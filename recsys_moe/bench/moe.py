"""MoE benchmark: gates and expert compute, as ratios of arms run side by side.

    python -m recsys_moe.bench.moe --out bench_moe.json

For each number of experts n (default 8, 16, 64), forward + backward, median over repeats:
- gate: the per-example DSelect-k gate (k = 2) vs the per-example softmax gate, same input, for
  each DSelect-k kernel (model.gate.kernel: reference, fused, native, compiled); ratio
  `dselect_k_gate_vs_softmax_gate` for --kernel (default native, the configured default; goal
  <= 1.5 at n = 16), `dselect_k_<kernel>_gate_vs_softmax_gate` for each;
- MoE layer with T = 4 converged k-sparse DSelect-k gates (every selector saturated, each example
  routed to its own experts): sparse expert compute vs dense; ratio `sparse_vs_dense_moe` next to
  `ideal_sparse_vs_dense` = (active experts per example, union over tasks) / n
  (goal: sparse_vs_dense_moe <= 1.2 x ideal_sparse_vs_dense at n = 16).
Ratios for n = 16 are top-level keys of "ratios"; every n is under "ratios_by_n".
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from recsys_moe.bench.common import environment, measure, median_ms, table, write_report
from recsys_moe.config.schema import ExpertCompute
from recsys_moe.moe.experts import ExpertBank
from recsys_moe.moe.gates import DSelectKGate, SoftmaxGate
from recsys_moe.moe.layer import MultiTaskMoE


def converged_gates(n: int, k: int, tasks: int, dim: int) -> list[DSelectKGate]:
    """Per-example DSelect-k gates whose selectors are all saturated: |z| >> gamma / 2."""
    gates = []
    for _ in range(tasks):
        g = DSelectKGate(n, dim, k=k)
        with torch.no_grad():
            km = g.k * g.num_bits
            g.proj.weight[:km] = 1e4 * torch.randn_like(g.proj.weight[:km])
        gates.append(g)
    return gates


def _fwd_bwd(module: torch.nn.Module, forward, grad: torch.Tensor):
    """One timed call: zero the module's gradients, run forward, backpropagate `grad`."""

    def run() -> None:
        module.zero_grad(set_to_none=True)
        forward().backward(grad)

    return run


def bench_gates(
    n: int, k: int, batch: int, dim: int, repeats: int, kernels: list[str], kernel: str
) -> dict[str, float]:
    x = torch.randn(batch, dim, requires_grad=True)
    gates: dict[str, torch.nn.Module] = {"softmax": SoftmaxGate(n, dim)}
    for name in kernels:
        gates[f"dselect_k_{name}"] = DSelectKGate(n, dim, k=k, kernel=name)
    grad = torch.randn(batch, n)

    arms = {name: _fwd_bwd(g, lambda g=g: g(x).weights, grad) for name, g in gates.items()}
    times = measure(arms, repeats)
    soft = median_ms(times["softmax"])
    out = {"softmax_gate_ms": soft}
    for name in kernels:
        ms = median_ms(times[f"dselect_k_{name}"])
        out[f"dselect_k_{name}_gate_ms"] = ms
        out[f"dselect_k_{name}_gate_vs_softmax_gate"] = ms / soft
    out["dselect_k_gate_ms"] = out[f"dselect_k_{kernel}_gate_ms"]
    out["dselect_k_gate_vs_softmax_gate"] = out[f"dselect_k_{kernel}_gate_vs_softmax_gate"]
    return out


def bench_layer(
    n: int, k: int, tasks: int, batch: int, dim: int, hidden: int, out_dim: int, repeats: int
) -> dict[str, float]:
    torch.manual_seed(0)
    gates = converged_gates(n, k, tasks, dim)
    bank = ExpertBank(n, dim, [hidden], out_dim)
    layers = {
        mode.value: MultiTaskMoE(bank, gates, compute=mode)
        for mode in (ExpertCompute.dense, ExpertCompute.sparse)
    }
    x = torch.randn(batch, dim, requires_grad=True)
    grad = torch.randn(tasks, batch, out_dim)
    with torch.no_grad():
        w = torch.stack([g(x).weights for g in gates])
        active_per_example = (w != 0).any(0).sum(-1).double().mean().item()

    arms = {name: _fwd_bwd(m, lambda m=m: m(x).y, grad) for name, m in layers.items()}
    times = measure(arms, repeats)
    dense, sparse = median_ms(times["dense"]), median_ms(times["sparse"])
    ideal = active_per_example / n
    return {
        "dense_moe_ms": dense,
        "sparse_moe_ms": sparse,
        "active_experts_per_example": active_per_example,
        "sparse_vs_dense_moe": sparse / dense,
        "ideal_sparse_vs_dense": ideal,
        "sparse_over_ideal": (sparse / dense) / ideal,
    }


def main(argv: list[str] | None = None) -> dict[str, object]:
    p = argparse.ArgumentParser(description="MoE gate and expert-compute benchmark (ratios).")
    p.add_argument("--out", type=Path, default=None, help="write the JSON report here")
    p.add_argument("--experts", type=int, nargs="+", default=[8, 16, 64])
    p.add_argument("--k", type=int, default=2)
    p.add_argument("--tasks", type=int, default=4)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--dim", type=int, default=128, help="MoE input width")
    p.add_argument("--hidden", type=int, default=256, help="expert hidden width")
    p.add_argument("--out-dim", type=int, default=128, help="expert output width")
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument(
        "--kernels",
        nargs="+",
        default=["reference", "fused", "native", "compiled"],
        choices=["reference", "fused", "native", "compiled"],
        help="DSelect-k kernels measured (model.gate.kernel)",
    )
    p.add_argument(
        "--kernel", default="native", help="the kernel of the headline ratio (the config default)"
    )
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.kernel not in args.kernels:
        p.error(f"--kernel {args.kernel} is not among --kernels {args.kernels}")
    torch.manual_seed(args.seed)

    rows, by_n = [], {}
    for n in args.experts:
        r = {"n": n}
        r.update(
            bench_gates(n, args.k, args.batch, args.dim, args.repeats, args.kernels, args.kernel)
        )
        r.update(
            bench_layer(
                n, args.k, args.tasks, args.batch, args.dim, args.hidden, args.out_dim, args.repeats
            )
        )
        rows.append(r)
        by_n[str(n)] = {key: v for key, v in r.items() if key != "n"}
        print(table([r], list(r)), flush=True)

    headline = by_n.get("16", next(iter(by_n.values())))
    ratios = {
        "dselect_k_gate_vs_softmax_gate": headline["dselect_k_gate_vs_softmax_gate"],
        **{
            f"dselect_k_{name}_gate_vs_softmax_gate": headline[
                f"dselect_k_{name}_gate_vs_softmax_gate"
            ]
            for name in args.kernels
        },
        "sparse_vs_dense_moe": headline["sparse_vs_dense_moe"],
        "ideal_sparse_vs_dense": headline["ideal_sparse_vs_dense"],
    }
    goals = {
        "dselect_k_gate_vs_softmax_gate <= 1.5": ratios["dselect_k_gate_vs_softmax_gate"] <= 1.5,
        "sparse_vs_dense_moe <= 1.2 x ideal_sparse_vs_dense": ratios["sparse_vs_dense_moe"]
        <= 1.2 * ratios["ideal_sparse_vs_dense"],
    }
    report = {
        "benchmark": "moe",
        "config": vars(args) | {"out": str(args.out) if args.out else None},
        "environment": environment(),
        "ratios": ratios,
        "ratios_by_n": by_n,
        "goals_met": goals,
    }
    print()
    print(
        table(
            rows,
            [
                "n",
                "softmax_gate_ms",
                "dselect_k_gate_ms",
                "dselect_k_gate_vs_softmax_gate",
                "dense_moe_ms",
                "sparse_moe_ms",
                "active_experts_per_example",
                "sparse_vs_dense_moe",
                "ideal_sparse_vs_dense",
            ],
        )
    )
    print("goals:", ", ".join(f"{k}: {'met' if v else 'MISSED'}" for k, v in goals.items()))
    write_report(args.out, report)
    return report


if __name__ == "__main__":
    main()
