"""Checkpoints on one process: exact resume, metrics.jsonl holding each step once, a kill during a
save, verified files, loading another run's weights, and never a poisoned checkpoint."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import shutil
from pathlib import Path

import pytest
import torch

from recsys_moe.checkpoint.manager import FORMAT, CheckpointError, read_meta
from recsys_moe.config.schema import ExpertCompute, TrainConfig
from recsys_moe.distributed.comm import all_gather_objects
from recsys_moe.distributed.full_state import full_state_dict
from recsys_moe.trainer import NonFiniteLossError, Trainer
from tests.tests_support import data_config, dselect_k_from_start, small_model

STEPS = 20


def _config(data, **checkpoint) -> TrainConfig:
    cfg = TrainConfig(data=data_config(data, batch_size=96, eval_batch_size=500))
    m = cfg.model
    small_model(m)
    m.gate = dselect_k_from_start()
    m.expert_compute = ExpertCompute.sparse
    t = cfg.trainer
    t.max_steps, t.log_every, t.eval_every, t.device = STEPS, 1, 0, "cpu"
    cfg.logger.console = cfg.logger.progress_bar = False
    cfg.checkpoint.every_steps = 5
    for k, v in checkpoint.items():
        setattr(cfg.checkpoint, k, v)
    return cfg


class Crash(Exception):
    pass


def eval_outputs(trainer: Trainer) -> dict[int, list[float]]:
    """The trained model's raw eval outputs by row id, from every rank."""
    trainer.model.eval()
    mine: dict[int, list[float]] = {}
    with torch.no_grad():
        for batch, real in trainer.eval_data.batches():
            _, out = trainer.model(batch)
            if real:
                mine.update(zip(batch.row_ids.tolist(), out.raw.tolist()))
    return {
        k: v for part in all_gather_objects(mine, trainer.dims.world_group) for k, v in part.items()
    }


def run(cfg: TrainConfig, run_dir: Path, crash_at: int | None = None) -> dict:
    """Trains to the end (or raises Crash before step crash_at + 1); the full final state and
    the raw eval outputs by row id."""
    trainer = Trainer(cfg, run_dir)
    if crash_at is not None:
        step = trainer.train_step

        def crashing(batch):
            if trainer.step == crash_at:
                raise Crash
            return step(batch)

        trainer.train_step = crashing
    try:
        summary = trainer.train()
        state = full_state_dict(trainer.model, trainer.dims)
        return {"summary": summary, "state": state, "eval": eval_outputs(trainer)}
    finally:
        trainer.close()


def losses(run_dir: Path) -> list[tuple[int, float]]:
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["train/loss"]) for r in records if "train/loss" in r]


def assert_same_state(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=0, msg=k)


@pytest.mark.parametrize(
    "async_save, pipeline",
    [(False, "plain"), (True, "plain"), (False, "sparse_dist")],
    ids=["sync", "async", "pipelined"],
)
def test_a_crashed_run_resumes_exactly(tiny_data, tmp_path, async_save, pipeline):
    """The pipelined run reads two batches ahead of the step it trains: its checkpoint must
    hold the loader position of the trained batch, not of the batches in flight."""

    def cfg() -> TrainConfig:
        c = _config(tiny_data, async_save=async_save)
        c.trainer.pipeline = pipeline
        return c

    full = run(_config(tiny_data), tmp_path / "full")
    if pipeline != "plain":
        with pytest.raises(Crash):  # the pipeline calls no train_step: crash in the optimizer
            trainer = Trainer(cfg(), tmp_path / "resumed")
            step = trainer.step_optimizer.step

            def crashing() -> None:
                if trainer.step == 13:
                    raise Crash
                step()

            trainer.step_optimizer.step = crashing
            try:
                trainer.train()
            finally:
                trainer.close()
    else:
        with pytest.raises(Crash):  # the last checkpoint: step 10
            run(cfg(), tmp_path / "resumed", crash_at=13)
    assert (tmp_path / "resumed" / "checkpoints" / "latest").read_text().strip() == "step_00000010"
    assert losses(tmp_path / "resumed")[-1][0] == 13  # steps 11-13 logged before the crash
    resumed = run(cfg(), tmp_path / "resumed")  # the same command again
    got, want = losses(tmp_path / "resumed"), losses(tmp_path / "full")
    assert [s for s, _ in got] == list(range(1, STEPS + 1))  # each step once
    assert got == want  # the same loss at every step, bit for bit
    assert_same_state(resumed["state"], full["state"])
    evals = {k: v for k, v in full["summary"].items() if k.startswith("eval/")}
    assert {k: resumed["summary"][k] for k in evals} == evals
    names = sorted(p.name for p in (tmp_path / "resumed" / "checkpoints").iterdir())
    assert names == ["latest", "step_00000015", "step_00000020"]  # keep = 2


def _kill_during_save(data: str, run_dir: str, when: str) -> None:
    """Trains with checkpoints every 5 steps and dies inside the save at step 10."""
    import recsys_moe.checkpoint.manager as manager

    real_save = manager.dcp.save

    def dying_save(state, checkpoint_id):
        if checkpoint_id.endswith("step_00000010.tmp"):
            if when == "after_write":
                real_save(state, checkpoint_id=checkpoint_id)  # files written, not committed
            os._exit(3)
        real_save(state, checkpoint_id=checkpoint_id)

    manager.dcp.save = dying_save
    run(_config(data), Path(run_dir))


