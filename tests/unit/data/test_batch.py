"""Batch.to: a copy on another device, the batch itself where it already is (as Tensor.to)."""

from __future__ import annotations

import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recsys_moe.data.batch import Batch


def _batch() -> Batch:
    sparse = KeyedJaggedTensor(
        keys=["a", "b"],
        values=torch.tensor([1, 2, 3, 4]),
        lengths=torch.tensor([1, 1, 2, 0], dtype=torch.int32),
        stride=2,
    )
    return Batch(
        dense=torch.randn(2, 3),
        sparse=sparse,
        labels=torch.zeros(2, 1),
        masks=torch.ones(2, 1, dtype=torch.bool),
        row_ids=torch.tensor([7, 8]),
    )


def test_to_its_own_device_is_the_batch_itself():
    b = _batch()
    assert b.to(torch.device("cpu")) is b
    assert b.to("cpu", non_blocking=True) is b


def test_to_another_device_moves_every_tensor():
    b = _batch()
    moved = b.to(torch.device("meta"))
    assert moved is not b
    tensors = [moved.dense, moved.labels, moved.masks, moved.row_ids]
    assert all(t.device.type == "meta" for t in tensors)
    assert moved.sparse.values().device.type == "meta"
    assert moved.sparse.lengths().device.type == "meta"
    assert moved.sparse.keys() == ["a", "b"] and moved.dense.shape == (2, 3)
    assert b.dense.device.type == "cpu"  # the original stays where it was
