"""The gate interface: routing only (no expert compute, no communication).

Legend: B = examples, D = gate input width, N = experts.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class GateOutput:
    """What one task's gate returns.

    weights:  [B, N] nonnegative expert weights; exactly 0.0 where an expert is not selected.
    aux_loss: scalar regulariser to add to the training loss (already scaled; 0 when none).
    stats:    detached telemetry tensors (scalars or [N]), keyed by short names.
    """

    weights: torch.Tensor
    aux_loss: torch.Tensor
    stats: dict[str, torch.Tensor] = field(default_factory=dict)


class Gate(nn.Module, abc.ABC):
    """One task's router over a shared pool of `num_experts` experts.

    forward(x [B, D]) -> GateOutput. Static gates ignore x except for its batch size.
    """

    def __init__(self, num_experts: int) -> None:
        super().__init__()
        self.num_experts = num_experts

    @abc.abstractmethod
    def forward(self, x_BD: torch.Tensor) -> GateOutput: ...
