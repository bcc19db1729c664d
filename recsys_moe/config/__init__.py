from recsys_moe.config.schema import (
    DataConfig,
    GateConfig,
    GateType,
    LoggerConfig,
    ModelConfig,
    OptimConfig,
    Pooling,
    SparseFeature,
    TaskSpec,
    TaskType,
    TrainConfig,
    TrainerConfig,
)

__all__ = [
    "DataConfig",
    "GateConfig",
    "GateType",
    "LoggerConfig",
    "ModelConfig",
    "OptimConfig",
    "Pooling",
    "SparseFeature",
    "TaskSpec",
    "TaskType",
    "TrainConfig",
    "TrainerConfig",
]
