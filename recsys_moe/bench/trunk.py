"""The MoE trunk's achieved throughput on its own, in TFLOPS, against the device's bf16 peak.

    python -m recsys_moe.bench.trunk --device cuda --out bench_trunk.json

The default job's trunk (experts 128 -> 256 -> 64 on every example, T per-example gates, towers
and heads; model.* keys through --override) on random MoE inputs of --batch rows, forward and
backward under bf16 autocast (--precision), timed with the device synchronised, median over
--repeats. FLOPs counted: 2 per multiply-add forward, 4 backward (the input and the weight
gradients), over every expert on every example (the dense path: --compute dense, the default;
sparse paths do fewer FLOPs than counted, so their "achieved" figure would overstate).

`fraction_of_peak` divides by the device's dense bf16 peak: the datasheet figure of a known GPU
(table below; --peak-tflops for others), none on CPUs (their figure is reported alone).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Any, Optional

import torch

from recsys_moe.bench.common import environment, table, write_report

# Dense (no sparsity) bf16 tensor-core peaks from the vendors' datasheets, TFLOPS, matched by
# substring of torch.cuda.get_device_name(), most specific first.
BF16_PEAK_TFLOPS: list[tuple[str, Optional[float]]] = [
    ("H200", 989.4),
    ("H100 NVL", 835.0),
    ("H100 PCIe", 756.0),
    ("H100", 989.4),  # SXM
    ("GH200", 989.4),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("A10G", None),  # no public bf16 figure: give --peak-tflops
    ("A10", 125.0),
    ("L40S", 362.0),
    ("L40", 181.0),
    ("L4", 121.0),
]


def bf16_peak_tflops(device_name: str) -> Optional[float]:
    """The datasheet's dense bf16 peak of a known GPU, else None."""
    return next((peak for key, peak in BF16_PEAK_TFLOPS if key in device_name), None)


def build_trunk(overrides: list[str], compute: str):
    """The trunk of conf/train.yaml's model (with overrides): MultiTaskMoE, and the towers and
    heads (TaskTowers), run as the ranker runs them."""
    from recsys_moe.bench.trainer import compose_config, moe_input_width, trunk_macs
    from recsys_moe.config.schema import ExpertCompute
    from recsys_moe.modules.mlp import TaskTowers
    from recsys_moe.moe.experts import ExpertBank
    from recsys_moe.moe.gates import build_gate
    from recsys_moe.moe.layer import MultiTaskMoE

    cfg = compose_config(["data.path=unused", *overrides])
    m, tasks, d = cfg.model, len(cfg.data.tasks), moe_input_width(cfg)
    moe = MultiTaskMoE(
        ExpertBank(m.num_experts, d, m.expert_hidden, m.expert_dim, kernel=m.expert_kernel),
        [build_gate(m.gate, m.num_experts, d) for _ in range(tasks)],
        compute=ExpertCompute(compute),
    )
    return moe, TaskTowers(tasks, m.expert_dim, m.tower), d, trunk_macs(cfg)


def run(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available on this machine")
    torch.manual_seed(0)
    moe, towers, width, macs = build_trunk(args.override, args.compute)
    moe.to(device)
    towers.to(device)
    x = torch.randn(args.batch, width, device=device, requires_grad=True)
    bf16 = args.precision == "bf16"

    def step() -> None:
        moe.zero_grad(set_to_none=True)
        towers.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            y = moe(x).y
            out = towers(y)
        out.float().square().mean().backward()

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(args.warmup):
        step()
    sync()
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    seconds = statistics.median(times)
    flops = 6.0 * macs * args.batch  # 2 forward + 4 backward per multiply-add
    achieved = flops / seconds / 1e12
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = args.peak_tflops or (bf16_peak_tflops(name) if device.type == "cuda" else None)
    return {
        "benchmark": "trunk",
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "environment": environment(),
        "device_name": name,
        "trunk_macs_per_example": macs,
        "flops_per_step": flops,
        "median_step_s": seconds,
        "achieved_tflops": achieved,
        "bf16_peak_tflops": peak,
        "fraction_of_peak": achieved / peak if peak else None,
    }


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description="MoE trunk TFLOPS against the device's bf16 peak.")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=65536)
    p.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    p.add_argument("--compute", choices=["dense", "sparse", "auto"], default="dense")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--peak-tflops", type=float, default=None, help="the device's bf16 peak")
    p.add_argument("--override", action="append", default=[], help="e.g. model.num_experts=64")
    args = p.parse_args(argv)
    report = run(args)
    keys = ["device_name", "trunk_macs_per_example", "median_step_s", "achieved_tflops"]
    keys += ["bf16_peak_tflops", "fraction_of_peak"]
    print(table([report], keys))
    write_report(args.out, report)
    return report


if __name__ == "__main__":
    main()
