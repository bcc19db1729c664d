"""A tiny sweep as a user runs it (Hydra multirun, joblib launcher, summary callback), then the
HTML report of the sweep and of one of its runs: figures inlined, numbers equal to summary.json."""

from __future__ import annotations

import base64
import json
import math
import re
import subprocess
import sys

import pytest

from recsys_moe.report.html import render
from tests.conftest import REPO

PNG = re.compile(r'<img alt="([^"]+)" src="data:image/png;base64,([^"]+)"')


def _figures(page: str) -> dict[str, bytes]:
    return {alt: base64.b64decode(data) for alt, data in PNG.findall(page)}


@pytest.fixture(scope="module")
def tiny_sweep(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "recsys_moe.data.synthetic",
            "--out",
            str(root / "data"),
            "--train-rows",
            "2000",
            "--eval-rows",
            "400",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "recsys_moe.train",
            "-m",
            "sweep=gates",
            f"data.path={root / 'data'}",
            "model/gate=softmax,dselect_k",
            "trainer.seed=1",
            "trainer.max_steps=6",
            "trainer.eval_every=3",
            "trainer.log_every=2",
            "trainer.device=cpu",
            f"hydra.sweep.dir={root / 'sweep'}",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return root / "sweep"


def test_sweep_ends_with_its_summary(tiny_sweep):
    runs = sorted(p for p in tiny_sweep.iterdir() if p.is_dir())
    assert [p.name for p in runs] == ["0", "1"]
    assert all((p / "summary.json").is_file() for p in runs)
    md = (tiny_sweep / "summary.md").read_text()
    assert "| model/gate=softmax | 1 |" in md and "| model/gate=dselect_k | 1 |" in md
    assert "minus model/gate=softmax" in md  # the sweep's baseline: paired differences
    assert (tiny_sweep / "summary.csv").read_text().startswith("configuration,n,failed,seeds")


def test_sweep_report_shows_the_table_and_error_bars(tiny_sweep):
    page = render(tiny_sweep).read_text()
    assert "comparison with error bars" in _figures(page)
    assert all(png.startswith(b"\x89PNG") for png in _figures(page).values())
    # every cell of the table is the mean over the seeds of that configuration's summary.json
    summaries = {}
    for run in tiny_sweep.iterdir():
        if (run / "summary.json").is_file():
            over = (run / ".hydra" / "overrides.yaml").read_text()
            gate = re.search(r"model/gate=(\w+)", over).group(1)
            summaries.setdefault(gate, []).append(json.loads((run / "summary.json").read_text()))
    configs = re.findall(r"<tr data-config='model/gate=(\w+)'>", page)
    assert sorted(configs) == ["dselect_k", "softmax"]
    checked = 0
    for gate, metric, mean in _cells(page):
        values = [_metric(s, metric) for s in summaries[gate]]
        assert float(mean) == pytest.approx(sum(values) / len(values), rel=1e-12)
        checked += 1
    assert checked == 2 * 7  # both gates: 4 AUC/accuracy, 2 RMSE and the active experts


def _cells(page: str) -> list[tuple[str, str, str]]:
    out = []
    for gate, row in re.findall(r"<tr data-config='model/gate=(\w+)'>(.*?)</tr>", page, re.S):
        out += [
            (gate, m, v) for m, v in re.findall(r'data-metric="([^"]+)" data-mean="([^"]+)"', row)
        ]
    return out


def _metric(summary: dict, metric: str) -> float:
    task, name = metric.split("/")
    if task == "gate":
        tasks = {k.split("/")[2] for k in summary if k.startswith("eval/gate/")}
        return sum(summary[f"eval/gate/{t}/{name}"] for t in tasks) / len(tasks)
    return summary[f"eval/{task}/{name}"]


def test_run_report_has_every_figure_and_the_summary_numbers(tiny_sweep):
    run = tiny_sweep / "1"  # dselect_k, seed 1
    page = render(run, run / "r.html").read_text()
    figs = _figures(page)
    assert set(figs) == {
        "Training loss",
        "Evaluation metrics over steps",
        "Gate telemetry over steps",
        "Task x expert mean weights (eval)",
        "Throughput",
    }
    assert all(png.startswith(b"\x89PNG") and len(png) > 2000 for png in figs.values())
    summary = json.loads((run / "summary.json").read_text())
    rows = dict(re.findall(r"<tr data-task='(\w+)'>(.*?)</tr>", page, re.S))
    assert set(rows) == {"click", "like", "watch_time", "rating"}
    seen = 0
    for task, row in rows.items():
        values = [float(v) for v in re.findall(r'data-value="([^"]+)"', row)]
        want = [
            summary[f"eval/{task}/{m}"]
            for m in ("auc", "accuracy", "log_loss")
            if f"eval/{task}/{m}" in summary
        ]
        want += [
            summary[f"eval/{task}/{m}"]
            for m in ("rmse", "mae", "rmse_baseline")
            if f"eval/{task}/{m}" in summary
        ]
        assert values[: len(want)] == want  # exact, in the table's column order
        assert values[-1] == summary[f"eval/gate/{task}/active_experts"]
        seen += len(want)
    assert seen == 2 * 3 + 2 * 3 and not math.isnan(sum(values))
