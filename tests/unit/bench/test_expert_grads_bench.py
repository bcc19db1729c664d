"""bench.expert_grads: a tiny run on four gloo ranks (dp 2 x ep 2) times both arms, and each arm
took the path it names (the all-reduce inside backward on every step of one, on none of the
other)."""

from __future__ import annotations

import json
import math

import pytest

from recsys_moe.bench.expert_grads import main


def test_a_tiny_run_reports_both_arms_from_the_paths_they_name(tmp_path):
    out = tmp_path / "eg.json"
    report = main(["--out", str(out), "--batch", "256", "--steps", "2", "--blocks", "2"])
    assert json.loads(out.read_text())["ratios"] == report["ratios"]
    assert len(report["ranks"]) == 4
    for r in report["ranks"]:
        assert r["dp"] == 2 and r["expert_floats"] > 0
        assert r["overlapped_steps"] == {"overlap": 4, "after_backward": 0}
        for arm in ("overlap", "after_backward"):
            assert r["step_ms"][arm] > r["wait_ms"][arm] >= 0.0
    ratio = report["ratios"]["overlap_step_vs_after_backward"]
    assert math.isfinite(ratio) and ratio == max(report["ratios"]["per_rank"])


def test_it_refuses_a_layout_without_replicas():
    with pytest.raises(ValueError, match="at least 2 replicas"):
        main(["--world", "2", "--ep", "2"])
