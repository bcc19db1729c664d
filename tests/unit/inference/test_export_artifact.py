"""Export: a checkpoint's ranker becomes an artifact that loads, without process groups, into a
model with exactly the same tensors and outputs; damage and mismatches fail naming the file or key."""

from __future__ import annotations

import copy
import hashlib
import json
import re

import pytest
import torch
import yaml
from safetensors.torch import load_file

from recsys_moe.checkpoint.manager import write_meta
from recsys_moe.config.schema import ExpertCompute, TrainConfig
from recsys_moe.inference import (
    ArtifactError,
    CheckpointError,
    export_checkpoint,
    load_artifact,
)
from recsys_moe.inference.artifact import CONFIG, FORMAT_VERSION, MANIFEST, WEIGHTS
from tests.checkpoint_fixtures import (
    batches,
    save_checkpoint,
    small_model,
    train_model,
    with_compute,
)
from tests.conftest import synthetic_data_config

STEPS = 8


@pytest.fixture(scope="module")
def checkpoints(tiny_data, tmp_path_factory):
    """gate -> (config, the trained RankerTrain, its checkpoint), made once per gate."""
    made = {}

    def get(gate: str):
        if gate not in made:
            cfg = TrainConfig(data=synthetic_data_config(tiny_data), model=small_model(gate))
            model = train_model(cfg, STEPS)
            made[gate] = (
                cfg,
                model,
                save_checkpoint(model, cfg, tmp_path_factory.mktemp("run"), STEPS),
            )
        return made[gate]

    return get


@pytest.fixture
def trained(checkpoints):
    return checkpoints("dselect_k")


@pytest.mark.parametrize("compute", [ExpertCompute.dense, ExpertCompute.sparse])
@pytest.mark.parametrize("gate", ["dselect_k", "topk"])
def test_artifact_equals_the_checkpointed_model(checkpoints, tmp_path, gate, compute):
    cfg, source, ckpt = checkpoints(gate)
    out = export_checkpoint(ckpt, tmp_path / "artifact", compute)
    model, meta = load_artifact(out)
    assert not model.training and meta.model.expert_compute == compute and meta.step == STEPS

    want, got = source.model.state_dict(), model.state_dict()
    assert list(got) == list(want)
    for key in want:  # buffers too (the DSelect-k gates' schedule position)
        assert torch.equal(got[key], want[key]), key

    reference = with_compute(source.model, compute)
    other = ExpertCompute.sparse if compute == ExpertCompute.dense else ExpertCompute.dense
    model_other, _ = load_artifact(out, expert_compute=other)
    with torch.no_grad():
        for batch in batches(cfg, "eval", 250)[:2]:
            expected = reference(batch.dense, batch.sparse)
            actual = model(batch.dense, batch.sparse)
            assert torch.equal(actual.raw, expected.raw)
            assert actual.moe_stats["sparse"].item() == float(compute == ExpertCompute.sparse)
            # the other compute mode is the same function, up to float rounding
            torch.testing.assert_close(
                model_other(batch.dense, batch.sparse).raw, actual.raw, rtol=1e-5, atol=1e-6
            )
    if gate == "topk" and compute == ExpertCompute.sparse:
        assert actual.moe_stats["active_fraction"].item() < 1.0  # experts were really skipped


def test_manifest_lists_tasks_features_versions_and_file_hashes(trained, tmp_path):
    cfg, _, ckpt = trained
    out = export_checkpoint(ckpt, tmp_path / "artifact")
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["step"] == STEPS and manifest["source"] == str(ckpt)
    assert [(t["name"], t["type"], t["column"], t["prediction"]) for t in manifest["tasks"]] == [
        ("click", "binary", "pred_click", "probability"),
        ("like", "binary", "pred_like", "probability"),
        ("watch_time", "regression", "pred_watch_time", "value"),
        ("rating", "regression", "pred_rating", "value"),
    ]
    assert manifest["features"]["dense"] == cfg.data.dense
    assert [f["name"] for f in manifest["features"]["sparse"]] == [f.name for f in cfg.data.sparse]
    assert manifest["features"]["sparse"][4]["table"] == "item_id"  # user_history shares it
    assert {"torch", "torchrec", "safetensors", "recsys_moe"} <= set(manifest["versions"])
    assert set(manifest["files"]) == {WEIGHTS, CONFIG}
    for name, entry in manifest["files"].items():
        assert entry["sha256"] == hashlib.sha256((out / name).read_bytes()).hexdigest()
    config = yaml.safe_load((out / CONFIG).read_text())
    assert set(config) == {"data", "model"} and config["model"]["expert_compute"] == "dense"


