"""torchvision's ResNet-18, adapted to the data's channels, image size and classes."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn


def resnet18(in_shape: Sequence[int], out_dim: int, small_input: str | bool = "auto") -> nn.Module:
    """ResNet-18 (randomly initialized; no weights are downloaded).

    Args:
        in_shape: (C, H, W) of one input (from the data).
        out_dim: number of outputs (from the data: the class count, or the size of a target).
        small_input: ``auto`` uses a 3x3 stride-1 stem without max-pool for images up to 64 px,
            as is usual for CIFAR-sized inputs (the 7x7 stride-2 stem and pool would shrink an
            8x8 or 32x32 image to almost nothing); ``true``/``false`` force one stem.
    """
    if len(in_shape) != 3:
        raise ValueError(
            "model=resnet18 needs image inputs of shape (C, H, W); "
            f"the data gives {tuple(in_shape)}"
        )
    from torchvision.models import resnet18 as tv_resnet18

    c, h, w = in_shape
    small = str(small_input).lower()
    small_stem = min(h, w) <= 64 if small == "auto" else small == "true"
    model = tv_resnet18(weights=None, num_classes=out_dim)
    if small_stem:
        model.conv1 = nn.Conv2d(c, 64, kernel_size=3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
    elif c != 3:
        model.conv1 = nn.Conv2d(c, 64, kernel_size=7, stride=2, padding=3, bias=False)
    return model