@pytest.mark.parametrize("when", ["before_write", "after_write"])
def test_a_kill_during_a_save_leaves_the_previous_checkpoint(tiny_data, tmp_path, when):
    ctx = mp.get_context("spawn")
    p = ctx.Process(target=_kill_during_save, args=(str(tiny_data), str(tmp_path), when))
    p.start()
    p.join(timeout=300)
    assert p.exitcode == 3
    root = tmp_path / "checkpoints"
    assert (root / "latest").read_text().strip() == "step_00000005"
    assert (root / "step_00000010.tmp").is_dir() and not (root / "step_00000010").exists()
    resumed = Trainer(_config(tiny_data), tmp_path)
    try:
        assert resumed.step == 5 and resumed.resumed_from == root / "step_00000005"
        assert not (root / "step_00000010.tmp").exists()  # the leftover is removed
    finally:
        resumed.close()


def test_a_corrupted_checkpoint_file_is_named(tiny_data, tmp_path):
    run(_config(tiny_data, every_steps=0), tmp_path)
    ckpt = tmp_path / "checkpoints" / "step_00000020"
    assert set(read_meta(ckpt)["files"]) >= {".metadata", "config.yaml"}
    victim = next(ckpt.glob("*.distcp"))
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=f"{victim.name}: sha256 differs"):
        Trainer(_config(tiny_data, every_steps=0), tmp_path)


def test_weights_from_another_run_start_a_new_run(tiny_data, tmp_path):
    first = run(_config(tiny_data, every_steps=0), tmp_path / "first")
    cfg = _config(tiny_data, every_steps=0, load=str(tmp_path / "first"))
    trainer = Trainer(cfg, tmp_path / "second")
    try:
        assert trainer.step == 0  # weights only: a new run
        state = full_state_dict(trainer.model, trainer.dims)
        params = [k for k in first["state"] if "experts.weights" in k or "embedding_bags" in k]
        assert params
        for k in params:
            torch.testing.assert_close(state[k], first["state"][k], rtol=0, atol=0)
    finally:
        trainer.close()
    with pytest.raises(CheckpointError, match="no such checkpoint or run directory"):
        Trainer(_config(tiny_data, load=str(tmp_path / "nothing_here")), tmp_path / "third")


class PoisonAt(torch.nn.Module):
    """The trainer's model, with a NaN loss at the given steps (the trainer sees
    model(batch) -> (loss, outputs))."""

    def __init__(self, trainer: Trainer, steps: set[int]) -> None:
        super().__init__()
        self.inner, self.trainer, self.steps = trainer.model, trainer, steps

    def forward(self, batch):
        loss, out = self.inner(batch)
        if self.training and self.trainer.step + 1 in self.steps:
            loss = loss * float("nan")
            out.task_losses = out.task_losses * float("nan")
        return loss, out


def test_nonfinite_steps_are_skipped_when_asked(tiny_data, tmp_path):
    cfg = _config(tiny_data)
    cfg.trainer.on_nonfinite = "skip"
    trainer = Trainer(cfg, tmp_path)
    trainer.model = PoisonAt(trainer, {3, 7})
    try:
        summary = trainer.train()
        assert trainer.skipped_steps == 2 and summary["step"] == STEPS
    finally:
        trainer.close()
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["train/skipped_nonfinite_steps"] for r in records if "train/loss" in r][-1] == 2.0


def test_a_nonfinite_loss_stops_before_any_checkpoint_holds_it(tiny_data, tmp_path):
    trainer = Trainer(_config(tiny_data), tmp_path)
    trainer.model = PoisonAt(trainer, {7})
    try:
        with pytest.raises(NonFiniteLossError, match="step 7"):
            trainer.train()
    finally:
        trainer.close()
    # the checkpoint at step 5 exists; the one due at step 10 was never written
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step_00000005"
    assert not list((tmp_path / "checkpoints").glob("step_00000010*"))


def test_a_resumed_run_continues_its_wandb_run(tiny_data, tmp_path):
    cfg = _config(tiny_data)
    cfg.logger.wandb.enabled = True
    with pytest.raises(Crash):
        run(cfg, tmp_path, crash_at=7)
    trainer = Trainer(cfg, tmp_path)  # resumes at step 5, and its W&B run with it
    try:
        # each attempt's folder holds run-<id>.wandb; the folder's name ends in the id, or, where
        # both attempts started within the same second, in "<id>-1" (W&B's suffix)
        logs = list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
        run_ids = {p.name.removeprefix("run-").removesuffix(".wandb") for p in logs}
        assert len(list((tmp_path / "wandb").glob("offline-run-*"))) == len(logs) == 2
        assert run_ids == {trainer.wandb_id}
    finally:
        trainer.close()


def test_checkpoint_config_is_checked(tiny_data, tmp_path):
    with pytest.raises(ValueError, match=r"checkpoint.keep \(0\) must be >= 1"):
        Trainer(_config(tiny_data, keep=0), tmp_path)
    shutil.rmtree(tmp_path, ignore_errors=True)


def test_a_checkpoint_of_another_format_is_refused_naming_both(tiny_data, tmp_path):
    # format 1 held the towers and heads per task; its tensors do not fit format 2's stacked ones
    run(_config(tiny_data, every_steps=0), tmp_path)
    ckpt = tmp_path / "checkpoints" / "step_00000020"
    meta = json.loads((ckpt / "meta.json").read_text())
    (ckpt / "meta.json").write_text(json.dumps({**meta, "format": FORMAT - 1}))
    with pytest.raises(CheckpointError, match=f"checkpoint format {FORMAT - 1}, not {FORMAT}"):
        Trainer(_config(tiny_data, every_steps=0), tmp_path)
