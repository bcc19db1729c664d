"""Checkpoint benchmark: save and load of the default model, sync vs async, side by side.

    python -m recsys_moe.bench.checkpoint --out bench_checkpoint.json [--data data/synthetic]

Builds the default job (conf defaults on the synthetic data), trains a few steps, then runs
interleaved rounds of two arms, each "save, then --steps training steps", with
checkpoint.async_save off and on (the async arm waits for its save to be committed at the end,
so both arms leave a complete checkpoint):
- `async_vs_sync_save_and_steps`: wall time of the async arm over the sync arm (< 1: async pays);
- `async_vs_sync_blocking`: the time save() blocks training, async over sync;
and the checkpoint's size, the median sync save and load times (load: a full resume into the
live trainer, sha256 verification included).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from recsys_moe.bench.common import environment, table, write_report
from recsys_moe.checkpoint.manager import Checkpointer
from recsys_moe.config.schema import TrainConfig
from recsys_moe.config.store import to_yaml


def _default_config(data: Path, run_dir: Path) -> TrainConfig:
    """conf/train.yaml's defaults, composed as the CLI would, pointed at `data`."""
    from hydra import compose, initialize_config_dir

    from recsys_moe.config.store import register, to_typed

    register()
    conf = Path(__file__).resolve().parents[2] / "conf"
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        cfg = to_typed(compose("train", overrides=[f"data.path={data}", "logger=none"]))
    cfg.trainer.device = "cpu"
    cfg.checkpoint.every_steps = 0  # the benchmark saves by itself
    cfg.checkpoint.at_end = False
    return cfg


def main(argv: list[str] | None = None) -> dict[str, object]:
    p = argparse.ArgumentParser(description="Checkpoint save/load benchmark (ratios).")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--data", type=Path, default=Path("data/synthetic"))
    p.add_argument("--steps", type=int, default=20, help="training steps after each save")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    if not (args.data / "train").is_dir():
        raise SystemExit(f"{args.data}: no train split; write it with `make data`")
    from recsys_moe.trainer import Trainer

    work = Path(tempfile.mkdtemp(prefix="bench_ckpt_"))
    cfg = _default_config(args.data, work / "run")
    trainer = Trainer(cfg, work / "run")
    try:
        batches = trainer._train_batches()
        trainer.model.train()

        def train(n: int) -> None:
            for _ in range(n):
                trainer.train_step(next(batches))
                trainer.step += 1

        train(5)
        parts, dims, yaml = trainer.checkpointer.parts, trainer.dims, to_yaml(cfg)
        arms = {
            name: Checkpointer(
                replace(cfg.checkpoint, async_save=a, keep=1), work / name, dims, parts, yaml
            )
            for name, a in (("sync", False), ("async", True))
        }
        rounds: dict[str, list[float]] = {"sync": [], "async": []}
        blocking: dict[str, list[float]] = {"sync": [], "async": []}
        for r in range(args.repeats + 1):  # the first round warms up
            for name in ["sync", "async"] if r % 2 else ["async", "sync"]:
                ckpt = arms[name]
                t0 = time.perf_counter()
                ckpt.save(trainer.step)
                t1 = time.perf_counter()
                train(args.steps)
                ckpt.wait()
                t2 = time.perf_counter()
                if r:
                    rounds[name].append(t2 - t0)
                    blocking[name].append(t1 - t0)
        latest = arms["sync"].latest()
        size = sum(f.stat().st_size for f in latest.iterdir())
        loads = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            arms["sync"].load(latest)
            loads.append(time.perf_counter() - t0)
    finally:
        trainer.close()
    med = {k: statistics.median(v) for k, v in rounds.items()}
    blk = {k: statistics.median(v) for k, v in blocking.items()}
    report = {
        "benchmark": "checkpoint",
        "config": {k: str(v) for k, v in vars(args).items()},
        "environment": environment(),
        "checkpoint_mb": size / 2**20,
        "sync_save_s": blk["sync"],
        "async_save_blocking_s": blk["async"],
        "load_s": statistics.median(loads),
        "sync_save_and_steps_s": med["sync"],
        "async_save_and_steps_s": med["async"],
        "ratios": {
            "async_vs_sync_save_and_steps": statistics.median(
                [a / s for a, s in zip(rounds["async"], rounds["sync"])]
            ),
            "async_vs_sync_blocking": blk["async"] / blk["sync"],
        },
    }
    print(
        table(
            [{k: v for k, v in report.items() if isinstance(v, float)}],
            [
                "checkpoint_mb",
                "sync_save_s",
                "async_save_blocking_s",
                "load_s",
                "sync_save_and_steps_s",
                "async_save_and_steps_s",
            ],
        )
    )
    print(report["ratios"])
    write_report(args.out, report)
    return report


if __name__ == "__main__":
    main()
