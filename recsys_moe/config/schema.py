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
    """How every data shard (so every rank) gets the same number of train steps per epoch."""

    drop = "drop"  # each shard runs the minimum over shards of full batches; the rest is dropped
    pad = "pad"  # each shard runs the maximum; missing rows are zero-weight padding


class WorkerType(str, Enum):
    """What data.num_workers counts."""

    thread = "thread"  # threads of the training process (no copies between processes)
    process = "process"  # worker processes (windows sent through shared memory)


class GateType(str, Enum):
    softmax = "softmax"  # MMoE (Ma et al., KDD 2018): dense
    topk = "topk"  # Shazeer et al. 2017: the k largest logits, softmax over them
    dselect_k = "dselect_k"  # Hazimeh et al., NeurIPS 2021: differentiable k-sparse selection


class GateKernel(str, Enum):
    """How DSelect-k's per-example gate is computed (model.gate.kernel); the same values and
    gradients every way (recsys_moe/moe/gates/dselect_k_fused.py)."""

    reference = "reference"  # eager autograd through the paper's formulas (the reference)
    fused = "fused"  # one autograd Function, batch-last layout, hand-written backward
    compiled = "compiled"  # fused, its forward and backward compiled by torch.compile
    native = "native"  # fused, its math as two numba loops on CPU (fused's torch math elsewhere)


class ExpertKernel(str, Enum):
    """How the dense expert bank runs its GEMMs (model.expert_kernel); the same values and
    gradients every way (recsys_moe/moe/grouped.py)."""

    auto = "auto"  # batched where the experts' activations per CPU thread fit in cache
    batched = "batched"  # one GEMM batch over the experts per layer and per gradient
    per_expert = "per_expert"  # each expert's whole MLP before the next (its activations in cache)


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
    # (memory per rank: about (shards per rank) x (1 + num_workers x prefetch_factor) windows of
    # buffer_rows plus a row group). 0: row groups are shuffled but rows within them keep their
    # order.
    buffer_rows: int = 65536


@dataclass
class DataConfig:
    """Where the data is, what its columns mean, and how it is read (policies: data/loader.py)."""

    # Root of the data set: a local folder or a pyarrow filesystem URI (file://, s3://, gs://,
    # hdfs://, where the installed pyarrow supports it).
    path: str = MISSING
    train: str = "train"  # train split: a folder, file or glob, relative to path
    eval: str = "eval"  # eval split, likewise
    # Global batches: rows per step over all ranks together, split evenly over the ranks
    # (eval: each rank takes ceil(eval_batch_size / world size)).
    batch_size: int = 512
    eval_batch_size: int = 4096
    # Data shards of the train split (0: one per rank). Each shard is read as one stream; rank r
    # of W reads shards [r V/W, (r+1) V/W). Runs with the same num_shards see the same global
    # batches on any world size dividing it, and resume on one another's loader positions.
    num_shards: int = 0
    dense: list[str] = field(default_factory=list)  # float columns, in order
    sparse: list[SparseFeature] = field(default_factory=list)
    tasks: list[TaskSpec] = field(default_factory=list)
    row_id: Optional[str] = None  # optional int64 column carried into Batch.row_ids (tracing)
    on_bad_rows: BadRows = BadRows.error  # skip: counted per reason as data/skipped_rows/...
    # The trainer reads and checks every eval row before the first training step when the eval
    # split has at most this many rows (0: never), so that a bad eval row stops the run before
    # training rather than at the first eval.
    eval_check_max_rows: int = 2_000_000
    equal_steps: EqualSteps = EqualSteps.drop  # train steps per epoch, equal on every shard
    num_workers: int = 0  # workers per rank building shuffle windows (0: in the training loop)
    worker_type: WorkerType = WorkerType.thread
    prefetch_factor: int = 2  # shuffle windows (or row groups) each worker prepares ahead
    shuffle: ShuffleConfig = field(default_factory=ShuffleConfig)


