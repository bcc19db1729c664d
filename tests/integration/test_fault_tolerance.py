"""Under torchrun --max-restarts, a rank killed (SIGKILL) mid-run restarts the job from the last
checkpoint, and the finished run equals an uninterrupted one: the same loss at every step (each
logged once) and the same final parameters, so it trained on exactly the same rows."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp

from recsys_moe.checkpoint.manager import checkpoint_sizes, resolve

STEPS = 60


def _torchrun(data: Path, run_dir: Path) -> subprocess.Popen:
    overrides = [
        f"hydra.run.dir={run_dir}",
        f"data.path={data}",
        "data.batch_size=96",
        "data.eval_batch_size=500",
        "model.embedding_dim=8",
        "model.bottom_mlp=[16]",
        "model.num_experts=4",
        "model.expert_hidden=[16]",
        "model.expert_dim=8",
        "model.tower=[8]",
        "parallel.ep_size=2",
        f"trainer.max_steps={STEPS}",
        "trainer.log_every=1",
        "trainer.eval_every=0",
        "trainer.device=cpu",
        "trainer.collective_timeout_s=60",
        "checkpoint.every_steps=5",
        "logger=none",
    ]
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "--max-restarts=1",
        "-m",
        "recsys_moe.train",
        *overrides,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(x) for x in path.read_text().split()] if path.exists() else []


def _model_state(run_dir: Path) -> dict[str, torch.Tensor]:
    ckpt = resolve(run_dir)
    sizes = {k: v for k, v in checkpoint_sizes(ckpt).items() if k.startswith("model.")}
    state = {k: torch.empty(v) for k, v in sizes.items()}
    dcp.load(state, checkpoint_id=str(ckpt), no_dist=True)
    return state


def _losses(run_dir: Path) -> list[tuple[int, float]]:
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["train/loss"]) for r in records if "train/loss" in r]


def test_a_killed_rank_restarts_from_the_checkpoint_and_finishes_the_same(tiny_data, tmp_path):
    plain = _torchrun(tiny_data, tmp_path / "plain")
    out, _ = plain.communicate(timeout=600)
    assert plain.returncode == 0, out[-3000:]

    job = _torchrun(tiny_data, tmp_path / "killed")
    latest = tmp_path / "killed" / "checkpoints" / "latest"
    deadline = time.monotonic() + 300
    while not latest.exists() and job.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    workers = _children(job.pid)
    assert latest.exists() and len(workers) == 2, "no checkpoint before the run ended"
    killed_after = latest.read_text().strip()
    os.kill(workers[1], signal.SIGKILL)
    out, _ = job.communicate(timeout=600)
    assert job.returncode == 0, out[-3000:]
    assert "restart" in out.lower() or "Restarting" in out, out[-3000:]

    got, want = _losses(tmp_path / "killed"), _losses(tmp_path / "plain")
    assert [s for s, _ in got] == list(range(1, STEPS + 1))  # each step once
    assert got == want  # bit for bit
    a, b = _model_state(tmp_path / "killed"), _model_state(tmp_path / "plain")
    assert a.keys() == b.keys() and len(a) > 20
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)
    assert killed_after.startswith("step_")
