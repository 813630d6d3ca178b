"""A small convolutional network for image inputs (C, H, W)."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn


class CNN(nn.Module):
    """Per width in ``channels``: ``Conv3x3 -> (BatchNorm) -> ReLU -> MaxPool2`` (the pool is
    skipped once the feature map is 1 pixel wide), then ``Linear(hidden) -> ReLU -> Linear``.

    Args:
        in_shape: (C, H, W) of one input (from the data).
        out_dim: number of outputs (from the data: the class count, or the size of a target).
        channels: output channels of each conv block.
        hidden: width of the hidden layer of the head.
        batch_norm: BatchNorm2d after each conv.
        dropout: dropout before the last layer (0: none).
    """

    def __init__(
        self,
        in_shape: Sequence[int],
        out_dim: int,
        channels: Sequence[int] = (32, 64),
        hidden: int = 128,
        batch_norm: bool = False,
        dropout: float = 0.0,
    ):
        super().__init__()
        if len(in_shape) != 3:
            raise ValueError(
                f"model=cnn needs image inputs of shape (C, H, W); the data gives {tuple(in_shape)}"
            )
        c, h, w = in_shape
        blocks: list[nn.Module] = []
        for out in channels:
            blocks.append(nn.Conv2d(c, out, 3, padding=1, bias=not batch_norm))
            if batch_norm:
                blocks.append(nn.BatchNorm2d(out))
            blocks.append(nn.ReLU())
            if min(h, w) >= 2:
                blocks.append(nn.MaxPool2d(2))
                h, w = h // 2, w // 2
            c = out
        head: list[nn.Module] = [nn.Flatten(), nn.Linear(c * h * w, hidden), nn.ReLU()]
        if dropout > 0:
            head.append(nn.Dropout(dropout))
        head.append(nn.Linear(hidden, out_dim))
        self.features = nn.Sequential(*blocks)
        self.head = nn.Sequential(*head)

    def forward(self, x: Tensor) -> Tensor:  # (B, C, H, W) -> (B, out_dim)
        return self.head(self.features(x))
