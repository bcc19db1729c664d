"""Trainer benchmark: the project's trainer and model against a bare loop and a FLOP-matched DLRM.

    python -m recsys_moe.bench.trainer --out bench_trainer.json

Every arm runs in this one process, interleaved (rounds in rotating order, medians), on
synthetic data with the default job's tables, model and optimizers (conf/train.yaml composed),
each arm for --steps steps (default 128: one shuffle window of the default data at batch 512):

- trainer: `Trainer.train()` from a fresh Trainer (built untimed) for the steps: wall clock with
  data reads and waits, the loop's metrics and logging; its evaluation is timed apart (eval_s)
  and charged to `trainer_with_eval_vs_bare_loop` at the default job's rate (3 evaluations in
  1,170 steps); checkpoints are off (bench.checkpoint measures them);
- bare_loop_scheduled: the trainer's counterpart: a fresh Trainer's model and optimizers (built
  untimed each round), the same batches held in memory: set_train_progress (the gates'
  schedule, as the trainer), zero_grad, forward, backward, step; like the trainer it ends on
  the sparse expert path once the entropy weight has saturated the gates
  (`moe_path.*_at_end`);
- bare_loop: the same loop on one model across rounds with the entropy weight kept at 0 (the
  gates skip its term, as in the first half of the default schedule): the dense expert path,
  every expert on every example, as the FLOP-matched DLRM assumes. Every arm trains in training
  mode at trainer.precision (the DLRM under the same autocast);
- dlrm: TorchRec's DLRM over the same tables, same optimizers and loss, its over-arch
  [W, W, W/2, T] sized so that its multiply-adds per example match the MoE trunk's (every expert
  on every example, the gates, towers and heads): `trunk_macs` and `dlrm_over_arch_macs`;
- batch_8192: the bare loop of the same model at batch 8192, for as many samples;
- dselect_k_n16, softmax_n16: the bare loop with 16 experts, DSelect-k gates saturated (every
  selector outside the smooth-step window: the sparse expert path) vs the softmax gate (dense).
- dlrm_by_batch: the bare loop and the DLRM alternated step by step, as the _stepwise ratio,
  at each of --stepwise-batches (default 128 and 2048) besides --batch: how the gap per step
  grows with the batch separates what every step pays whatever its size (operator calls,
  Python in the custom kernels) from what every example costs (GEMM shapes, passes over the
  activations).

Ratios (goals of issue 12): trainer_vs_bare_loop = bare_loop_scheduled time / trainer time
(>= 0.95),
moe_trunk_vs_flop_matched_dlrm = model step / DLRM step (<= 1.15), and the same from
--interleaved-steps steps of the bare loop and the DLRM alternated one by one
(`moe_trunk_vs_flop_matched_dlrm_stepwise`: medians of single steps, whose quartiles are
tighter on a shared machine than those of rounds of whole loops),
batch_8192_vs_512_samples_per_sec (>= 1.0), dselect_k_step_vs_softmax_step (<= 1.0). Each is the
ratio of the arms' medians; `spread` gives the quartiles of the per-round ratios.

The process's allocator settings (MALLOC_*, GLIBC_TUNABLES, THP_MEM_ALLOC_ENABLE, LD_PRELOAD)
are recorded: big batches depend on them (launch/env.sh; README, "Benchmarks").
"""

from __future__ import annotations

import argparse
import itertools
import math
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import nn

from recsys_moe.bench.common import environment, measure, median_ms, table, write_report
from recsys_moe.config.schema import GateType, TrainConfig
from recsys_moe.distributed.parallel_dims import backend_for, free_process_groups

CONF = Path(__file__).resolve().parents[2] / "conf"
# The default job: conf/train.yaml on the default synthetic data (200,000 rows, batch 512,
# 3 epochs: 1,170 steps) evaluates at steps 390 and 780 and at the end.
DEFAULT_JOB_STEPS, DEFAULT_JOB_EVALS = 1170, 3
ALLOCATOR_ENV = ("MALLOC_", "GLIBC_TUNABLES", "THP_MEM_ALLOC_ENABLE", "LD_PRELOAD")
GOALS = {
    "trainer_vs_bare_loop": (">=", 0.95),
    "moe_trunk_vs_flop_matched_dlrm": ("<=", 1.15),
    "batch_8192_vs_512_samples_per_sec": (">=", 1.0),
    "dselect_k_step_vs_softmax_step": ("<=", 1.0),
}