# ---------------------------------------------------------------------------------------------
# model


@dataclass
class GateConfig:
    """The gate of every task. The keys after per_example belong to some gates only: null means
    "not set" (the gate's own default applies, see conf/model/gate/*.yaml and the gate classes),
    and a key set for a gate that does not use it is an error naming the key and the gate
    (recsys_moe.moe.gates.build_gate), never silently ignored."""

    type: GateType = GateType.softmax
    # per-example: weights are a function of the MoE input; static: one learned weight vector per task
    per_example: bool = True
    k: Optional[int] = None  # topk / dselect_k: the most experts one gate may select
    gamma: Optional[float] = None  # dselect_k: width of the smooth-step window
    entropy_reg: Optional[float] = None  # dselect_k: lambda of the selectors' entropy regulariser
    # dselect_k: lambda is 0 for this fraction of the run's training steps, then ramps linearly
    # from 0 over entropy_warmup_fraction more (fractions of the trainer's total steps)
    entropy_start_fraction: Optional[float] = None
    entropy_warmup_fraction: Optional[float] = None
    # dselect_k: the same in absolute training steps; when set, each overrides its fraction
    entropy_start_step: Optional[int] = None
    entropy_warmup_steps: Optional[int] = None
    noise: Optional[bool] = None  # topk: Shazeer et al.'s trainable noise (training only)
    # dselect_k: reference | fused | native (numba loops on CPU) | compiled (torch.compile: needs
    # a C++ compiler on CPU, Triton on CUDA); the same values and gradients, the others faster
    kernel: Optional[GateKernel] = None
    # dselect_k: outside training (eval, predict, export) round the selectors, so every example
    # gets at most k experts exactly; training always uses the soft (paper's) gate
    hard_inference: Optional[bool] = None


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
    expert_kernel: ExpertKernel = ExpertKernel.auto  # the dense bank's GEMMs (ExpertKernel)
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
    # one fused kernel per optimizer step: null = where torch has one for the optimizer and the
    # device (Adam, AdamW and SGD on CPU and CUDA in torch 2.13), true = required, false = never
    fused: Optional[bool] = None


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


class Resume(str, Enum):
    """checkpoint.resume: what a run does when its run dir already holds checkpoints."""

    auto = "auto"  # continue from the latest complete checkpoint of the run dir, if any
    never = "never"  # start over (existing checkpoints are left alone and later replaced)


class LoadMode(str, Enum):
    """checkpoint.load_mode: what checkpoint.load takes from another run's checkpoint."""

    weights = "weights"  # the model only: a new run (step 0, fresh optimizers and data)
    all = "all"  # everything: continue that run here (step, optimizers, data, RNG)


class DataOnReshard(str, Enum):
    """checkpoint.data_on_reshard: a resumed run whose data.num_shards differs from the saved."""

    error = "error"  # stop, saying which data.num_shards would resume exactly
    restart_epoch = "restart_epoch"  # restart the saved epoch; rows read again are counted


class NonFinite(str, Enum):
    """trainer.on_nonfinite: a step whose loss is NaN or infinite."""

    error = "error"  # stop naming the step and the task (checked on logging steps)
    skip = "skip"  # skip that step's update and count it (checked every step: a host sync)


class Pipeline(str, Enum):
    """How a training step gets its batch (trainer.pipeline)."""

    plain = "plain"  # copy the batch, then forward, backward, optimizer step
    # TorchRec's TrainPipelineSparseDist: the next batch's host-to-device copy and the KJT
    # input all-to-all of the tables overlap this step's compute (CUDA streams on GPUs)
    sparse_dist = "sparse_dist"
    auto = "auto"  # sparse_dist on CUDA, plain on CPU (where it has no streams to overlap on)


class Allocator(str, Enum):
    """The C allocator of the training process (trainer.allocator)."""

    tuned = "tuned"  # freed memory stays in the process: no page faults every step
    default = "default"  # the C library's defaults