@pytest.mark.parametrize("name", [WEIGHTS, CONFIG])
def test_a_flipped_byte_fails_naming_the_file(trained, tmp_path, name):
    cfg, source, ckpt = trained
    out = export_checkpoint(ckpt, tmp_path / "artifact")
    path = out / name
    data = bytearray(path.read_bytes())
    data[len(data) - 40] ^= 0x01  # inside the last tensor's bytes, or the config's last lines
    path.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=re.escape(f"{path}: sha256")):
        load_artifact(out)
    if name == WEIGHTS:  # why the manifest: safetensors alone loads the damaged tensor silently
        damaged = load_file(str(path))
        assert any(not torch.equal(damaged[k], v) for k, v in source.model.state_dict().items())


def test_a_truncated_or_missing_file_fails_naming_it(trained, tmp_path):
    _, _, ckpt = trained
    out = export_checkpoint(ckpt, tmp_path / "truncated")
    (out / WEIGHTS).write_bytes((out / WEIGHTS).read_bytes()[:-4])
    with pytest.raises(ArtifactError, match=re.escape(f"{out / WEIGHTS}: ") + r"\d+ bytes"):
        load_artifact(out)
    out = export_checkpoint(ckpt, tmp_path / "missing")
    (out / CONFIG).unlink()
    with pytest.raises(ArtifactError, match=re.escape(f"{out / CONFIG}: missing")):
        load_artifact(out)


def test_an_artifact_of_another_format_version_is_refused_naming_both(trained, tmp_path):
    # version 1 held the towers and heads per task; version 2 stacks them (TaskTowers)
    _, _, ckpt = trained
    out = export_checkpoint(ckpt, tmp_path / "artifact")
    manifest = json.loads((out / MANIFEST).read_text())
    (out / MANIFEST).write_text(json.dumps({**manifest, "format_version": FORMAT_VERSION - 1}))
    with pytest.raises(
        ArtifactError, match=f"version {FORMAT_VERSION - 1}; .* version {FORMAT_VERSION}"
    ):
        load_artifact(out)


def test_export_of_a_checkpoint_missing_a_model_key_names_the_key(trained, tmp_path):
    cfg, source, _ = trained
    key = "model.model.moe.experts.weights.1"
    ckpt = save_checkpoint(source, cfg, tmp_path / "run", STEPS, drop=key)
    with pytest.raises(CheckpointError, match=re.escape(f"key '{key}' of the model is missing")):
        export_checkpoint(ckpt, tmp_path / "artifact")
    assert not (tmp_path / "artifact").exists() and list(tmp_path.iterdir()) == [tmp_path / "run"]


def test_export_of_a_model_with_a_nan_names_the_key(trained, tmp_path):
    cfg, source, _ = trained
    poisoned = copy.deepcopy(source)
    with torch.no_grad():
        poisoned.model.towers.weights[0][2, 3, 1] = float("nan")
    ckpt = save_checkpoint(poisoned, cfg, tmp_path / "run", STEPS)
    with pytest.raises(CheckpointError, match=r"key 'model.model.towers.weights.0' holds NaN"):
        export_checkpoint(ckpt, tmp_path / "artifact")


def test_export_with_a_config_of_another_model_names_the_key_and_shapes(trained, tmp_path):
    cfg, source, _ = trained
    ckpt = save_checkpoint(source, cfg, tmp_path / "run", STEPS)
    config = yaml.safe_load((ckpt / "config.yaml").read_text())
    config["model"]["num_experts"] = 4
    (ckpt / "config.yaml").write_text(yaml.safe_dump(config))
    write_meta(ckpt, STEPS, {})  # hashes of the edited file: no corruption, another model
    with pytest.raises(CheckpointError) as e:
        export_checkpoint(ckpt, tmp_path / "artifact")
    assert "key 'model.model.moe.experts.weights.0' has shape [6, 64, 32] in the checkpoint" in str(
        e.value
    ) and "[4, 64, 32] in the model" in str(e.value)


def test_export_refuses_to_overwrite(trained, tmp_path):
    _, _, ckpt = trained
    (tmp_path / "artifact").mkdir()
    with pytest.raises(FileExistsError, match="artifact: already exists"):
        export_checkpoint(ckpt, tmp_path / "artifact")
