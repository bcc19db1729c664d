"""The launch scripts parse, and the many-node one runs a job: two torchrun agents on localhost
(c10d rendezvous, one process each, as two nodes would) train to one finished summary.json."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir

from recsys_moe.config.store import register, to_typed
from tests.conftest import CONF, REPO
from tests.tests_support import free_port

LAUNCH = REPO / "launch"
SCRIPTS = sorted(p for p in LAUNCH.iterdir() if p.suffix in (".sh", ".sbatch"))


def test_there_are_scripts_to_check():
    names = {p.name for p in SCRIPTS}
    assert {"torchrun_single_node.sh", "torchrun_multi_node.sh", "slurm.sbatch"} <= names


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_launch_script_parses(script):
    res = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


def test_kubernetes_manifest_composes():
    """The PyTorchJob parses and the trainer overrides in its command compose."""
    job = yaml.safe_load((LAUNCH / "k8s" / "pytorchjob.yaml").read_text())
    container = job["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][0]
    command = container["command"]
    overrides = command[command.index("recsys_moe.train") + 1 :]
    assert overrides, command
    register()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=[o for o in overrides if not o.startswith("hydra.")])
    to_typed(cfg)


def test_multi_node_script_runs_two_agents(tiny_data, tmp_path):
    run_dir = tmp_path / "run"
    env = {
        **os.environ,
        "PY": sys.executable,
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
        "NNODES": "2",
        "NPROC": "1",
        "RUN_DIR": str(run_dir),
        "RDZV_ID": f"test-{os.getpid()}",
        "OMP_NUM_THREADS": "1",
    }
    overrides = [
        f"data.path={tiny_data}",
        "data.batch_size=128",
        "data.eval_batch_size=500",
        "trainer.device=cpu",
        "trainer.max_steps=4",
        "trainer.log_every=2",
        "trainer.eval_every=0",
        "trainer.collective_timeout_s=60",
        "logger=none",
    ]
    agents = [
        subprocess.Popen(
            ["bash", str(LAUNCH / "torchrun_multi_node.sh"), *overrides],
            env={**env, "NODE_RANK": str(node)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for node in range(2)
    ]
    outputs = []
    for a in agents:
        try:
            out, _ = a.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            for b in agents:
                b.kill()
            pytest.fail("the two agents did not finish within 300 s")
        outputs.append(out)
    for a, out in zip(agents, outputs):
        assert a.returncode == 0, out[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["step"] == 4.0
    assert 0.0 < summary["eval/click/auc"] < 1.0
    logs = sorted(p.name for p in Path(run_dir).glob("train_rank*.log"))
    assert logs == ["train_rank0.log", "train_rank1.log"]


def _env_after_sourcing(env: dict[str, str]) -> dict[str, str]:
    out = subprocess.run(
        ["bash", "-c", "source launch/env.sh && env"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


ALLOCATOR_KEYS = ("GLIBC_TUNABLES",)


def test_allocator_settings_are_the_same_everywhere_and_yours_win():
    """launch/env.sh sets them (make train and the scripts source it), the Kubernetes job
    carries the same values, a value of the user's own is kept and an empty one turns it off."""
    base = {
        k: v for k, v in os.environ.items() if k not in (*ALLOCATOR_KEYS, "THP_MEM_ALLOC_ENABLE")
    }
    ours = _env_after_sourcing(base)
    assert "THP_MEM_ALLOC_ENABLE" not in ours  # opt-in only (launch/env.sh says why)
    assert "glibc.malloc.trim_threshold=" in ours["GLIBC_TUNABLES"]
    job = yaml.safe_load((LAUNCH / "k8s" / "pytorchjob.yaml").read_text())
    container = job["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][0]
    assert {e["name"]: e["value"] for e in container["env"]} == {k: ours[k] for k in ALLOCATOR_KEYS}
    for script in ("torchrun_single_node.sh", "torchrun_multi_node.sh", "slurm.sbatch"):
        assert "source launch/env.sh" in (LAUNCH / script).read_text(), script
    assert "source launch/env.sh" in (REPO / "Makefile").read_text()
    theirs = _env_after_sourcing({**base, "GLIBC_TUNABLES": "glibc.malloc.arena_max=2"})
    assert theirs["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2"
    off = _env_after_sourcing({**base, "GLIBC_TUNABLES": ""})
    assert off["GLIBC_TUNABLES"] == ""
