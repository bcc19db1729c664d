"""The console entry points, as a user runs them: generate data, train with Hydra overrides."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml

from tests.conftest import REPO


def _run(*args: str, cwd=REPO, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
        env=None if env is None else {**os.environ, **env},
    )


@pytest.fixture(scope="module")
def small_default_data(tmp_path_factory):
    """Default table sizes (so conf/data/synthetic.yaml applies unchanged), few rows."""
    out = tmp_path_factory.mktemp("cli") / "synthetic"
    r = _run(
        "-m",
        "recsys_moe.data.synthetic",
        "--out",
        str(out),
        "--train-rows",
        "3000",
        "--eval-rows",
        "600",
    )
    assert r.returncode == 0, r.stderr
    assert (out / "_SUCCESS").exists() and len(list((out / "train").glob("*.parquet"))) == 4
    return out


def test_train_cli_writes_run_dir(small_default_data, tmp_path):
    run_dir = tmp_path / "run"
    r = _run(
        "-m",
        "recsys_moe.train",
        f"data.path={small_default_data}",
        "logger=none",
        "trainer.max_steps=4",
        "trainer.log_every=2",
        f"hydra.run.dir={run_dir}",
    )
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["step"] == 4
    assert {
        "eval/click/auc",
        "eval/like/log_loss",
        "eval/rating/rmse_baseline",
        "train/samples_per_sec",
    } <= set(summary)
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "train/loss" in r] == [2, 4]
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config["trainer"]["max_steps"] == 4 and config["data"]["path"] == str(small_default_data)


# Runs recsys_moe.train as `python -m` does, and at exit (atexit runs before the interpreter's
# teardown) counts the threads of gloo process groups still alive.
_COUNT_GLOO_THREADS_AT_EXIT = """
import atexit, runpy, sys
from tests.tests_support import gloo_threads

atexit.register(lambda: print("gloo threads at exit:", gloo_threads(settle_s=1.0)))
sys.argv = ["recsys_moe.train", *sys.argv[1:]]
runpy.run_module("recsys_moe.train", run_name="__main__")
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="counts threads in /proc")
@pytest.mark.parametrize("ends", ["finished", "failed", "failed_uncaught"])
def test_a_run_leaves_no_process_group_to_the_interpreters_teardown(
    ends, small_default_data, tmp_path
):
    """A process group freed in the interpreter's teardown can abort the process (gloo's
    threads: "terminate called without an active exception"), and torchrun then restarts or
    fails a run that had finished, or reports a failed one as killed. The run must free its
    groups itself: destroy_process_group alone leaves them alive while the trainer's reference
    cycles (or a failed run's traceback) or torch's ZeroRedundancy module (which binds
    dist.group.WORLD as a default argument) hold them. "failed": the data path is missing, an
    error raised after the groups exist; "failed_uncaught": the same error left uncaught by
    Hydra (HYDRA_FULL_ERROR=1), so that sys.last_traceback holds it at exit."""
    data = small_default_data if ends == "finished" else tmp_path / "missing"
    r = _run(
        "-c",
        _COUNT_GLOO_THREADS_AT_EXIT,
        f"data.path={data}",
        "logger=none",
        "trainer.max_steps=2",
        "trainer.eval_every=0",
        f"hydra.run.dir={tmp_path / 'run'}",
        env={"HYDRA_FULL_ERROR": "1" if ends == "failed_uncaught" else "0"},
    )
    assert r.returncode == (0 if ends == "finished" else 1), r.stderr[-3000:]
    if ends != "finished":
        assert "does not exist" in r.stderr, r.stderr[-3000:]
    assert "gloo threads at exit: 0" in r.stdout, r.stdout[-2000:]


def test_train_cli_rejects_a_typo_naming_the_key(tmp_path):
    r = _run("-m", "recsys_moe.train", "trainer.max_stepz=4", f"hydra.run.dir={tmp_path}")
    assert r.returncode != 0
    assert "trainer.max_stepz" in r.stderr
