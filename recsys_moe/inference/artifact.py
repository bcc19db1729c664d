"""The inference artifact: a directory that rebuilds the trained ranker on one device.

    weights.safetensors  every tensor of MultiTaskRanker.state_dict() (all task heads, the
                         tables and experts unsharded), in safetensors: a JSON header and raw
                         bytes, so loading it runs no pickle at all
    config.yaml          the `data` and `model` sections of the run's config: rebuilds the
                         ranker and says how input is read (features, ids, policies)
    manifest.json        format, step, tasks and what each prediction column holds, features,
                         library versions, and the sha256 and size of every other file

load_artifact verifies every file against the manifest before reading it, so a corrupted file
fails naming it (safetensors itself checks the header but not the tensor bytes). The manifest
is the root of that check; it guards against damage, not against someone who rewrites it too.

safetensors rather than torch.save + torch.load(weights_only=True): the format has no pickle
stream to restrict in the first place, is read the same way by other languages and serving
stacks, and memory-maps large tables.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import uuid
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from recsys_moe.checkpoint.manager import sha256_file
from recsys_moe.config.schema import DataConfig, ExpertCompute, ModelConfig, TaskType
from recsys_moe.config.sections import read_model_sections, write_model_sections
from recsys_moe.inference.checkpoint import read_checkpoint
from recsys_moe.models.ranker import MultiTaskRanker

FORMAT = "recsys_moe.inference"
FORMAT_VERSION = 2  # 2: the towers and heads stacked (TaskTowers), as checkpoint format 2
WEIGHTS = "weights.safetensors"
CONFIG = "config.yaml"
MANIFEST = "manifest.json"
PREDICTION_PREFIX = "pred_"  # prediction column of task t: pred_<t>
_PACKAGES = (
    "recsys_moe",
    "torch",
    "torchrec",
    "fbgemm-gpu",
    "fbgemm-gpu-cpu",
    "pyarrow",
    "safetensors",
)


class ArtifactError(ValueError):
    """An artifact that cannot be loaded as written: the message names the file (and key)."""


@dataclasses.dataclass
class ArtifactMeta:
    """What an artifact says besides its weights."""

    path: Path
    data: DataConfig
    model: ModelConfig
    manifest: dict[str, Any]

    @property
    def step(self) -> int:
        return int(self.manifest["step"])

    @property
    def task_names(self) -> list[str]:
        return [t.name for t in self.data.tasks]

    @property
    def output_columns(self) -> list[str]:
        """The prediction column of each task, in task order."""
        return [prediction_column(t) for t in self.task_names]


def prediction_column(task: str) -> str:
    return PREDICTION_PREFIX + task


def _versions() -> dict[str, str]:
    out = {}
    for name in _PACKAGES:
        try:
            out[name] = importlib_metadata.version(name)
        except importlib_metadata.PackageNotFoundError:
            continue
    return out


def _manifest(model: MultiTaskRanker, data: DataConfig, step: int, source: str) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "step": step,
        "source": source,
        "tasks": [
            {
                "name": t.name,
                "type": t.type.value,
                "column": prediction_column(t.name),
                "prediction": "probability" if t.type == TaskType.binary else "value",
            }
            for t in data.tasks
        ],
        "features": {
            "dense": list(data.dense),
            "sparse": [
                {
                    "name": f.name,
                    "column": f.column_name,
                    "table": f.table_name,
                    "num_embeddings": f.num_embeddings,
                    "pooling": f.pooling.value,
                    "id_policy": f.id_policy.value,
                }
                for f in data.sparse
            ],
            "row_id": data.row_id,
        },
        "parameters": sum(t.numel() for t in model.state_dict().values()),
        "versions": _versions(),
    }


def write_artifact(
    model: MultiTaskRanker,
    data: DataConfig,
    model_config: ModelConfig,
    out: str | Path,
    step: int,
    source: str = "",
) -> Path:
    """Writes the artifact of `model` to the new directory `out` (written beside it under a
    temporary name and renamed when complete, so `out` is never half written)."""
    out = Path(out)
    if out.exists():
        raise FileExistsError(f"{out}: already exists (the artifact goes to a new directory)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(tmp / WEIGHTS), metadata={"format": FORMAT})
        write_model_sections(tmp / CONFIG, data, model_config)
        manifest = _manifest(model, data, step, source)
        manifest["files"] = {
            name: {"sha256": sha256_file(tmp / name), "bytes": (tmp / name).stat().st_size}
            for name in (WEIGHTS, CONFIG)
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def export_checkpoint(
    checkpoint: str | Path,
    out: str | Path,
    expert_compute: ExpertCompute = ExpertCompute.dense,
) -> Path:
    """Exports the ranker of a checkpoint directory (or a run directory's latest checkpoint) as
    the artifact `out`; `expert_compute` becomes the artifact's default (dense or exact sparse;
    auto as in training). Returns `out`."""
    ckpt = read_checkpoint(checkpoint, ExpertCompute(expert_compute))
    return write_artifact(
        ckpt.model, ckpt.data, ckpt.model_config, out, ckpt.step, source=str(ckpt.path)
    )


def verify_artifact(path: str | Path) -> dict[str, Any]:
    """The manifest, once every file it lists has its size and sha256 (ArtifactError naming
    the file otherwise)."""
    path = Path(path)
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise ArtifactError(f"{manifest_path}: missing ({path} is not an inference artifact)")
    try:
        manifest = json.loads(manifest_path.read_text())
        fmt, version, files = manifest["format"], manifest["format_version"], manifest["files"]
    except (ValueError, KeyError, TypeError) as e:
        raise ArtifactError(f"{manifest_path}: not a readable manifest ({e})") from e
    if fmt != FORMAT or version != FORMAT_VERSION:
        raise ArtifactError(
            f"{manifest_path}: format {fmt} version {version}; this recsys_moe reads "
            f"{FORMAT} version {FORMAT_VERSION}"
        )
    for name in (WEIGHTS, CONFIG):
        if name not in files:
            raise ArtifactError(f"{manifest_path}: lists no {name}")
    for name, want in files.items():
        f = path / name
        if not f.is_file():
            raise ArtifactError(f"{f}: missing (listed in {MANIFEST})")
        size = f.stat().st_size
        if size != want["bytes"]:
            raise ArtifactError(
                f"{f}: {size} bytes, {want['bytes']} in {MANIFEST} (truncated or replaced)"
            )
        digest = sha256_file(f)
        if digest != want["sha256"]:
            raise ArtifactError(
                f"{f}: sha256 {digest} does not match {want['sha256']} in {MANIFEST} (corrupt)"
            )
    return manifest


def load_artifact(
    path: str | Path, expert_compute: Optional[ExpertCompute] = None
) -> tuple[MultiTaskRanker, ArtifactMeta]:
    """(the ranker in eval mode on CPU, what the artifact says). Every file is verified first;
    `expert_compute` replaces the artifact's default (dense unless exported otherwise). No
    process group is needed and nothing is unpickled."""
    path = Path(path)
    manifest = verify_artifact(path)
    try:
        data, model_cfg = read_model_sections(path / CONFIG)
    except (FileNotFoundError, ValueError) as e:
        raise ArtifactError(str(e)) from e
    if expert_compute is not None:
        model_cfg = dataclasses.replace(model_cfg, expert_compute=ExpertCompute(expert_compute))
    model = MultiTaskRanker(data, model_cfg)
    weights = path / WEIGHTS
    try:
        state = load_file(str(weights), device="cpu")
    except SafetensorError as e:
        raise ArtifactError(f"{weights}: not readable safetensors ({e})") from e
    want = model.state_dict()
    for key, t in want.items():
        if key not in state:
            raise ArtifactError(f"{weights}: key '{key}' of the model is missing")
        if state[key].shape != t.shape or state[key].dtype != t.dtype:
            raise ArtifactError(
                f"{weights}: key '{key}' is {state[key].dtype}{list(state[key].shape)}, the "
                f"model of {path / CONFIG} has {t.dtype}{list(t.shape)}"
            )
    extra = sorted(set(state) - set(want))
    if extra:
        raise ArtifactError(f"{weights}: key '{extra[0]}' is not in the model of {path / CONFIG}")
    with torch.no_grad():
        model.load_state_dict(state, strict=True)
    model.eval()
    return model, ArtifactMeta(path, data, model_cfg, manifest)
