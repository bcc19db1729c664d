"""The multi-task ranker, unsharded, on a batch read from tiny synthetic data."""

from __future__ import annotations

import pytest
import torch

from recsys_moe.config.schema import ModelConfig
from recsys_moe.data.files import locate_split, scan_split
from recsys_moe.data.ordered import OrderedReader
from recsys_moe.models.ranker import MultiTaskRanker
from recsys_moe.models.training import RankerTrain


@pytest.fixture
def batch(tiny_data_config):
    fs, files = locate_split(tiny_data_config.path, "train", "data.train")
    units = scan_split(fs, files, tiny_data_config).units
    return next(iter(OrderedReader(tiny_data_config, fs, units, 64))).batch


def test_forward_backward_shapes_and_gradients(tiny_data_config, batch):
    torch.manual_seed(0)
    ranker = MultiTaskRanker(tiny_data_config, ModelConfig(num_experts=4, expert_dim=8, tower=[8]))
    model = RankerTrain(ranker, {})
    loss, out = model(batch)
    B, T, N = batch.batch_size, len(tiny_data_config.tasks), 4
    assert loss.shape == ()
    assert out.raw.shape == (B, T)
    assert out.task_losses.shape == (T,)
    assert len(out.gates) == T and out.gates[0].weights.shape == (B, N)
    # the ranker alone needs no labels and gives the same outputs
    torch.testing.assert_close(ranker(batch.dense, batch.sparse).raw, out.raw)
    loss.backward()
    missing = [
        n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()
    ]
    assert not missing, missing
    # Every table row looked up by the batch received gradient; others did not.
    table = ranker.sparse_arch.embedding_bags["device"].weight
    used = torch.unique(batch.sparse["device"].values())
    row_has_grad = table.grad.abs().sum(1) > 0
    assert row_has_grad[used].all() and row_has_grad.sum() == len(used)


def test_loss_is_weighted_sum_of_task_losses(tiny_data_config, batch):
    torch.manual_seed(0)
    weights = {"click": 0.5, "rating": 2.0}
    model = RankerTrain(MultiTaskRanker(tiny_data_config, ModelConfig()), weights)
    loss, out = model(batch)
    w = torch.tensor([weights.get(t.name, 1.0) for t in tiny_data_config.tasks])
    assert loss.item() == pytest.approx(
        (w * out.task_losses).sum().item() + out.aux_loss.item(), rel=1e-6
    )


def test_rating_loss_ignores_unobserved_rows(tiny_data_config, batch):
    torch.manual_seed(0)
    model = RankerTrain(MultiTaskRanker(tiny_data_config, ModelConfig()), {})
    _, out = model(batch)
    t = [task.name for task in tiny_data_config.tasks].index("rating")
    garbage = batch.labels.clone()
    garbage[~batch.masks[:, t], t] = 1e6
    batch.labels = garbage
    _, out2 = model(batch)
    assert out2.task_losses[t].item() == pytest.approx(out.task_losses[t].item(), rel=1e-6)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"loss_weights": {"clik": 1.0}}, "model.loss_weights.clik"),
        ({"num_experts": 0}, "model.num_experts (0)"),
        ({"dropout": 1.5}, "model.dropout (1.5)"),
        ({"embedding_dim": 0}, "model.embedding_dim (0)"),
    ],
)
def test_bad_model_config_names_the_key(tiny_data_config, overrides, message):
    with pytest.raises(ValueError) as e:
        cfg = ModelConfig(**overrides)
        RankerTrain(MultiTaskRanker(tiny_data_config, cfg), cfg.loss_weights)
    assert message in str(e.value)
