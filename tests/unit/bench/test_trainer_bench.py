"""bench.trainer: the DLRM it compares against does the trunk's work per example, and a tiny run
reports every ratio its goals name, from arms that took the paths they claim, and prints each
beside the quartiles of its rounds."""

from __future__ import annotations

import json

import pytest
import torch
import torch.distributed as dist

from recsys_moe.bench.trainer import (
    GOALS,
    compose_config,
    dlrm_over_arch,
    main,
    ratio_table,
    trunk_macs,
)


def test_the_dlrm_over_arch_matches_the_trunks_multiply_adds():
    cfg = compose_config(["data.path=unused"])
    # the default trunk: 8 experts 128-256-64 on every example, 4 DSelect-k gates (k 2, 3 bits:
    # 8 affine outputs each), 4 towers 64-64 and their heads
    want = 8 * (128 * 256 + 256 * 64) + 4 * 128 * 8 + 4 * (64 * 64 + 64)
    assert trunk_macs(cfg) == want
    widths, macs = dlrm_over_arch(cfg, want)
    assert widths[-1] == len(cfg.data.tasks) and widths[0] % 8 == 0
    assert abs(macs - want) / want < 0.01


def test_the_bare_loop_trains_in_training_mode_at_the_trainers_precision():
    """An evaluation in between leaves the model in eval mode; a bf16 trainer's bare loop
    runs under its autocast."""
    from recsys_moe.bench.trainer import BareLoop

    seen = []

    class Probe(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(2, 2))

        def forward(self, batch):
            y = batch @ self.w
            seen.append((self.training, y.dtype))
            return y.float().sum(), None

    model = Probe().eval()

    def forward(batch):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return model(batch)

    BareLoop(model, torch.optim.SGD(model.parameters(), lr=0.1), [torch.ones(3, 2)], forward)()
    assert seen == [(True, torch.bfloat16)]


def test_a_tiny_run_reports_every_ratio(tmp_path):
    out = tmp_path / "bench.json"
    report = main(
        ["--steps", "2", "--rounds", "1", "--batch", "64", "--big-batch", "128", "--threads", "1"]
        + [
            "--eval-rows",
            "256",
            "--row-group",
            "128",
            "--interleaved-steps",
            "3",
            "--stepwise-batches",
            "32",
            "128",
            "--out",
            str(out),
        ]
    )
    assert json.loads(out.read_text())["ratios"] == report["ratios"]
    assert not dist.is_initialized()  # its process group is gone with it
    assert set(GOALS) <= set(report["ratios"]) and all(v > 0 for v in report["ratios"].values())
    assert "moe_trunk_vs_flop_matched_dlrm_stepwise" in report["ratios"]
    # the model against the DLRM at each batch, the main one's row being the _stepwise ratio
    by_batch = report["dlrm_by_batch"]
    assert list(by_batch) == ["32", "64", "128"]
    assert by_batch["64"]["ratio"] == report["ratios"]["moe_trunk_vs_flop_matched_dlrm_stepwise"]
    for row in by_batch.values():
        assert row["dlrm_ms"] > 0 and row["ratio"] == pytest.approx(
            row["model_ms"] / row["dlrm_ms"]
        )
        assert row["gap_ms"] == pytest.approx(row["model_ms"] - row["dlrm_ms"])
    paths = report["moe_path"]
    assert paths["bare_loop"]["sparse"] == 0.0  # fresh gates: every expert, the dense path
    assert paths["dselect_k_n16"]["sparse"] == 1.0 and paths["softmax_n16"]["sparse"] == 0.0
    assert paths["trainer_at_end"]["sparse"] == paths["bare_loop_scheduled_at_end"]["sparse"]


def test_interleaved_steps_alternate_the_loops_step_by_step():
    from recsys_moe.bench.trainer import BareLoop, interleaved_steps

    calls = []

    def loop(name, batches):
        model = torch.nn.Linear(2, 1)

        def forward(batch):
            calls.append((name, int(batch[0, 0])))
            return model(batch).sum(), None

        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        return BareLoop(model, opt, batches, forward)

    a = loop("a", [torch.full((1, 2), float(i)) for i in range(3)])
    b = loop("b", [torch.full((1, 2), float(i)) for i in range(2)])
    times = interleaved_steps({"a": a, "b": b}, 4)
    assert calls == [("a", 0), ("b", 0), ("a", 1), ("b", 1), ("a", 2), ("b", 0), ("a", 0), ("b", 1)]
    assert [len(t) for t in times.values()] == [4, 4]


def test_the_printed_ratios_show_the_quartiles_of_their_rounds():
    report = {
        "ratios": {"trainer_vs_bare_loop": 0.97, "trainer_with_eval_vs_bare_loop": 0.9},
        "spread": {"trainer_vs_bare_loop": [0.91, 0.95, 1.02]},
    }
    lines = ratio_table(report).splitlines()
    assert lines[0].split() == ["ratio", "value", "q1", "median", "q3"]
    assert lines[1].split() == ["trainer_vs_bare_loop", "0.970", "0.910", "0.950", "1.020"]
    # a ratio with no per-round figures (one computed from others) prints dashes, not zeros
    assert lines[2].split() == ["trainer_with_eval_vs_bare_loop", "0.900", "-", "-", "-"]