def compose_config(overrides: list[str]) -> TrainConfig:
    """conf/train.yaml with `overrides`, typed."""
    from hydra import compose, initialize_config_dir

    from recsys_moe.config.store import register, to_typed

    register()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return to_typed(compose("train", overrides=overrides))


# -- FLOPs -------------------------------------------------------------------------------------


def training_only(data: Path) -> list[str]:
    """Overrides for a benchmark's training loop on `data`: no logger, no evaluation or its
    data check, no checkpoints (bench.checkpoint measures those)."""
    return [
        f"data.path={data}",
        "logger=none",
        "trainer.eval_every=0",
        "data.eval_check_max_rows=0",
        "checkpoint.every_steps=0",
        "checkpoint.at_end=false",
    ]


def _mlp_macs(widths: list[int]) -> int:
    return sum(a * b for a, b in zip(widths[:-1], widths[1:]))


def moe_input_width(cfg: TrainConfig) -> int:
    bottom = cfg.model.bottom_mlp[-1] if cfg.model.bottom_mlp else len(cfg.data.dense)
    return len(cfg.data.sparse) * cfg.model.embedding_dim + (bottom if cfg.data.dense else 0)


def trunk_macs(cfg: TrainConfig) -> int:
    """Multiply-adds per example of the MoE trunk computed densely: every expert, each task's
    gate (its affine map), tower and head."""
    m, tasks, d = cfg.model, len(cfg.data.tasks), moe_input_width(cfg)
    experts = m.num_experts * _mlp_macs([d, *m.expert_hidden, m.expert_dim])
    gate_outputs = m.num_experts
    if m.gate.type == GateType.dselect_k:
        k = m.gate.k or 2
        gate_outputs = k * math.ceil(math.log2(m.num_experts)) + k if m.num_experts > 1 else 0
    gates = tasks * d * gate_outputs if m.gate.per_example else 0
    towers = tasks * _mlp_macs([m.expert_dim, *m.tower, 1])
    return experts + gates + towers


