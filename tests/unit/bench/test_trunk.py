"""bench.trunk: the trunk's FLOPs and TFLOPS; on a CPU it runs and reports no peak (the GPU run
is prepared in launch/gpu_bench.sh)."""

from __future__ import annotations

import json

from recsys_moe.bench.trunk import bf16_peak_tflops, main


def test_cpu_run_reports_tflops_without_a_peak(tmp_path):
    out = tmp_path / "trunk.json"
    report = main(
        ["--device", "cpu", "--batch", "64", "--repeats", "2", "--warmup", "1", "--out", str(out)]
    )
    assert json.loads(out.read_text())["achieved_tflops"] == report["achieved_tflops"] > 0
    assert report["bf16_peak_tflops"] is None and report["fraction_of_peak"] is None
    # the default trunk: 8 experts 128-256-64, 4 DSelect-k gates (k 2, 3 bits: 8 outputs),
    # 4 towers 64-64 and heads; forward 2 and backward 4 FLOPs per multiply-add
    macs = 8 * (128 * 256 + 256 * 64) + 4 * 128 * 8 + 4 * (64 * 64 + 64)
    assert report["trunk_macs_per_example"] == macs
    assert report["flops_per_step"] == 6 * macs * 64


def test_known_peaks():
    assert bf16_peak_tflops("NVIDIA H200") == 989.4
    assert bf16_peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert bf16_peak_tflops("NVIDIA A10G") is None  # not the A10's figure
    assert bf16_peak_tflops("Some Future GPU") is None
