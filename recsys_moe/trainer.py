"""The trainer: build order, train loop, eval loop. It owns no model logic: it sees
model(batch) -> (loss, outputs).

Build order: process group -> data (footers checked) -> model (unsharded, tables on meta)
-> sharding (TorchRec DMP, fused sparse optimizer) -> dense optimizer -> metrics and sinks.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Optional

import torch
from tqdm import tqdm

from recsys_moe.config.schema import DenseOptimConfig, TrainConfig
from recsys_moe.data.loader import SplitInput
from recsys_moe.distributed.env import close_distributed, init_distributed
from recsys_moe.distributed.sharding import dense_parameters, shard_model
from recsys_moe.metrics.gates import GateTelemetry, save_heatmap
from recsys_moe.metrics.sinks import (
    JsonlSink,
    MetricSink,
    WandbSink,
    format_gate_table,
    format_task_table,
)
from recsys_moe.metrics.tasks import LabelMeans, TaskMetrics
from recsys_moe.models.ranker import MultiTaskRanker

log = logging.getLogger(__name__)


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite."""


def build_dense_optimizer(
    params: list[torch.nn.Parameter], cfg: DenseOptimConfig
) -> torch.optim.Optimizer:
    if cfg.lr <= 0:
        raise ValueError(f"optim.dense.lr ({cfg.lr}) must be > 0")
    if cfg.name == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.name == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.name == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    raise ValueError(f"optim.dense.name ({cfg.name}) must be adam, adamw or sgd")