class Precision(str, Enum):
    """Arithmetic of the trunk and towers (trainer.precision)."""

    fp32 = "fp32"
    # autocast to bfloat16 for the experts, their mixing, the towers and the bottom MLP; the
    # embedding tables, the gates and the loss stay fp32, parameters and optimizer states fp32
    bf16 = "bf16"


@dataclass
class TrainerConfig:
    epochs: int = 3
    max_steps: int = -1  # > 0 stops after this many steps (overrides epochs)
    eval_every: int = 0  # steps between evaluations; 0 = only at the end
    log_every: int = 50  # steps between train-metric logs (the only host syncs in the loop)
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    pipeline: Pipeline = Pipeline.auto
    precision: Precision = Precision.fp32  # fp32 | bf16 (autocast; see Precision)
    # CPU threads of each rank's kernels: null = the cores this process may use divided by the
    # ranks on its node (LOCAL_WORLD_SIZE), 0 = torch's default (every core), n = n
    num_threads: Optional[int] = None
    allocator: Allocator = Allocator.tuned  # tuned | default (recsys_moe/allocator.py)
    # A collective that does not complete within this many seconds (a peer rank died or hangs)
    # stops this rank with an error naming the collective, instead of waiting forever.
    collective_timeout_s: float = 600.0
    on_nonfinite: NonFinite = NonFinite.error


@dataclass
class ParallelConfig:
    """How the job is split over its ranks (distributed/parallel_dims.py).

    Every rank reads its part of the global batch. Experts are split over groups of `ep_size`
    consecutive ranks (model.num_experts / ep_size each) that exchange examples by all-to-all;
    the world size / ep_size groups are replicas of each other's experts. Embedding tables are
    sharded over all ranks by TorchRec's planner.
    """

    ep_size: int = 1
    # Sharding types the TorchRec planner may use for the tables (table_wise, row_wise,
    # column_wise, table_row_wise, data_parallel); empty: table_wise on CPU (the only one the
    # planner accepts there with a fused optimizer), its free choice on CUDA.
    embedding_sharding_types: list[str] = field(default_factory=list)
    # Start the experts' gradient all-reduce over their replicas inside backward, as soon as the
    # experts' backward is done (ep_size > 1 with more ranks than ep_size), as DDP overlaps its
    # buckets; false: after backward.
    overlap_expert_grads: bool = True


@dataclass
class CheckpointConfig:
    """Sharded checkpoints (torch.distributed.checkpoint) in <run dir>/checkpoints/."""

    every_steps: int = 500  # save every this many steps (0: only at the end)
    at_end: bool = True  # save after the last step
    keep: int = 2  # complete checkpoints kept (the oldest are deleted; >= 1)
    resume: Resume = Resume.auto
    # another run's checkpoint (its directory, or a run dir: its latest) to start from
    load: Optional[str] = None
    load_mode: LoadMode = LoadMode.weights
    async_save: bool = False  # write in a background thread while training goes on
    verify: bool = True  # sha256 of every file, written at save and checked at load
    data_on_reshard: DataOnReshard = DataOnReshard.error


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


class HeatmapWhen(str, Enum):
    """When the task x expert heatmap PNG is drawn (logger.gate_heatmap). The mean weights
    behind it are logged at every eval either way (eval/gate/<task>/weight/<e>)."""

    end = "end"  # at the final evaluation only
    every_eval = "every_eval"
    off = "off"


@dataclass
class LoggerConfig:
    console: bool = True  # per-task table at each eval, and log lines
    progress_bar: bool = True
    gate_heatmap: HeatmapWhen = HeatmapWhen.end
    # training-time gate telemetry (gate/<task>/..., expert/<e>/load, moe/...) from every this
    # many steps' batches and each logging step's (1: every batch); eval takes every batch.
    # Static gates' selection changes are tracked every step whatever this is.
    gate_telemetry_every: int = 10
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass
class TrainConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
