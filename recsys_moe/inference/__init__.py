"""Inference: a trained checkpoint exported as a single-device artifact, and batch prediction.

    export_checkpoint(checkpoint, out, expert_compute=dense) -> out     (python -m recsys_moe.export)
    load_artifact(path, expert_compute=None) -> (MultiTaskRanker, ArtifactMeta)
    predict_parquet(model, meta, data, out, ...) -> PredictReport       (python -m recsys_moe.predict)

Example:
    >>> export_checkpoint("outputs/run/checkpoints/step_1200", "artifacts/ranker")
    >>> model, meta = load_artifact("artifacts/ranker")
    >>> out = model(batch.dense, batch.sparse)            # out.raw: [B, T]
"""

from recsys_moe.inference.artifact import (
    ArtifactError,
    ArtifactMeta,
    export_checkpoint,
    load_artifact,
    prediction_column,
    verify_artifact,
    write_artifact,
)
from recsys_moe.inference.checkpoint import (
    CheckpointError,
    CheckpointRanker,
    read_checkpoint,
    resolve_checkpoint,
)
from recsys_moe.inference.scoring import PredictReport, format_report, predict_parquet

__all__ = [
    "ArtifactError",
    "ArtifactMeta",
    "CheckpointError",
    "CheckpointRanker",
    "PredictReport",
    "export_checkpoint",
    "format_report",
    "load_artifact",
    "predict_parquet",
    "prediction_column",
    "read_checkpoint",
    "resolve_checkpoint",
    "verify_artifact",
    "write_artifact",
]
