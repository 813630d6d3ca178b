"""Models take their shapes from the data."""

from __future__ import annotations

import pytest
import torch

from trainer.models.cnn import CNN
from trainer.models.mlp import MLP
from trainer.models.resnet import resnet18


@pytest.mark.parametrize("shape", [(1, 8, 8), (1, 28, 28), (3, 32, 32), (64,)])
def test_mlp_any_input_shape(shape) -> None:
    m = MLP(shape, 7, hidden=[16])
    assert m(torch.randn(2, *shape)).shape == (2, 7)
    assert m.net[1].in_features == torch.Size(shape).numel()


@pytest.mark.parametrize("shape", [(1, 8, 8), (1, 28, 28), (3, 32, 32), (2, 3, 3)])
def test_cnn_image_shapes(shape) -> None:
    m = CNN(shape, 5, channels=[4, 8, 8], batch_norm=True)
    assert m(torch.randn(2, *shape)).shape == (2, 5)


def test_cnn_refuses_vector_inputs() -> None:
    with pytest.raises(ValueError, match=r"\(C, H, W\).*\(64,\)"):
        CNN((64,), 10)


@pytest.mark.parametrize(
    ("shape", "small", "stem_kernel", "pool"),
    [((1, 8, 8), "auto", 3, False), ((3, 32, 32), "auto", 3, False),
     ((3, 96, 96), "auto", 7, True), ((1, 96, 96), "false", 7, True),
     ((3, 96, 96), "true", 3, False), ((3, 64, 64), "auto", 3, False),
     ((3, 65, 65), "auto", 7, True), ((3, 64, 96), "auto", 3, False)],
)  # fmt: skip
def test_resnet18_adapts_its_stem(shape, small, stem_kernel, pool) -> None:
    m = resnet18(shape, 4, small_input=small)
    assert m.conv1.in_channels == shape[0] and m.conv1.kernel_size == (stem_kernel, stem_kernel)
    assert isinstance(m.maxpool, torch.nn.MaxPool2d) == pool
    assert m.fc.out_features == 4
    m.eval()
    assert m(torch.randn(1, *shape)).shape == (1, 4)


def test_the_models_are_built_as_documented() -> None:
    """What the shape checks above cannot see: the MLP's ReLUs, the CNN's 2×2 pools down to
    a map of one pixel and its bias-free convolutions before BatchNorm, the character
    Transformer's pre-norm layers."""
    from torch import nn

    from trainer.models.char_lm import CharTransformer

    mlp = MLP((5,), 3, hidden=(4, 4), dropout=0.5)
    assert [type(m) for m in mlp.net] == [nn.Flatten, nn.Linear, nn.ReLU, nn.Dropout,
                                          nn.Linear, nn.ReLU, nn.Dropout, nn.Linear]  # fmt: skip
    cnn = CNN((1, 8, 8), 3, channels=(4, 4, 4, 4))  # 8 → 4 → 2 → 1 px, then no pool
    assert sum(isinstance(m, nn.MaxPool2d) for m in cnn.features) == 3
    assert cnn.head[1].in_features == 4 * 1 * 1
    for batch_norm in (False, True):
        convs = [m for m in CNN((1, 8, 8), 3, batch_norm=batch_norm).features
                 if isinstance(m, nn.Conv2d)]  # fmt: skip
        assert all((c.bias is None) == batch_norm for c in convs)
    lm = CharTransformer(11, (8,), d_model=16, n_heads=2, n_layers=2, dim_feedforward=32)
    assert all(layer.norm_first for layer in lm.encoder.layers)