def dlrm_over_arch(cfg: TrainConfig, target_macs: int) -> tuple[list[int], int]:
    """Over-arch widths [W, W, W/2, T] (W a multiple of 8) whose multiply-adds per example are
    closest to target_macs, and those multiply-adds. Its input is DLRM's interaction output:
    E + F + F(F-1)/2 for F sparse features of width E."""
    f, e, t = len(cfg.data.sparse), cfg.model.embedding_dim, len(cfg.data.tasks)
    width_in = e + f + f * (f - 1) // 2

    def macs(w: int) -> int:
        return _mlp_macs([width_in, w, w, w // 2, t])

    best = min(range(8, 8193, 8), key=lambda w: abs(macs(w) - target_macs))
    return [best, best, best // 2, t], macs(best)


# -- arms --------------------------------------------------------------------------------------


def held_batches(trainer, steps: int) -> list:
    """The first `steps` batches of the trainer's training data, on its device, in memory."""
    batches = [
        b.to(trainer.device) for b, _ in itertools.islice(trainer.train_data.batches(), steps)
    ]
    if len(batches) < steps:
        raise ValueError(f"the data has {len(batches)} batches per epoch, not {steps}")
    return batches


class BareLoop:
    """A model and its dense optimizer over batches held in memory: zero_grad, forward,
    backward, step (TorchRec's fused optimizer updates the tables inside backward), in training
    mode, through `forward` (default: the model's own; a trainer's applies trainer.precision)."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        batches: list,
        forward: Optional[Callable] = None,
        progress: Optional[Callable[[int, int], None]] = None,
    ):
        self.model, self.optimizer, self.batches = model, optimizer, batches
        self.forward = forward or model
        self.progress = progress  # set_train_progress(step, total) before each step, as Trainer

    @classmethod
    def of(cls, trainer, steps: int) -> BareLoop:
        """The model and dense optimizer `trainer` built, over its first `steps` batches, at the
        trainer's precision."""
        return cls(trainer.model, trainer.optimizer, held_batches(trainer, steps), trainer.forward)

    def __call__(self) -> None:
        self.model.train()  # an evaluation in between leaves it in eval mode
        for step in range(len(self.batches)):
            self.step(step)

    def step(self, step: int) -> None:
        """One optimizer step on batch `step` (the model in training mode)."""
        if self.progress is not None:
            self.progress(step, len(self.batches))
        self.optimizer.zero_grad(set_to_none=True)
        loss, _ = self.forward(self.batches[step])
        loss.backward()
        self.optimizer.step()


def interleaved_steps(loops: dict[str, BareLoop], steps: int) -> dict[str, list[float]]:
    """Seconds per step of every loop, their steps alternated one by one (batch i of each, in
    turn): a neighbour's burst of a few seconds, which can slow one arm of a round of whole
    loops, here slows the steps of all arms alike."""
    for loop in loops.values():
        loop.model.train()
    times: dict[str, list[float]] = {name: [] for name in loops}
    for i in range(steps):
        for name, loop in loops.items():
            t0 = time.perf_counter()
            loop.step(i % len(loop.batches))
            times[name].append(time.perf_counter() - t0)
    return times


class DLRMTrain(nn.Module):
    """TorchRec's DLRM scored with the project's multi-task loss: model(batch) -> (loss, out)."""

    def __init__(self, dlrm: nn.Module, loss: nn.Module) -> None:
        super().__init__()
        self.dlrm, self.loss = dlrm, loss

    def forward(self, batch):
        from recsys_moe.models.ranker import RankerOutput

        raw = self.dlrm(batch.dense, batch.sparse)
        return self.loss(RankerOutput(raw, raw.new_zeros(()), [], {}), batch)


def build_dlrm(trainer, over_arch: list[int]) -> tuple[nn.Module, torch.optim.Optimizer]:
    """A DLRM over the trainer's tables, sharded and optimised as the trainer does its model."""
    from torchrec.models.dlrm import DLRM

    from recsys_moe.distributed.sharding import dense_parameters, init_tables, shard_model
    from recsys_moe.models.training import MultiTaskLoss
    from recsys_moe.modules.embeddings import build_embedding_bags
    from recsys_moe.trainer import build_dense_optimizer

    cfg = trainer.cfg
    torch.manual_seed(cfg.trainer.seed)
    ebc = build_embedding_bags(cfg.data.sparse, cfg.model.embedding_dim, torch.device("meta"))
    bottom = [*cfg.model.bottom_mlp[:-1], cfg.model.embedding_dim]  # DLRM: ends at width E
    dlrm = DLRM(
        embedding_bag_collection=ebc,
        dense_in_features=len(cfg.data.dense),
        dense_arch_layer_sizes=bottom,
        over_arch_layer_sizes=over_arch,
    )
    loss = MultiTaskLoss(trainer.task_types, [1.0] * len(trainer.task_types))
    model = shard_model(
        DLRMTrain(dlrm, loss),
        trainer.dims,
        cfg.optim.sparse,
        cfg.parallel.embedding_sharding_types,
    )
    init_tables(model, ebc.embedding_bag_configs(), cfg.trainer.seed)
    dense = [p for _, p in dense_parameters(model)]
    return model, build_dense_optimizer(dense, cfg.optim.dense)


def dlrm_loop(trainer, over_arch: list[int], batches: list) -> BareLoop:
    """The FLOP-matched DLRM (build_dlrm) over `batches`, at the trainer's precision."""
    dlrm, dlrm_opt = build_dlrm(trainer, over_arch)
    return BareLoop(dlrm, dlrm_opt, batches, autocast_like(trainer, dlrm))


def autocast_like(trainer, model: nn.Module) -> Callable:
    """model(batch) under the autocast trainer.precision gives the trainer's own model."""
    from recsys_moe.config.schema import Precision

    bf16 = trainer.cfg.trainer.precision == Precision.bf16

    def forward(batch):
        with torch.autocast(trainer.device.type, dtype=torch.bfloat16, enabled=bf16):
            return model(batch)

    return forward


def saturate_dselect_k(trainer) -> None:
    """Every selector of every per-example DSelect-k gate outside the smooth-step window (as
    after training): the selector rows of the affine maps scaled by 1e4."""
    with torch.no_grad():
        for gate in trainer.ranker.moe.gates:
            km = gate.k * gate.num_bits
            gate.proj.weight[:km] *= 1e4


def moe_path(trainer, batch) -> dict[str, float]:
    """The expert path one training-mode forward of `batch` takes: active fraction, sparse (1.0)
    or dense."""
    trainer.model.train()
    with torch.no_grad():
        _, out = trainer.forward(batch)
    return {k: float(v) for k, v in out.moe_stats.items() if k in ("active_fraction", "sparse")}


# -- main --------------------------------------------------------------------------------------


def _stepwise_row(stepwise: dict[str, list[float]]) -> dict[str, float]:
    model, dlrm = statistics.median(stepwise["bare_loop"]), statistics.median(stepwise["dlrm"])
    return {
        "model_ms": 1000.0 * model,
        "dlrm_ms": 1000.0 * dlrm,
        "gap_ms": 1000.0 * (model - dlrm),
        "ratio": model / dlrm,
    }


def dlrm_stepwise_at(
    cfg: TrainConfig, work: Path, over_arch: list[int], steps: int
) -> dict[str, float]:
    """The model's bare loop (entropy weight 0: the dense expert path) and the FLOP-matched DLRM
    at cfg's batch size, single steps alternated (`interleaved_steps`) over the batches the
    data holds (at most 32, cycled): medians of each, their gap and ratio."""
    from recsys_moe.trainer import Trainer

    trainer = Trainer(cfg, work)
    try:
        held = min(32, trainer.train_data.steps)
        if held < 1:
            raise ValueError(f"the data has no full batch of {cfg.data.batch_size} rows")
        model = BareLoop.of(trainer, held)
        loops = {"bare_loop": model, "dlrm": dlrm_loop(trainer, over_arch, model.batches)}
        interleaved_steps(loops, min(4, steps))  # warm-up: first-touch allocations
        return _stepwise_row(interleaved_steps(loops, steps))
    finally:
        trainer.close()


def _init_one_process_group(device: str) -> bool:
    """One process group for every trainer built here (each reuses it, none destroys it).
    True where this call created it (the caller then destroys it)."""
    if dist.is_initialized():
        return False
    backend = backend_for(torch.device(device))  # as the trainer's own group would be
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    return True


def _allocator_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k.startswith(ALLOCATOR_ENV)}


def _spread(a: list[float], b: list[float], invert: bool = False) -> list[float]:
    """Quartiles of the per-round ratios a / b (b / a when invert)."""
    ratios = [(y / x if invert else x / y) for x, y in zip(a, b)]
    if len(ratios) < 2:
        return ratios * 3
    q = statistics.quantiles(ratios, n=4, method="inclusive")
    return [q[0], statistics.median(ratios), q[2]]


def run(args: argparse.Namespace) -> dict[str, Any]:
    created = _init_one_process_group(args.device)
    work = Path(tempfile.mkdtemp(prefix="bench_trainer_"))  # its data and run dirs
    try:
        return _run(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if created:  # leave the process as it was (e.g. a test process)
            free_process_groups()  # with the closed trainers' groups, held in reference cycles


def _run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    from recsys_moe.data.synthetic import SyntheticSpec, write
    from recsys_moe.trainer import Trainer

    data = work / "data"
    rows = args.steps * args.batch + 2 * args.big_batch
    write(
        SyntheticSpec(train_rows=rows, eval_rows=args.eval_rows, row_group_size=args.row_group),
        data,
    )
    base = [
        *training_only(data),
        f"data.batch_size={args.batch}",
        f"trainer.num_threads={args.threads}",
        f"trainer.device={args.device}",
        *args.override,
    ]
    big_steps = max(1, args.steps * args.batch // args.big_batch)
    cfg = compose_config([*base, f"trainer.max_steps={args.steps}"])
    build = {
        "bare": cfg,
        "big": compose_config([*base, f"data.batch_size={args.big_batch}"]),
        "dsk16": compose_config([*base, "model.num_experts=16"]),
        "soft16": compose_config([*base, "model.num_experts=16", "model/gate=softmax"]),
    }
    trainers = {name: Trainer(c, work / name) for name, c in build.items()}
    saturate_dselect_k(trainers["dsk16"])

    trunk = trunk_macs(cfg)
    over_arch, dlrm_macs = dlrm_over_arch(cfg, trunk)

    bare = BareLoop.of(trainers["bare"], args.steps)
    arms: dict[str, Callable[[], None]] = {
        "bare_loop": bare,
        "dlrm": dlrm_loop(trainers["bare"], over_arch, bare.batches),
        "batch_8192": BareLoop.of(trainers["big"], big_steps),
        "dselect_k_n16": BareLoop.of(trainers["dsk16"], args.steps),
        "softmax_n16": BareLoop.of(trainers["soft16"], args.steps),
    }
    paths = {
        "bare_loop": moe_path(trainers["bare"], arms["bare_loop"].batches[0]),
        "dselect_k_n16": moe_path(trainers["dsk16"], arms["dselect_k_n16"].batches[0]),
        "softmax_n16": moe_path(trainers["soft16"], arms["softmax_n16"].batches[0]),
    }

    rounds = itertools.count()
    current: dict[str, Any] = {}

    def fresh_trainer() -> None:
        if "trainer" in current:
            current.pop("trainer").close()
        t = Trainer(cfg, work / f"trainer_{next(rounds)}")
        t.evaluate = lambda: {}  # timed apart below: the ratio is the training loop's
        current["trainer"] = t

    arms["trainer"] = lambda: current["trainer"].train()

    def fresh_bare_loop() -> None:
        if "bare" in current:
            current.pop("bare").close()
        t = Trainer(cfg, work / f"bare_{next(rounds)}")
        current["bare"] = t
        current["bare_loop"] = BareLoop(
            t.model, t.optimizer, bare.batches, t.forward, t.ranker.set_train_progress
        )

    # the trainer's counterpart: a fresh model each round, the same gate schedule
    arms["bare_loop_scheduled"] = lambda: current["bare_loop"]()

    t0 = time.perf_counter()
    trainers["bare"].evaluate()
    eval_s = time.perf_counter() - t0

    setup = {"trainer": fresh_trainer, "bare_loop_scheduled": fresh_bare_loop}
    times = measure(arms, args.rounds, warmup=1, setup=setup)
    stepwise = interleaved_steps(
        {"bare_loop": arms["bare_loop"], "dlrm": arms["dlrm"]}, args.interleaved_steps
    )
    # where the gate schedule took the trainer and its bare counterpart by their last step
    paths["trainer_at_end"] = moe_path(current["trainer"], bare.batches[-1])
    paths["bare_loop_scheduled_at_end"] = moe_path(current["bare"], bare.batches[-1])
    current.pop("trainer").close()
    current.pop("bare").close()
    med = {name: median_ms(t) for name, t in times.items()}
    by_batch = {args.batch: _stepwise_row(stepwise)}
    for b in (b for b in args.stepwise_batches if b != args.batch):
        by_batch[b] = dlrm_stepwise_at(
            compose_config([*base, f"data.batch_size={b}"]),
            work / f"batch_{b}",
            over_arch,
            args.interleaved_steps,
        )

    per_step_trainer = med["trainer"] / 1000.0 / args.steps
    eval_per_step = eval_s * DEFAULT_JOB_EVALS / DEFAULT_JOB_STEPS
    sps_512 = args.steps * args.batch / (med["bare_loop"] / 1000.0)
    sps_big = big_steps * args.big_batch / (med["batch_8192"] / 1000.0)
    ratios = {
        "trainer_vs_bare_loop": med["bare_loop_scheduled"] / med["trainer"],
        "trainer_with_eval_vs_bare_loop": (med["bare_loop_scheduled"] / 1000.0 / args.steps)
        / (per_step_trainer + eval_per_step),
        "moe_trunk_vs_flop_matched_dlrm": med["bare_loop"] / med["dlrm"],
        "moe_trunk_vs_flop_matched_dlrm_stepwise": by_batch[args.batch]["ratio"],
        "batch_8192_vs_512_samples_per_sec": sps_big / sps_512,
        "dselect_k_step_vs_softmax_step": med["dselect_k_n16"] / med["softmax_n16"],
    }
    scale = big_steps * args.big_batch / (args.steps * args.batch)  # samples: big over 512
    spread = {
        "trainer_vs_bare_loop": _spread(
            times["trainer"], times["bare_loop_scheduled"], invert=True
        ),
        "moe_trunk_vs_flop_matched_dlrm": _spread(times["bare_loop"], times["dlrm"]),
        "moe_trunk_vs_flop_matched_dlrm_stepwise": _spread(stepwise["bare_loop"], stepwise["dlrm"]),
        "batch_8192_vs_512_samples_per_sec": [
            scale * r for r in _spread(times["batch_8192"], times["bare_loop"], invert=True)
        ],
        "dselect_k_step_vs_softmax_step": _spread(times["dselect_k_n16"], times["softmax_n16"]),
    }
    goals = {
        f"{k} {op} {v}": (ratios[k] >= v if op == ">=" else ratios[k] <= v)
        for k, (op, v) in GOALS.items()
    }
    for t in trainers.values():
        t.close()
    return {
        "benchmark": "trainer",
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "environment": environment() | {"allocator_env": _allocator_env()},
        "ratios": ratios,
        "spread": spread,
        "goals_met": goals,
        "median_ms": med,
        "steps": {"default": args.steps, "batch_8192": big_steps},
        "eval_s": eval_s,
        "flops": {
            "trunk_macs_per_example": trunk,
            "dlrm_over_arch": over_arch,
            "dlrm_over_arch_macs_per_example": dlrm_macs,
        },
        "moe_path": paths,
        "dlrm_by_batch": {str(b): by_batch[b] for b in sorted(by_batch)},
    }


def ratio_table(report: dict[str, Any]) -> str:
    """The ratios as printed: each ratio of the arms' medians (value) beside the quartiles of
    its per-round ratios (per-step for _stepwise), so that a reader sees how far the machine's
    noise moves it without opening the JSON."""
    rows = []
    for name, value in report["ratios"].items():
        q = report["spread"].get(name, [None] * 3)
        rows.append({"ratio": name, "value": value, "q1": q[0], "median": q[1], "q3": q[2]})
    return (
        table(rows, ["ratio", "value", "q1", "median", "q3"])
        + "\n(value: ratio of the arms' medians; q1 median q3: of the per-round ratios, "
        "per-step for _stepwise)"
    )


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    from recsys_moe.distributed.threads import threads_per_rank

    p = argparse.ArgumentParser(description="Trainer benchmark (ratios of interleaved arms).")
    p.add_argument("--out", type=Path, default=None, help="write the JSON report here")
    p.add_argument("--steps", type=int, default=128, help="steps per arm and round (batch 512)")
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument(
        "--interleaved-steps",
        type=int,
        default=256,
        help="steps of the model and of the DLRM alternated one by one (the _stepwise ratio)",
    )
    p.add_argument(
        "--stepwise-batches",
        type=int,
        nargs="*",
        default=[128, 2048],
        help="batch sizes at which the model and the DLRM are also alternated step by step "
        "(dlrm_by_batch; none: only --batch)",
    )
    p.add_argument("--threads", type=int, default=threads_per_rank())
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--big-batch", type=int, default=8192)
    p.add_argument("--eval-rows", type=int, default=25_000, help="as the default data")
    p.add_argument("--row-group", type=int, default=8_192)
    p.add_argument("--device", default="cpu")
    p.add_argument("--override", action="append", default=[], help="a Hydra override for every arm")
    args = p.parse_args(argv)
    report = run(args)
    rows = [{"arm": k, "median_ms": v} for k, v in report["median_ms"].items()]
    print(table(rows, ["arm", "median_ms"]))
    print(ratio_table(report))
    print(
        table(
            [{"batch": b, **row} for b, row in report["dlrm_by_batch"].items()],
            ["batch", "model_ms", "dlrm_ms", "gap_ms", "ratio"],
        )
    )
    print(
        "goals:",
        ", ".join(f"{k}: {'met' if v else 'MISSED'}" for k, v in report["goals_met"].items()),
    )
    write_report(args.out, report)
    return report


if __name__ == "__main__":
    main()