class Trainer:
    """Trains and evaluates the multi-task ranker described by a TrainConfig.

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
        for key, value in (("trainer.log_every", tc.log_every), ("trainer.epochs", tc.epochs)):
            if value < 1:
                raise ValueError(f"{key} ({value}) must be >= 1")
        if tc.eval_every < 0:
            raise ValueError(
                f"trainer.eval_every ({tc.eval_every}) must be >= 0 (0: only at the end)"
            )

        # 1. process group and device
        self.env = init_distributed(tc.device)
        self.device = self.env.device
        torch.manual_seed(tc.seed)

        # 2. data: every file's footer is checked before anything else is built
        env = self.env
        pin = self.device.type == "cuda"
        self.train_data = SplitInput(cfg.data, "train", env.rank, env.world_size, env.group, pin)
        self.eval_data = SplitInput(cfg.data, "eval", env.rank, env.world_size, env.group, pin)
        if self.train_data.dropped_rows:
            log.info(
                "train: %d of %d rows per epoch are dropped so every rank runs %d full batches",
                self.train_data.dropped_rows,
                self.train_data.total_rows,
                self.train_data.steps,
            )

        # 3. model, unsharded; its tables live on meta until sharding allocates them
        model = MultiTaskRanker(cfg.data, cfg.model, embedding_device=torch.device("meta"))
        self.ranker = model  # sharding wraps it in place: set_train_progress reaches its gates
        self.task_names, self.task_types = model.task_names, model.task_types
        self.loss_weights = model.loss_weights.tolist()
        num_tables = len(model.sparse_arch.embedding_bag_configs()) if model.sparse_arch else 0

        # 4. parallelise: TorchRec shards the tables and fuses their optimizer into backward
        self.model = shard_model(model, env, cfg.optim.sparse)

        # 5. dense optimizer over everything the fused optimizer does not own
        dense = [p for _, p in dense_parameters(self.model)]
        self.optimizer = build_dense_optimizer(dense, cfg.optim.dense)
        warmup = cfg.optim.dense.warmup_steps
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: min(1.0, (s + 1) / warmup) if warmup > 0 else 1.0
        )

        # 6. metrics and sinks (rank 0 writes)
        T = len(self.task_names)
        self.label_means = LabelMeans(T, self.device)
        self.eval_metrics = TaskMetrics(self.task_names, self.task_types, self.loss_weights)
        self.train_gates = GateTelemetry(
            self.task_names,
            cfg.model.num_experts,
            self.device,
            track_selection=not cfg.model.gate.per_example,  # static gates: count changes
        )
        self.eval_gates = GateTelemetry(self.task_names, cfg.model.num_experts, self.device)
        self.sinks: list[MetricSink] = []
        if env.is_main:
            self.sinks.append(JsonlSink(self.run_dir))
            if cfg.logger.wandb.enabled:
                self.sinks.append(WandbSink(cfg.logger.wandb, self.run_dir, config_dict or {}))
        self.step = 0
        n_dense = sum(p.numel() for p in dense)
        log.info(
            "model: %d dense parameters, %d tables; %d tasks; %d train steps per epoch",
            n_dense,
            num_tables,
            T,
            self.train_data.steps,
        )

    # ------------------------------------------------------------------------------------------

    @property
    def total_steps(self) -> int:
        per_run = self.train_data.steps * self.cfg.trainer.epochs
        return (
            min(per_run, self.cfg.trainer.max_steps) if self.cfg.trainer.max_steps > 0 else per_run
        )

    def _log(self, metrics: dict[str, float], step: int) -> None:
        for sink in self.sinks:
            sink.log(metrics, step)

    def train(self) -> dict[str, float]:
        """Runs the configured epochs (or max_steps), evaluating every eval_every steps and at
        the end. Returns the summary written to summary.json."""
        tc, env = self.cfg.trainer, self.env
        T = len(self.task_names)
        global_batch = self.train_data.batch_size * env.world_size
        # Device-side accumulators: the loop syncs the host only on logging steps.
        acc_loss = torch.zeros((), device=self.device)
        acc_tasks = torch.zeros(T, device=self.device)
        acc_n = 0
        # First step at which each task's loss (slot T: the gate regularisers) was not finite.
        first_bad = torch.full((T + 1,), -1, dtype=torch.long, device=self.device)
        train_time, samples, window_t, window_samples = 0.0, 0, 0.0, 0
        eval_metrics: dict[str, float] = {}
        bar = tqdm(
            total=self.total_steps,
            disable=not (self.cfg.logger.progress_bar and env.is_main),
            unit="step",
            dynamic_ncols=True,
        )
        self.model.train()
        done = False
        # The loader's position (train_data.state_dict()) counts the batches it has handed out,
        # so the loop stops before asking for a batch it would not train on.
        for epoch in range(self.train_data.epoch, tc.epochs):
            if self.step >= self.total_steps:
                break
            for batch, _ in self.train_data.batches():
                t0 = time.perf_counter()
                batch = batch.to(self.device, non_blocking=True)
                # schedules that follow the run (DSelect-k's lambda) read this step, not calls
                self.ranker.set_train_progress(self.step, self.total_steps)
                loss, out = self.model(batch)
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()  # the embedding rows are updated here, by the fused optimizer
                self.optimizer.step()
                self.scheduler.step()
                self.step += 1

                self.label_means.update(batch.labels, batch.masks, batch.weights)
                self.train_gates.update(out.gates, out.moe_stats)
                parts = torch.cat([out.task_losses.detach(), out.aux_loss.detach().reshape(1)])
                first_bad = torch.where(
                    (first_bad < 0) & ~torch.isfinite(parts), self.step, first_bad
                )
                acc_loss += loss.detach()
                acc_tasks += out.task_losses.detach()
                acc_n += 1
                samples += global_batch
                window_samples += global_batch
                if self.device.type == "cuda" and self.step % tc.log_every == 0:
                    torch.cuda.synchronize()
                dt = time.perf_counter() - t0
                train_time += dt
                window_t += dt
                bar.update(1)

                if self.step % tc.log_every == 0 or self.step == self.total_steps:
                    self._check_finite(first_bad)
                    metrics = {
                        "train/loss": (acc_loss / acc_n).item(),
                        "train/epoch": float(epoch),
                        "train/lr": self.scheduler.get_last_lr()[0],
                        "train/samples_per_sec": window_samples / max(window_t, 1e-9),
                    }
                    for t, name in enumerate(self.task_names):
                        metrics[f"train/{name}/loss"] = (acc_tasks[t] / acc_n).item()
                    metrics.update(self.train_gates.compute())
                    self.train_gates.reset()
                    metrics.update(self.train_data.metrics(env.group))  # skipped rows per reason
                    self._log(metrics, self.step)
                    bar.set_postfix(
                        loss=f"{metrics['train/loss']:.4f}",
                        samples_per_s=f"{metrics['train/samples_per_sec']:.0f}",
                    )
                    acc_loss.zero_()
                    acc_tasks.zero_()
                    acc_n, window_t, window_samples = 0, 0.0, 0
                if (
                    tc.eval_every
                    and self.step % tc.eval_every == 0
                    and self.step < self.total_steps
                ):
                    eval_metrics = self.evaluate()
                    self.model.train()
                if self.step >= self.total_steps:
                    done = True
                    break
            if done:
                break
        bar.close()
        self._check_finite(first_bad)
        eval_metrics = self.evaluate()
        summary = {
            "step": float(self.step),
            **eval_metrics,
            "train/samples_per_sec": samples / max(train_time, 1e-9),
            **self.train_data.metrics(env.group),
        }
        for sink in self.sinks:
            sink.summary(summary)
        return summary

    def _check_finite(self, first_bad: torch.Tensor) -> None:
        bad = first_bad.tolist()
        if any(s >= 0 for s in bad):
            step = min(s for s in bad if s >= 0)
            names = [*self.task_names, "gate regularisers"]
            which = [n for n, s in zip(names, bad) if s == step]
            raise NonFiniteLossError(
                f"loss is not finite at step {step} (task: {', '.join(which)})"
            )

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Exact metrics over every eval row (all ranks). Logged and returned as eval/... keys."""
        self.model.eval()
        self.eval_metrics.reset()
        self.eval_gates.reset()
        for batch, real in self.eval_data.batches():
            batch = batch.to(self.device, non_blocking=True)
            _, out = self.model(batch)
            if real:
                self.eval_metrics.update(out.raw, batch.labels, batch.masks, batch.weights)
                self.eval_gates.update(out.gates, out.moe_stats)
        self.eval_metrics.gather(self.env.group)
        self.eval_gates.reduce(self.env.group)
        metrics = {
            f"eval/{k}": v for k, v in self.eval_metrics.compute(self.label_means.means()).items()
        }
        metrics.update({f"eval/{k}": v for k, v in self.eval_gates.compute().items()})
        for k, v in self.eval_data.metrics(self.env.group).items():
            metrics["data/eval/" + k.removeprefix("data/")] = v
        self._log(metrics, self.step)
        if self.env.is_main:
            path = save_heatmap(
                self.eval_gates.mean_weights(),
                self.task_names,
                self.run_dir / "gates" / f"heatmap_step{self.step:07d}.png",
                f"mean gate weight per task and expert (eval, step {self.step})",
            )
            for sink in self.sinks:
                sink.log_image("eval/gate_heatmap", path, self.step)
        if self.cfg.logger.console and self.env.is_main:
            tasks = format_task_table(metrics, self.task_names, self.task_types)
            gates = format_gate_table(metrics, self.task_names)
            log.info("eval at step %d\n%s\n%s", self.step, tasks, gates)
        return metrics

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()
        self.sinks = []
        close_distributed(self.env)
