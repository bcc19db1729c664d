"""The trainer: build order, a flat step loop, the eval loop. It owns no model logic: it sees
model(batch) -> (loss, StepOutput).

Build order: parallel layout (checked before anything is built) and process groups -> data
(footers checked) -> model (unsharded, tables on meta) -> parallelise (experts over the ep
group, loss normalised over the global batch, TorchRec shards the tables and fuses their
optimizer, DDP for the dense rest) -> dense optimizer -> step pipeline -> metrics and sinks.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist
from tqdm import tqdm

from recsys_moe.allocator import keep_freed_memory
from recsys_moe.checkpoint.manager import Checkpointer, read_meta
from recsys_moe.checkpoint.manager import latest as latest_checkpoint
from recsys_moe.checkpoint.manager import resolve as resolve_checkpoint
from recsys_moe.checkpoint.state import (
    DataPart,
    DenseOptimizerPart,
    ExpertLayout,
    FusedOptimizerPart,
    LabelMeansPart,
    ModelPart,
    RngPart,
    from_json_tensor,
    json_target,
    json_tensor,
)
from recsys_moe.config.schema import (
    Allocator,
    DataOnReshard,
    DenseOptimConfig,
    GateConfig,
    GateType,
    HeatmapWhen,
    LoadMode,
    NonFinite,
    Pipeline,
    Precision,
    Resume,
    TrainConfig,
)
from recsys_moe.config.store import to_yaml
from recsys_moe.data.batch import Batch
from recsys_moe.data.loader import SplitInput
from recsys_moe.distributed.comm import all_gather_objects, all_reduce_, mean_over
from recsys_moe.distributed.expert_parallel import ExpertGradSync, parallelize_experts
from recsys_moe.distributed.parallel_dims import ParallelDims
from recsys_moe.distributed.sharding import (
    dense_parameters,
    init_tables,
    local_blocks,
    shard_model,
)
from recsys_moe.distributed.threads import set_num_threads
from recsys_moe.metrics.gates import GateTelemetry, save_heatmap
from recsys_moe.metrics.sinks import (
    JsonlSink,
    MetricSink,
    WandbSink,
    format_gate_table,
    format_task_table,
    new_run_id,
)
from recsys_moe.metrics.steps import StepScalars
from recsys_moe.metrics.tasks import LabelMeans, TaskMetrics
from recsys_moe.models.ranker import MultiTaskRanker
from recsys_moe.models.training import RankerTrain, StepOutput

log = logging.getLogger(__name__)


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite."""


class CollectiveError(RuntimeError):
    """A collective failed or timed out: a peer rank died or stopped responding."""


# Devices with fused Adam, AdamW and SGD kernels in torch 2.13 (floating-point parameters).
FUSED_OPTIMIZER_DEVICES = ("cpu", "cuda", "xpu", "mps", "hpu")


def build_dense_optimizer(
    params: list[torch.nn.Parameter], cfg: DenseOptimConfig
) -> torch.optim.Optimizer:
    """optim.dense: one fused kernel per step where torch has one for the optimizer and the
    parameters' device (optim.dense.fused: null = where available, true = required)."""
    if cfg.lr <= 0:
        raise ValueError(f"optim.dense.lr ({cfg.lr}) must be > 0")
    kinds = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}
    if cfg.name not in kinds:
        raise ValueError(f"optim.dense.name ({cfg.name}) must be adam, adamw or sgd")
    params = list(params)
    available = all(
        p.device.type in FUSED_OPTIMIZER_DEVICES and torch.is_floating_point(p) for p in params
    )
    if cfg.fused and not available:
        kinds_found = sorted({f"{p.dtype} on {p.device.type}" for p in params})
        raise ValueError(
            f"optim.dense.fused (true): torch has no fused {cfg.name} for parameters of "
            f"{', '.join(kinds_found)} (devices with one: {', '.join(FUSED_OPTIMIZER_DEVICES)})"
        )
    fused = available if cfg.fused is None else cfg.fused
    # fused=None, not False, leaves torch its own default (foreach where it can)
    return kinds[cfg.name](
        params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True if fused else None
    )


def cpu_bf16_kernels() -> bool:
    """Whether this CPU runs torch's bf16 matrix products on oneDNN's kernels (AVX-512 and
    newer). Without them (AVX2), a [512, 128] x [128, 256] product took 25 ms in bf16 against
    0.8 ms in fp32. Unknown (a torch without the query): True."""
    query = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    if query is None:
        return True
    try:
        return bool(query())
    except RuntimeError:  # a build without oneDNN
        return True


