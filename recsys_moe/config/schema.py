"""Typed configuration: plain dataclasses, the single source of truth for every config key.

`recsys_moe.config.store` registers them in Hydra's ConfigStore so that a YAML typo or a value of
the wrong type fails when the config is composed, naming the key. Library code receives these
objects (or plain arguments), never Hydra objects.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Optional

from omegaconf import MISSING


class TaskType(str, Enum):
    binary = "binary"  # logit head, BCE loss; AUC and log loss
    regression = "regression"  # value head, MSE loss; RMSE and MAE


class Pooling(str, Enum):
    sum = "sum"
    mean = "mean"


class IdPolicy(str, Enum):
    """What a sparse feature does with an id outside [0, num_embeddings)."""

    error = "error"  # a bad row (handled by data.on_bad_rows)
    hash = "hash"  # mapped into range by a fixed 64-bit mix, modulo num_embeddings


class BadRows(str, Enum):
    error = "error"  # stop with an error naming file, row group, column and row
    skip = "skip"  # leave the row (or file) out and count it per reason in the metrics


class EqualSteps(str, Enum):
    """How every rank gets the same number of train steps per epoch."""

    drop = "drop"  # each rank runs the global minimum of full batches; the rest is dropped
    pad = "pad"  # each rank runs the global maximum; missing rows are zero-weight padding


class WorkerType(str, Enum):
    """What data.num_workers counts."""

    thread = "thread"  # threads of the training process (no copies between processes)
    process = "process"  # torch DataLoader worker processes (windows sent through shared memory)


class GateType(str, Enum):
    softmax = "softmax"  # MMoE (Ma et al., KDD 2018): dense
    topk = "topk"  # Shazeer et al. 2017: the k largest logits, softmax over them
    dselect_k = "dselect_k"  # Hazimeh et al., NeurIPS 2021: differentiable k-sparse selection


class ExpertCompute(str, Enum):
    dense = "dense"  # every expert on every example
    sparse = "sparse"  # each expert only on the examples some task gives it nonzero weight
    auto = "auto"  # sparse when the active (example, expert) fraction is small enough


# ---------------------------------------------------------------------------------------------
# data


@dataclass
class SparseFeature:
    """One categorical column (int64 or list<int64>) looked up in an embedding table."""

    name: str = MISSING
    num_embeddings: int = MISSING  # rows of its table
    column: Optional[str] = None  # Parquet column; defaults to name
    table: Optional[str] = None  # table name; features naming the same table share it
    pooling: Pooling = Pooling.sum  # how a multi-valued row's embeddings are pooled
    id_policy: IdPolicy = IdPolicy.error  # ids outside [0, num_embeddings): error or hash

    @property
    def column_name(self) -> str:
        return self.column or self.name

    @property
    def table_name(self) -> str:
        return self.table or self.name


@dataclass
class TaskSpec:
    """One prediction task: its label column, type and optional mask and sample-weight columns."""

    name: str = MISSING
    type: TaskType = TaskType.binary
    label: Optional[str] = None  # Parquet column; defaults to name
    mask: Optional[str] = None  # bool column: the label exists on this row
    weight: Optional[str] = None  # float column: per-row weight of this task's loss and metrics
    # tasks known to be related share a cluster name (a synthetic ground truth); only read by
    # the expert-selection metrics of recsys_moe.report (do a cluster's tasks share experts?)
    cluster: Optional[str] = None

    @property
    def label_column(self) -> str:
        return self.label or self.name


@dataclass
class ShuffleConfig:
    """Train-split shuffling; eval is never shuffled. Deterministic for a seed and epoch."""

    enabled: bool = True
    seed: int = 0
    # Rows of consecutive row groups gathered into one window that is permuted as a whole
    # (memory per rank: about (1 + num_workers x prefetch_factor) windows of buffer_rows plus a
    # row group). 0: row groups are shuffled but rows within them keep their order.
    buffer_rows: int = 65536


@dataclass
class DataConfig:
    """Where the data is, what its columns mean, and how it is read (policies: data/loader.py)."""

    # Root of the data set: a local folder or a pyarrow filesystem URI (file://, s3://, gs://,
    # hdfs://, where the installed pyarrow supports it).
    path: str = MISSING
    train: str = "train"  # train split: a folder, file or glob, relative to path
    eval: str = "eval"  # eval split, likewise
    batch_size: int = 512
    eval_batch_size: int = 4096
    dense: list[str] = field(default_factory=list)  # float columns, in order
    sparse: list[SparseFeature] = field(default_factory=list)
    tasks: list[TaskSpec] = field(default_factory=list)
    row_id: Optional[str] = None  # optional int64 column carried into Batch.row_ids (tracing)
    on_bad_rows: BadRows = BadRows.error  # skip: counted per reason as data/skipped_rows/...
    equal_steps: EqualSteps = EqualSteps.drop  # train steps per epoch, equal on every rank
    num_workers: int = 0  # workers per rank building shuffle windows (0: in the training loop)
    worker_type: WorkerType = WorkerType.thread
    prefetch_factor: int = 2  # shuffle windows (or row groups) each worker prepares ahead
    shuffle: ShuffleConfig = field(default_factory=ShuffleConfig)


# ---------------------------------------------------------------------------------------------
# model


@dataclass
class GateConfig:
    type: GateType = GateType.softmax
    # per-example: weights are a function of the MoE input; static: one learned weight vector per task
    per_example: bool = True
    k: int = 2  # topk / dselect_k: the most experts one gate may select
    gamma: float = 1.0  # dselect_k: width of the smooth-step window
    entropy_reg: float = 0.0  # dselect_k: lambda of the selectors' entropy regulariser (batch mean)
    # dselect_k: lambda is 0 for this fraction of the run's training steps, then ramps linearly
    # from 0 over entropy_warmup_fraction more (fractions of trainer's total steps)
    entropy_start_fraction: float = 0.0
    entropy_warmup_fraction: float = 0.0
    # dselect_k: the same in absolute training steps; when set, each overrides its fraction
    entropy_start_step: Optional[int] = None
    entropy_warmup_steps: Optional[int] = None
    noise: bool = (
        False  # topk: Shazeer et al.'s trainable Gaussian noise on the logits (training only)
    )


@dataclass
class ModelConfig:
    embedding_dim: int = 16  # every table's embedding width
    bottom_mlp: list[int] = field(
        default_factory=lambda: [64, 32]
    )  # dense features -> these widths
    num_experts: int = 8
    expert_hidden: list[int] = field(default_factory=lambda: [256])
    expert_dim: int = 64  # width of each expert's output
    tower: list[int] = field(default_factory=lambda: [64])  # per-task tower hidden widths
    dropout: float = 0.0  # in experts and towers
    gate: GateConfig = field(default_factory=GateConfig)
    expert_compute: ExpertCompute = ExpertCompute.auto
    # auto: run sparse when at most this fraction of the (example, expert) pairs is active
    sparse_max_active_fraction: float = 0.5
    loss_weights: dict[str, float] = field(default_factory=dict)  # task name -> weight (default 1)


# ---------------------------------------------------------------------------------------------
# optimisation, training loop, logging


@dataclass
class DenseOptimConfig:
    name: str = "adam"  # adam | adamw | sgd
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 0  # linear warm-up of the dense learning rate


@dataclass
class SparseOptimConfig:
    """TorchRec fused optimizer applied to the embedding tables inside backward."""

    name: str = "rowwise_adagrad"  # rowwise_adagrad | adagrad | adam | sgd
    lr: float = 0.05
    eps: float = 1e-8
    weight_decay: float = 0.0


@dataclass
class OptimConfig:
    dense: DenseOptimConfig = field(default_factory=DenseOptimConfig)
    sparse: SparseOptimConfig = field(default_factory=SparseOptimConfig)


@dataclass
class TrainerConfig:
    epochs: int = 3
    max_steps: int = -1  # > 0 stops after this many steps (overrides epochs)
    eval_every: int = 0  # steps between evaluations; 0 = only at the end
    log_every: int = 50  # steps between train-metric logs (the only host syncs in the loop)
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda


@dataclass
class WandbConfig:
    enabled: bool = False
    project: str = "recsys_moe"
    entity: Optional[str] = None
    name: Optional[str] = None
    group: Optional[str] = None
    tags: list[str] = field(default_factory=list)
    # online | offline | disabled; null = $WANDB_MODE if set, else offline (no network needed)
    mode: Optional[str] = None


@dataclass
class LoggerConfig:
    console: bool = True  # per-task table at each eval, and log lines
    progress_bar: bool = True
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass
class TrainConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
