"""Sweep summaries from run directories: grouping, mean ± s.e., paired differences, the
expert-selection numbers, and the files a sweep ends with."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import yaml

from recsys_moe.report.runs import is_sweep, load_sweep
from recsys_moe.report.summary import run_metrics, summarize, write_summary


def fake_run(
    d: Path,
    overrides: list[str],
    summary: dict | None,
    tasks=("a", "b"),
    clusters=None,
    num_experts=2,
    records=(),
) -> Path:
    d.mkdir(parents=True)
    task_list = [
        {"name": t, "type": "binary", **({"cluster": clusters[i]} if clusters else {})}
        for i, t in enumerate(tasks)
    ]
    seed = next((int(o.split("=")[1]) for o in overrides if o.startswith("trainer.seed=")), 0)
    config = {
        "data": {"tasks": task_list},
        "model": {"num_experts": num_experts, "gate": {}},
        "trainer": {"seed": seed},
    }
    (d / "config.yaml").write_text(yaml.safe_dump(config))
    (d / ".hydra").mkdir()
    (d / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    if summary is not None:
        (d / "summary.json").write_text(json.dumps(summary))
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return d


def test_configurations_are_overrides_less_seeds_and_shared_ones(tmp_path):
    aucs = {
        ("softmax", 0): 0.70,
        ("softmax", 1): 0.74,
        ("softmax", 2): 0.72,
        ("dselect_k", 0): 0.71,
        ("dselect_k", 1): 0.77,
    }
    for i, ((gate, seed), auc) in enumerate(aucs.items()):
        fake_run(
            tmp_path / str(i),
            ["data.path=/x", f"model/gate={gate}", f"trainer.seed={seed}"],
            {"step": 10.0, "eval/a/auc": auc, "eval/b/auc": 0.5},
        )
    fake_run(tmp_path / "5", ["data.path=/x", "model/gate=dselect_k", "trainer.seed=2"], None)
    assert is_sweep(tmp_path)
    s = summarize(load_sweep(tmp_path))
    assert s.common == ["data.path=/x"]
    soft, dsel = s.configs
    assert (soft.label, dsel.label) == ("model/gate=softmax", "model/gate=dselect_k")
    assert soft.seeds == ["0", "1", "2"] and dsel.seeds == ["0", "1"] and dsel.failed == 1
    assert soft.mean("a/auc") == pytest.approx(0.72)
    assert soft.se("a/auc") == pytest.approx(0.02 / math.sqrt(3))  # sd 0.02 over 3 seeds
    assert dsel.se("a/auc") == pytest.approx(0.03)
    assert s.headline[:2] == ["a/auc", "b/auc"]

    csv_path, md_path = write_summary(tmp_path, baseline="model/gate=softmax")
    rows = {r["configuration"]: r for r in csv.DictReader(csv_path.open())}
    assert float(rows["model/gate=dselect_k"]["a/auc_mean"]) == pytest.approx(0.74)
    assert rows["model/gate=dselect_k"]["failed"] == "1"
    md = md_path.read_text()
    assert "| model/gate=softmax | 3 | 0.7200 ± 0.0115 |" in md
    assert "| model/gate=dselect_k | 2 (1 failed) | 0.7400 ± 0.0300 |" in md
    # paired by seed (0 and 1): +0.01 and +0.03 -> 0.02 ± 0.01
    assert "| model/gate=dselect_k | 2 | 0.0200 ± 0.0100 |" in md


def test_expert_selection_numbers(tmp_path):
    # tasks a, b in cluster x share expert 0; c in cluster y uses expert 1
    w = {"a": [1.0, 0.0], "b": [0.75, 0.25], "c": [0.0, 1.0]}
    summary = {"step": 100.0}
    for t, ws in w.items():
        summary[f"eval/{t}/auc"] = 0.6
        summary[f"eval/gate/{t}/active_experts"] = {"a": 1.0, "b": 2.0, "c": 1.0}[t]
        summary[f"eval/gate/{t}/max_active_experts"] = {"a": 1.0, "b": 2.0, "c": 1.0}[t]
        for e, v in enumerate(ws):
            summary[f"eval/gate/{t}/weight/{e}"] = v
    records = [
        {
            "step": 40,
            "train/loss": 1.0,
            "gate/a/selection_changes": 3.0,
            "gate/b/selection_changes": 1.0,
            "gate/c/selection_changes": 2.0,
        },
        {
            "step": 80,
            "train/loss": 1.0,
            "gate/a/selection_changes": 0.0,
            "gate/b/selection_changes": 3.0,
            "gate/c/selection_changes": 0.0,
        },
    ]
    run = load_sweep(
        fake_run(
            tmp_path / "s" / "0", [], summary, ("a", "b", "c"), ("x", "x", "y"), 2, records
        ).parent
    )[0]
    m = run_metrics(run)
    assert m["gate/cluster_overlap_within"] == pytest.approx(0.75)  # a-b: min summed
    assert m["gate/cluster_overlap_across"] == pytest.approx((0.0 + 0.25) / 2)  # a-c, b-c
    assert m["gate/active_experts"] == pytest.approx(4 / 3)
    assert m["gate/max_active_experts"] == 2.0
    assert m["gate/selection_changes"] == pytest.approx((6 + 3) / 3)
    assert m["gate/selection_changes_last_quarter"] == pytest.approx(3 / 3)  # step-80 window
    assert m["tasks/mean_auc"] == pytest.approx(0.6)


def test_a_missing_baseline_names_the_configurations(tmp_path):
    fake_run(tmp_path / "0", ["model/gate=topk"], {"step": 1.0, "eval/a/auc": 0.5})
    fake_run(tmp_path / "1", ["model/gate=softmax"], {"step": 1.0, "eval/a/auc": 0.5})
    with pytest.raises(ValueError, match=r"--baseline \(model/gate=nope\).*model/gate=topk"):
        write_summary(tmp_path, baseline="model/gate=nope")


def test_a_sweeps_own_baseline_overridden_away_still_gives_the_summary(tmp_path):
    """sweep=gates pairs against softmax; with model/gate=dselect_k on the command line there is
    no softmax run: the table is written, and summary.md says why the pairs are missing."""
    fake_run(
        tmp_path / "0", ["model/gate=dselect_k", "trainer.seed=0"], {"step": 1.0, "eval/a/auc": 0.6}
    )
    fake_run(
        tmp_path / "1", ["model/gate=dselect_k", "trainer.seed=1"], {"step": 1.0, "eval/a/auc": 0.8}
    )
    csv_path, md_path = write_summary(tmp_path, "model/gate=softmax", strict_baseline=False)
    md = md_path.read_text()
    assert "0.7000" in md  # the mean over the two seeds
    assert "No differences paired by seed: baseline model/gate=softmax is not one" in md
    assert csv_path.exists() and "Paired by seed:" not in md