class _StepOptimizer:
    """What TorchRec's pipeline calls between backward and the next step: expert gradients over
    their replicas, the dense optimizer, the LR schedule (the plain loop calls the same)."""

    def __init__(self, trainer: Trainer) -> None:
        self.trainer = trainer

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.trainer.optimizer.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        t = self.trainer
        t._phase = "expert gradient all-reduce"
        t.expert_grad_sync()
        t.optimizer.step()
        t.scheduler.step()


class Trainer:
    """Trains and evaluates the multi-task ranker described by a TrainConfig.

    data.batch_size is the global batch: every rank trains on its part, the loss is that of the
    whole global batch, so the same job on 1, 2 or 4 ranks runs the same steps and, with the
    same data.num_shards, computes the same model (tests/distributed/test_trainer_ranks.py).

    Example:
        >>> trainer = Trainer(cfg, run_dir=Path("outputs/run"))
        >>> summary = trainer.train()      # final eval metrics + train/samples_per_sec
        >>> trainer.close()
    """

    def __init__(
        self, cfg: TrainConfig, run_dir: Path, config_dict: Optional[dict[str, Any]] = None
    ) -> None:
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        tc = cfg.trainer
        for key, value in (
            ("trainer.log_every", tc.log_every),
            ("trainer.epochs", tc.epochs),
            ("logger.gate_telemetry_every", cfg.logger.gate_telemetry_every),
        ):
            if value < 1:
                raise ValueError(f"{key} ({value}) must be >= 1")
        if tc.eval_every < 0:
            raise ValueError(
                f"trainer.eval_every ({tc.eval_every}) must be >= 0 (0: only at the end)"
            )
        self._phase = "start-up"
        self.step = 0
        self.sinks: list[MetricSink] = []
        self.dims = ParallelDims.from_env(cfg.parallel, cfg.model.num_experts)
        try:
            self._build(config_dict)
        except BaseException:
            self.close()
            raise

    def _build(self, config_dict: Optional[dict[str, Any]]) -> None:
        cfg, tc = self.cfg, self.cfg.trainer
        threads = set_num_threads(tc.num_threads)  # this rank's share of the cores by default
        if tc.allocator == Allocator.tuned:
            keep_freed_memory()
        # 1. parallel layout (degrees checked against the model in __init__) and groups
        self.dims.init(tc.device, tc.collective_timeout_s)
        log.info("%d CPU threads per rank (trainer.num_threads)", threads)
        dims, self.device = self.dims, self.dims.device
        if tc.precision == Precision.bf16 and self.device.type == "cpu" and not cpu_bf16_kernels():
            log.warning(
                "trainer.precision=bf16 on a CPU without oneDNN's bf16 kernels (they need "
                "AVX-512): torch multiplies bf16 matrices in a single-threaded fallback, 30-100x "
                "the time of fp32 for the trunk's products on an AVX2 host. fp32 trains faster here."
            )
        torch.manual_seed(tc.seed)  # the same on every rank: every rank builds the same model

        # 2. data: every file's footer is checked before anything else is built
        source = self._restore_source()
        self._adopt_num_shards(*source)
        cfg = self.cfg
        pin = self.device.type == "cuda"
        world, group = dims.world_size, dims.world_group
        self.train_data = SplitInput(cfg.data, "train", dims.rank, world, group, pin)
        self.eval_data = SplitInput(cfg.data, "eval", dims.rank, world, group, pin)
        # A bad eval row would otherwise stop the run at the first eval, after the training it
        # invalidates: read and check the eval rows now when there are few enough.
        self.eval_data.check_rows(max_rows=cfg.data.eval_check_max_rows)
        if self.train_data.dropped_rows:
            log.info(
                "train: %d of %d rows per epoch are dropped so every rank runs %d full batches",
                self.train_data.dropped_rows,
                self.train_data.total_rows,
                self.train_data.steps,
            )

        # 3. model, unsharded; its tables live on meta until sharding allocates them
        ranker = MultiTaskRanker(cfg.data, cfg.model, embedding_device=torch.device("meta"))
        model = RankerTrain(ranker, cfg.model.loss_weights)
        self.ranker = ranker  # set_train_progress reaches its gates through any wrapper
        self.task_names, self.task_types = model.task_names, model.task_types
        tables = ranker.sparse_arch.embedding_bag_configs() if ranker.sparse_arch else []

        # 4. parallelise
        expert_names = set(parallelize_experts(model, dims))
        experts = [p for n, p in model.named_parameters() if n in expert_names]
        if world > 1:  # each rank's loss is its share of the global batch's
            model.loss.reduce_denominators = mean_over(group)
        self.model = shard_model(
            model,
            dims,
            cfg.optim.sparse,
            cfg.parallel.embedding_sharding_types,
            ddp_ignore=sorted(expert_names),
        )
        init_tables(self.model, tables, tc.seed)
        self.expert_grad_sync = ExpertGradSync(experts, dims, cfg.parallel.overlap_expert_grads)

        # 5. dense optimizer over everything the fused optimizer does not own
        named_dense = dense_parameters(self.model.module)  # names as in the unsharded model
        dense = [p for _, p in named_dense]
        self.optimizer = build_dense_optimizer(dense, cfg.optim.dense)
        warmup = cfg.optim.dense.warmup_steps
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: min(1.0, (s + 1) / warmup) if warmup > 0 else 1.0
        )
        self.step_optimizer = _StepOptimizer(self)

        # 6. how a step gets its batch
        kind = Pipeline(tc.pipeline)
        if kind == Pipeline.auto:
            kind = Pipeline.sparse_dist if self.device.type == "cuda" else Pipeline.plain
        self.pipeline = None
        if kind == Pipeline.sparse_dist:
            from torchrec.distributed.train_pipeline import TrainPipelineSparseDist

            self.pipeline = TrainPipelineSparseDist(
                self.model,
                self.step_optimizer,
                self.device,  # type: ignore[arg-type]
                custom_model_fwd=self.forward,
            )

        # 7. metrics and sinks (rank 0 writes)
        T = len(self.task_names)
        self.label_means = LabelMeans(T, self.device)
        # each step's losses and label sums, reduced when read (folded into label_means); at
        # most 256 steps' tensors held between folds, whatever log_every
        self.step_scalars = StepScalars(
            T, min(cfg.trainer.log_every, self.total_steps, 256), self.label_means, self.device
        )
        loss_weights = model.loss.loss_weights.tolist()
        self.eval_metrics = TaskMetrics(self.task_names, self.task_types, loss_weights)
        self.train_gates = GateTelemetry(
            self.task_names,
            cfg.model.num_experts,
            self.device,
            track_selection=not cfg.model.gate.per_example,  # static gates: count changes
        )
        self.eval_gates = GateTelemetry(self.task_names, cfg.model.num_experts, self.device)
        self.skipped_steps = 0  # trainer.on_nonfinite=skip
        self.wandb_id = all_gather_objects(new_run_id(), group)[0]  # rank 0's, on every rank

        # 8. checkpoints: resume this run, or start from another run's weights
        experts_layout = ExpertLayout(dims, sorted(expert_names))
        self._positions: deque = deque()  # loader states after batches in flight (pipeline)
        self._trained: Optional[dict[str, Any]] = None  # that after the last trained one
        self.data_part = DataPart(
            self.train_data,
            self._trained_position,
            DataOnReshard(cfg.checkpoint.data_on_reshard).value,
        )
        self.checkpointer = Checkpointer(
            cfg.checkpoint,
            self.run_dir,
            dims,
            {
                "model": ModelPart(self.model, experts_layout),
                "optim.dense": DenseOptimizerPart(
                    self.optimizer, [n for n, _ in named_dense], experts_layout
                ),
                "optim.sparse": FusedOptimizerPart(self.model),
                "trainer": self,
                "labels": LabelMeansPart(self.label_means, dims),
                "data": self.data_part,
                "rng": RngPart(dims),
            },
            to_yaml(cfg),
            meta={"num_shards": self.train_data.num_shards},
        )
        self.resumed_from = self._restore(*source)

        # 9. sinks (rank 0 writes): after the restore, which decides the W&B run and the step
        if dims.is_main:
            self.sinks.append(
                JsonlSink(self.run_dir, resume_step=self.step if self.resumed_from else None)
            )
            if cfg.logger.wandb.enabled:
                self.sinks.append(
                    WandbSink(
                        cfg.logger.wandb, self.run_dir, config_dict or {}, run_id=self.wandb_id
                    )
                )
        log.info(
            "model: %d dense parameters (%d of them experts) on this rank, %d tables; %d tasks; "
            "%d train steps per epoch of %d examples (%d per rank); pipeline %s",
            sum(p.numel() for p in dense),
            sum(p.numel() for p in experts)
            if experts
            else sum(p.numel() for p in ranker.moe.experts.parameters()),
            len(tables),
            T,
            self.train_data.steps,
            self.train_data.batch_size,
            self.train_data.local_batch_size,
            kind.value,
        )

    # -- state ---------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The trainer's own state (the Checkpointer saves it next to model, optimizers, data):
        the step, the LR schedule, the W&B run id, steps skipped as non-finite."""
        sched = {k: v for k, v in self.scheduler.state_dict().items() if k != "lr_lambdas"}
        return {
            "step": torch.tensor(self.step, dtype=torch.int64),
            "state": json_tensor(
                {"scheduler": sched, "wandb_id": self.wandb_id, "skipped_steps": self.skipped_steps}
            ),
        }

    def load_targets(self, sizes) -> dict[str, torch.Tensor]:
        return {"step": torch.zeros((), dtype=torch.int64), "state": json_target(sizes, "state")}

    def load_state_dict(self, filled: dict[str, torch.Tensor]) -> None:
        self.step = int(filled["step"])
        state = from_json_tensor(filled["state"])
        self.scheduler.load_state_dict({**self.scheduler.state_dict(), **state["scheduler"]})
        self.wandb_id = state["wandb_id"]
        self.skipped_steps = int(state["skipped_steps"])

    def _trained_position(self) -> dict[str, Any]:
        """The loader state after the last batch trained on: the pipeline reads ahead, so its
        steps record the states of the batches they pull and drop them as they finish."""
        if self._trained is not None:
            return self._trained
        return self.train_data.state_dict()

    def _restore_source(self) -> tuple[Optional[Path], Optional[list[str]]]:
        """What to load: checkpoint.resume=auto takes the latest complete checkpoint of this
        run dir, all of it; else checkpoint.load names another run's (its weights, or all)."""
        ck = self.cfg.checkpoint
        if ck.resume == Resume.auto:
            latest = latest_checkpoint(self.run_dir / "checkpoints")
            if latest is not None:
                return latest, None
        if ck.load:
            return resolve_checkpoint(ck.load), None if ck.load_mode == LoadMode.all else ["model"]
        return None, None

    def _adopt_num_shards(self, path: Optional[Path], parts: Optional[list[str]]) -> None:
        """data.num_shards left at 0 (one shard per rank) takes a resumed checkpoint's when the
        ranks can share it out, so the data position resumes exactly on the new world size."""
        data = self.cfg.data
        if path is None or parts is not None or data.num_shards != 0:
            return
        saved = int(read_meta(path).get("num_shards", 0))
        if saved and saved % self.dims.world_size == 0 and saved != self.dims.world_size:
            log.info("data.num_shards: %d, as the checkpoint it resumes (%s)", saved, path)
            self.cfg.data = replace(data, num_shards=saved)

    def _restore(self, path: Optional[Path], parts: Optional[list[str]]) -> Optional[Path]:
        if path is None:
            return None
        self._phase = f"loading checkpoint {path}"
        meta = self.checkpointer.load(path, parts)
        if parts == ["model"]:  # weights only: a new run from step 0
            log.info("weights from %s (step %d); training starts at step 0", path, meta["step"])
        else:
            log.info("resumed from %s at step %d", path, self.step)
        return path

    # -- the step --------------------------------------------------------------------------------

    @property
    def total_steps(self) -> int:
        per_run = self.train_data.steps * self.cfg.trainer.epochs
        return (
            min(per_run, self.cfg.trainer.max_steps) if self.cfg.trainer.max_steps > 0 else per_run
        )

    def _train_batches(self) -> Iterator[Batch]:
        """The batches of the remaining steps, across epochs: the loader's position counts the
        batches it has handed out, so nothing asks for a batch it would not train on."""
        left = self.total_steps - self.step
        while left > 0:
            for batch, _ in self.train_data.batches():
                if self.pipeline is not None:  # popped once the step on this batch is done
                    self._positions.append(self.train_data.state_dict())
                yield batch
                left -= 1
                if left == 0:
                    return

    def forward(self, batch: Batch) -> tuple[torch.Tensor, StepOutput]:
        """model(batch) at trainer.precision: bf16 autocasts the trunk and the towers (the gates
        route in fp32); the embeddings (FBGEMM kernels) and the loss stay fp32."""
        bf16 = self.cfg.trainer.precision == Precision.bf16
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=bf16):
            return self.model(batch)

    def train_step(self, batch: Batch) -> StepOutput:
        """One optimizer step on this rank's part of the global batch (the plain loop)."""
        self._phase = "forward (embedding and expert all-to-alls, loss normalisation)"
        batch = batch.to(self.device, non_blocking=True)
        self.step_optimizer.zero_grad()
        loss, out = self.forward(batch)
        if self.cfg.trainer.on_nonfinite == NonFinite.skip and self._all_ranks_nonfinite(loss):
            # Before backward: the tables' fused optimizer updates them inside backward, so a
            # poisoned step can only be skipped whole (on every rank: their collectives match).
            self.skipped_steps += 1
            out.task_losses = torch.zeros_like(out.task_losses)  # nothing of it is kept
            out.aux_loss = torch.zeros_like(out.aux_loss)
            out.loss = torch.zeros_like(out.loss)
            return out
        self._phase = "backward (DDP gradient all-reduce, embedding and expert all-to-alls)"
        # Gradients sync here: DDP averages the dense ones over all ranks, TorchRec sends each
        # table row's gradient to its owner (where the fused optimizer applies it), and the
        # all-to-alls run backwards to the experts' owners. Experts are reduced in step().
        loss.backward()
        self.step_optimizer.step()
        return out

    def _all_ranks_nonfinite(self, loss: torch.Tensor) -> bool:
        """Whether the loss is NaN or infinite on any rank (a host sync and a small all-reduce
        every step: only with trainer.on_nonfinite=skip)."""
        bad = (~torch.isfinite(loss.detach())).to(torch.int64).reshape(1)
        return bool(all_reduce_(bad, self.dims.world_group, dist.ReduceOp.MAX).item())

    # -- the loop -------------------------------------------------------------------------------

    def train(self) -> dict[str, float]:
        """Runs total_steps optimizer steps, evaluating every eval_every steps and at the end.
        Returns the summary written to summary.json."""
        try:
            return self._train()
        except (RuntimeError, dist.DistError) as e:
            raise self._collective_error(e) from e

    def _collective_error(self, e: BaseException) -> BaseException:
        text = str(e)
        signs = ("gloo", "NCCL", "nccl", "Connection closed", "Timed out", "timed out", "peer")
        if isinstance(e, (CollectiveError, NonFiniteLossError)) or not (
            isinstance(e, dist.DistError) or any(s in text for s in signs)
        ):
            return e
        return CollectiveError(
            f"rank {self.dims.rank}/{self.dims.world_size}: a collective in {self._phase} at "
            f"step {self.step + 1} failed: a peer rank died or did not answer within "
            f"trainer.collective_timeout_s ({self.cfg.trainer.collective_timeout_s:g} s). "
            f"Cause: {text.splitlines()[0] if text else type(e).__name__}"
        )

    def _train(self) -> dict[str, float]:
        tc, dims = self.cfg.trainer, self.dims
        global_batch = self.train_data.batch_size  # global: split over the ranks
        # Device-side accumulators (step_scalars): the loop syncs the host only on logging steps.
        scalars = self.step_scalars
        eval_metrics: dict[str, float] = {}
        bar = tqdm(
            total=self.total_steps,
            disable=not (self.cfg.logger.progress_bar and dims.is_main),
            unit="step",
            dynamic_ncols=True,
        )
        self.model.train()
        batches = self._train_batches()
        # Throughput is wall clock: waiting for data counts, evaluation does not.
        start = window_start = time.perf_counter()
        eval_time = window_eval = 0.0
        samples = window_samples = 0
        while self.step < self.total_steps:
            # schedules that follow the run (DSelect-k's lambda) read the step, not forward calls
            self.ranker.set_train_progress(self.step, self.total_steps)
            if self.pipeline is None:
                self._phase = "data"
                out = self.train_step(next(batches))
            else:
                self._phase = "pipelined step (input all-to-all, forward, backward)"
                out = self.pipeline.progress(batches)
            self.step += 1
            if self._positions:
                self._trained = self._positions.popleft()
            samples += global_batch
            window_samples += global_batch

            scalars.add(out, self.step)  # losses and label sums, kept: no operator, no host sync
            # the gates' own statistics on the last step of each logging window only
            logs = self.step % tc.log_every == 0 or self.step == self.total_steps
            # and their weight statistics every gate_telemetry_every steps (and at logging)
            sampled = logs or self.step % self.cfg.logger.gate_telemetry_every == 0
            self.train_gates.update(out.gates, out.moe_stats, gate_stats=logs, weights=sampled)
            bar.update(1)

            if logs:
                self._phase = "train metrics all-reduce"
                self._check_finite()  # folds the step scalars
                if self.device.type == "cuda":
                    torch.cuda.synchronize()
                now = time.perf_counter()
                # the mean over ranks of their shares is the global batch's loss
                sums = all_reduce_(scalars.loss_sums.clone(), dims.world_group)
                means = (sums / (scalars.steps * dims.world_size)).tolist()
                metrics = {
                    "train/loss": means[0],
                    "train/epoch": float((self.step - 1) // self.train_data.steps),
                    "train/lr": self.scheduler.get_last_lr()[0],
                    "train/samples_per_sec": window_samples
                    / max(now - window_start - window_eval, 1e-9),
                }
                for t, name in enumerate(self.task_names):
                    metrics[f"train/{name}/loss"] = means[1 + t]
                metrics.update(self.train_gates.compute())
                self.train_gates.reset()
                metrics.update(self._data_metrics())  # skipped rows
                if self.cfg.trainer.on_nonfinite == NonFinite.skip:
                    metrics["train/skipped_nonfinite_steps"] = float(self.skipped_steps)
                self._log(metrics, self.step)
                bar.set_postfix(
                    loss=f"{metrics['train/loss']:.4f}",
                    samples_per_s=f"{metrics['train/samples_per_sec']:.0f}",
                )
                scalars.reset_losses()
                window_samples, window_eval = 0, 0.0
                window_start = time.perf_counter()
            if tc.eval_every and self.step % tc.eval_every == 0 and self.step < self.total_steps:
                t0 = time.perf_counter()
                eval_metrics = self.evaluate()
                self.model.train()
                dt = time.perf_counter() - t0
                eval_time += dt
                window_eval += dt
            if self.checkpointer.due(self.step) and self.step < self.total_steps:
                t0 = time.perf_counter()
                self._save()
                dt = time.perf_counter() - t0  # as eval: not training time
                eval_time += dt
                window_eval += dt
            self.checkpointer.poll()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        train_time = time.perf_counter() - start - eval_time
        bar.close()
        self._check_finite()
        eval_metrics = self.evaluate()
        if self.cfg.checkpoint.at_end and not self._saved_at(self.step):
            self._save()
        self.checkpointer.wait()
        summary = {
            "step": float(self.step),
            **eval_metrics,
            "train/samples_per_sec": samples / max(train_time, 1e-9),
            **self._data_metrics(),
        }
        for sink in self.sinks:
            sink.summary(summary)
        return summary

    def _save(self) -> None:
        """A checkpoint at this step, never of a poisoned state: the losses of every step so far
        and every parameter are checked first (host syncs: only when saving)."""
        self._phase = "checkpoint save"
        self._check_finite()  # and the label means, saved with the model, are up to date
        for name, t in self.model.state_dict().items():
            for _, local in local_blocks(t):
                if torch.is_floating_point(local) and not bool(torch.isfinite(local).all()):
                    raise NonFiniteLossError(
                        f"parameter {name} is not finite at step {self.step}: no checkpoint written"
                    )
        self.checkpointer.save(self.step)
        log.info(
            "checkpoint at step %d: %.2f s of training time",
            self.step,
            self.checkpointer.last_save_s,
        )

    def _saved_at(self, step: int) -> bool:
        latest = self.checkpointer.latest()
        pending = self.checkpointer._pending
        return (latest is not None and latest.name == f"step_{step:08d}") or (
            pending is not None and pending[3] == step
        )

    def _data_metrics(self) -> dict[str, float]:
        """The loader's counters (a collective), and the rows a resume read again."""
        out = self.train_data.metrics(self.dims.world_group)
        if self.data_part.rows_reread:
            out["data/rows_reread"] = float(self.data_part.rows_reread)
        return out

    def _log(self, metrics: dict[str, float], step: int) -> None:
        for sink in self.sinks:
            sink.log(metrics, step)

    def _check_finite(self) -> None:
        """Folds the step scalars; raises naming the first step whose loss was not finite."""
        self.step_scalars.fold()
        first = self.step_scalars.first_nonfinite()
        if first is not None:
            step, slots = first
            names = [*self.task_names, "gate regularisers"]
            which = [names[i] for i in slots]
            raise NonFiniteLossError(
                f"loss is not finite at step {step} (task: {', '.join(which)})"
            )

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Exact metrics over every eval row (all ranks). Logged and returned as eval/... keys."""
        self._phase = "eval (forward all-to-alls, metric gathers)"
        if self.pipeline is not None:
            self.pipeline.detach()  # plain forwards; the pipeline re-attaches at its next step
        self.model.eval()
        self.eval_metrics.reset()
        self.eval_gates.reset()
        for batch, real in self.eval_data.batches():
            batch = batch.to(self.device, non_blocking=True)
            _, out = self.forward(batch)
            if real:
                self.eval_metrics.update(out.raw, batch.labels, batch.masks, batch.weights)
                self.eval_gates.update(out.gates, out.moe_stats)
        group = self.dims.world_group
        self.eval_metrics.gather(group)
        self.eval_gates.reduce(group)
        self.step_scalars.fold()  # the label means of every step trained so far
        means = self.label_means.means(group)
        metrics = {f"eval/{k}": v for k, v in self.eval_metrics.compute(means).items()}
        metrics.update({f"eval/{k}": v for k, v in self.eval_gates.compute().items()})
        for k, v in self.eval_data.metrics(group).items():
            metrics["data/eval/" + k.removeprefix("data/")] = v
        self._log(metrics, self.step)
        heatmap = self.cfg.logger.gate_heatmap
        if self.dims.is_main and (
            heatmap == HeatmapWhen.every_eval
            or (heatmap == HeatmapWhen.end and self.step >= self.total_steps)
        ):  # drawing a PNG costs a training step or two: by default only at the end
            path = save_heatmap(
                self.eval_gates.mean_weights(),
                self.task_names,
                self.run_dir / "gates" / f"heatmap_step{self.step:07d}.png",
                f"mean gate weight per task and expert (eval, step {self.step})",
            )
            for sink in self.sinks:
                sink.log_image("eval/gate_heatmap", path, self.step)
        if self.cfg.logger.console and self.dims.is_main:
            tasks = format_task_table(metrics, self.task_names, self.task_types)
            gates = format_gate_table(metrics, self.task_names)
            log.info("eval at step %d\n%s\n%s", self.step, tasks, gates)
        if self.step >= self.total_steps and self.dims.is_main:
            warning = rounded_selectors_warning(self.cfg.model.gate, metrics, self.task_names)
            if warning:
                log.warning(warning)
        return metrics

    def close(self) -> None:
        if getattr(self, "checkpointer", None) is not None:
            self.checkpointer.close()
        if getattr(self, "expert_grad_sync", None) is not None:
            self.expert_grad_sync.close()
        for sink in self.sinks:
            sink.close()
        self.sinks = []
        self.dims.close()


# The soft selectors' saturated fraction below which rounding them (hard_inference) is flagged
HARD_ROUTING_MIN_SATURATED = 0.99


def rounded_selectors_warning(
    gate: GateConfig, metrics: dict[str, float], task_names: Sequence[str]
) -> Optional[str]:
    """At the end of a run: where DSelect-k's hard_inference rounded more than 1% of a task's
    eval (example, selector) pairs, the eval metrics are those of the rounded gate, not of the
    soft one training optimised; None when every task's selectors saturated (rounding then
    changes almost nothing) or the gate does not round."""
    if gate.type != GateType.dselect_k or not gate.hard_inference:
        return None
    low = {
        name: v
        for name in task_names
        if (v := metrics.get(f"eval/gate/{name}/saturated_fraction")) is not None
        and v < HARD_ROUTING_MIN_SATURATED
    }
    if not low:
        return None
    fractions = ", ".join(f"{name} {100 * v:.1f}%" for name, v in low.items())
    return (
        f"DSelect-k's selectors did not saturate by the end of training (eval pairs saturated: "
        f"{fractions}): model.gate.hard_inference rounded the rest, so these eval metrics are "
        "the rounded gate's, which training never saw. Train longer or with a larger "
        "model.gate.entropy_reg, or evaluate the soft gate: model.gate.hard_inference=false"
    )
