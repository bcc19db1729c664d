"""Multi-layer perceptron used for the bottom MLP and the task towers."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class MLP(nn.Sequential):
    """Linear -> ReLU (-> Dropout) per width in `widths`.

    Input [B, in_dim] -> output [B, widths[-1]] (or [B, in_dim] when widths is empty).

    Example:
        >>> MLP(8, [64, 32])(torch.randn(4, 8)).shape
        torch.Size([4, 32])
    """

    def __init__(self, in_dim: int, widths: Sequence[int], dropout: float = 0.0) -> None:
        layers: list[nn.Module] = []
        for w in widths:
            layers += [nn.Linear(in_dim, w), nn.ReLU()]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            in_dim = w
        super().__init__(*layers)
        self.out_dim = in_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102 - see class docstring
        return super().forward(x)
