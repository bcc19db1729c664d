"""The gate interface: routing only (no expert compute, no communication).

Legend: B = examples, D = gate input width, N = experts.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn


@dataclass
class GateOutput:
    """What one task's gate returns.

    weights:  [B, N] nonnegative expert weights; exactly 0.0 where an expert is not selected.
    aux_loss: scalar regulariser to add to the training loss (already scaled; 0 when none).
    stats:    detached telemetry tensors (scalars or [N]), keyed by short names. Computed on
              first access from what the gate kept (`stats_fn`), so a step that logs nothing
              pays nothing for them.
    """

    weights: torch.Tensor
    aux_loss: torch.Tensor
    stats_fn: Optional[Callable[[], dict[str, torch.Tensor]]] = None

    @property
    def stats(self) -> dict[str, torch.Tensor]:
        return {} if self.stats_fn is None else self.stats_fn()

    def detach(self) -> GateOutput:
        return GateOutput(self.weights.detach(), self.aux_loss.detach(), self.stats_fn)


class Gate(nn.Module, abc.ABC):
    """One task's router over a shared pool of `num_experts` experts.

    forward(x [B, D]) -> GateOutput. Static gates ignore x except for its batch size.
    `sparse` says whether the gate can give exact zeros (then sparse expert compute can pay).
    """

    sparse: bool = False

    def __init__(self, num_experts: int) -> None:
        super().__init__()
        self.num_experts = num_experts

    @abc.abstractmethod
    def forward(self, x_BD: torch.Tensor) -> GateOutput: ...

    def set_train_progress(self, step: int, total_steps: int) -> None:
        """Where the run is: training step `step` (0-based) of `total_steps`. Gates with a
        schedule (DSelect-k's entropy regulariser) follow it; the others ignore it."""


def check_k(num_experts: int, k: int) -> None:
    """The checks every k-sparse gate shares, naming the config keys."""
    if num_experts < 1:
        raise ValueError(f"model.num_experts ({num_experts}) must be >= 1")
    if k < 1:
        raise ValueError(f"model.gate.k ({k}) must be >= 1")
    if k > num_experts:
        raise ValueError(f"model.gate.k ({k}) must be <= model.num_experts ({num_experts})")
