"""The unit of training input.

Legend: B = examples in the batch, F = dense features, T = tasks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
from torchrec.streamable import Pipelineable


@dataclass
class Batch(Pipelineable):
    """One batch of examples.

    dense:   [B, F] float32, in the order of `data.dense`.
    sparse:  KeyedJaggedTensor keyed by sparse feature name (order of `data.sparse`); int64 ids.
    labels:  [B, T] float32, in the order of `data.tasks`; meaningless where masks is False.
    masks:   [B, T] bool or None (None: every label exists).
    weights: [B, T] float32 or None (None: every row weighs 1).
    row_ids: [B] int64 or None: the `data.row_id` column when configured (-1 on padding rows).

    Example:
        >>> b = Batch(dense=torch.zeros(2, 3), sparse=kjt, labels=torch.zeros(2, 1))
        >>> b = b.to(torch.device("cuda"), non_blocking=True)
    """

    dense: torch.Tensor
    sparse: KeyedJaggedTensor
    labels: torch.Tensor
    masks: Optional[torch.Tensor] = None
    weights: Optional[torch.Tensor] = None
    row_ids: Optional[torch.Tensor] = None

    @property
    def batch_size(self) -> int:
        return self.labels.shape[0]

    def to(self, device: torch.device, non_blocking: bool = False) -> Batch:
        """This batch on `device`: itself where it is already there (as Tensor.to), which on
        CPU saves building a new KeyedJaggedTensor every step (20 us)."""
        device = torch.device(device)
        if self.dense.device == device and self.sparse.device() == device:
            return self

        def move(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
            return None if t is None else t.to(device=device, non_blocking=non_blocking)

        return Batch(
            dense=self.dense.to(device=device, non_blocking=non_blocking),
            sparse=self.sparse.to(device=device, non_blocking=non_blocking),
            labels=self.labels.to(device=device, non_blocking=non_blocking),
            masks=move(self.masks),
            weights=move(self.weights),
            row_ids=move(self.row_ids),
        )

    def record_stream(self, stream: torch.Stream) -> None:
        self.dense.record_stream(stream)
        self.sparse.record_stream(stream)
        self.labels.record_stream(stream)
        for t in (self.masks, self.weights, self.row_ids):
            if t is not None:
                t.record_stream(stream)

    def pin_memory(self) -> Batch:
        return Batch(
            dense=self.dense.pin_memory(),
            sparse=self.sparse.pin_memory(),
            labels=self.labels.pin_memory(),
            masks=None if self.masks is None else self.masks.pin_memory(),
            weights=None if self.weights is None else self.weights.pin_memory(),
            row_ids=None if self.row_ids is None else self.row_ids.pin_memory(),
        )
