"""Multi-layer perceptron over flattened inputs."""

from __future__ import annotations

import math
from collections.abc import Sequence

from torch import Tensor, nn


class MLP(nn.Module):
    """``Flatten -> [Linear -> ReLU -> (Dropout)] * len(hidden) -> Linear``.

    Args:
        in_shape: shape of one input (from the data), e.g. (1, 8, 8).
        out_dim: number of outputs (from the data: the class count, or the size of a target).
        hidden: widths of the hidden layers.
        dropout: dropout probability after each hidden layer (0: none).
    """

    def __init__(
        self,
        in_shape: Sequence[int],
        out_dim: int,
        hidden: Sequence[int] = (256, 128),
        dropout: float = 0.0,
    ):
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        width = math.prod(in_shape)
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            width = h
        layers.append(nn.Linear(width, out_dim))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:  # (B, *in_shape) -> (B, out_dim)
        return self.net(x)
