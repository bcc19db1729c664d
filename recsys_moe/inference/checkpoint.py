"""The ranker of a training checkpoint, read on one device without any process group.

A checkpoint is a directory written by torch.distributed.checkpoint (DCP): `.metadata` and
`*.distcp` files, with `config.yaml` (the run's resolved config) and `meta.json` ({"step": ...})
beside them. The model's weights are under "model." + the keys of RankerTrain's state_dict, so
"model.model." + the ranker's own keys, in global (unsharded) shapes whatever the world size
and sharding of the run that wrote them: DCP assembles each tensor from the ranks' shards by
their global offsets. Other keys (optimizer states, loader positions, RNG) are not read.

A run directory names its latest checkpoint in `checkpoints/latest` (a text file holding the
checkpoint's directory name, e.g. step_1200); either can be given.
"""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from recsys_moe.checkpoint.manager import CheckpointError, read_meta, verify
from recsys_moe.checkpoint.manager import resolve as resolve_checkpoint
from recsys_moe.config.schema import DataConfig, ExpertCompute, ModelConfig
from recsys_moe.config.sections import read_model_sections
from recsys_moe.models.ranker import MultiTaskRanker

MODEL_PREFIX = "model.model."  # DCP key of ranker key k: MODEL_PREFIX + k


@dataclasses.dataclass
class CheckpointRanker:
    """The ranker of a checkpoint (eval mode, CPU) with what it was built from."""

    model: MultiTaskRanker
    data: DataConfig
    model_config: ModelConfig
    meta: dict[str, Any]  # meta.json
    path: Path  # the checkpoint directory

    @property
    def step(self) -> int:
        return int(self.meta["step"])


def read_checkpoint(
    path: str | Path, expert_compute: Optional[ExpertCompute] = ExpertCompute.dense
) -> CheckpointRanker:
    """The ranker of the checkpoint at `path` (or of a run directory's latest), all task heads,
    unsharded, in eval mode on CPU. `expert_compute` replaces model.expert_compute of the run
    (None keeps it). Every ranker key must be in the checkpoint with its shape, and no other
    "model.model." key may be; every value must be finite: a CheckpointError names the key
    otherwise."""
    ckpt = resolve_checkpoint(path)
    meta = read_meta(ckpt)
    if any(meta["files"].values()):
        verify(ckpt, meta)  # every file as it was saved, before anything is read
    try:
        data, model_cfg = read_model_sections(ckpt / "config.yaml")
    except (FileNotFoundError, ValueError) as e:
        raise CheckpointError(str(e)) from e
    if expert_compute is not None:
        model_cfg = dataclasses.replace(model_cfg, expert_compute=ExpertCompute(expert_compute))

    model = MultiTaskRanker(data, model_cfg)
    dest = {MODEL_PREFIX + k: v for k, v in model.state_dict().items()}
    _check_keys(ckpt, dest)
    with warnings.catch_warnings():
        # "torch.distributed is disabled ... assuming the intent is to load in a single process"
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(dest, checkpoint_id=str(ckpt), no_dist=True)  # in place, into model's tensors
    for key, t in dest.items():  # an artifact is never exported from a poisoned model
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise CheckpointError(f"{ckpt}: key '{key}' holds NaN or infinite values")
    model.eval()
    return CheckpointRanker(model, data, model_cfg, meta, ckpt)


def _check_keys(ckpt: Path, dest: dict[str, torch.Tensor]) -> None:
    try:
        stored = FileSystemReader(str(ckpt)).read_metadata().state_dict_metadata
    except Exception as e:  # noqa: BLE001 - a corrupt .metadata raises pickle or OS errors
        raise CheckpointError(f"{ckpt / '.metadata'}: unreadable ({type(e).__name__}: {e})") from e
    where = f"{ckpt} (built from its config.yaml)"
    for key, t in dest.items():
        if key not in stored:
            raise CheckpointError(
                f"{ckpt}: key '{key}' of the model is missing from the checkpoint; "
                "config.yaml must describe the model whose weights were saved"
            )
        md = stored[key]
        if not isinstance(md, TensorStorageMetadata):
            raise CheckpointError(f"{ckpt}: key '{key}' is not stored as a tensor")
        if tuple(md.size) != tuple(t.shape):
            raise CheckpointError(
                f"{ckpt}: key '{key}' has shape {list(md.size)} in the checkpoint but "
                f"{list(t.shape)} in the model of {where}"
            )
        if md.properties.dtype != t.dtype:
            raise CheckpointError(
                f"{ckpt}: key '{key}' has dtype {md.properties.dtype} in the checkpoint but "
                f"{t.dtype} in the model of {where}"
            )
    extra = sorted(k for k in stored if k.startswith(MODEL_PREFIX) and k not in dest)
    if extra:
        raise CheckpointError(
            f"{ckpt}: key '{extra[0]}' (and {len(extra) - 1} more) of the checkpoint is not in "
            f"the model of {where}"
        )
