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
     ((3, 96, 96), "true", 3, False)],
)  # fmt: skip
def test_resnet18_adapts_its_stem(shape, small, stem_kernel, pool) -> None:
    m = resnet18(shape, 4, small_input=small)
    assert m.conv1.in_channels == shape[0] and m.conv1.kernel_size == (stem_kernel, stem_kernel)
    assert isinstance(m.maxpool, torch.nn.MaxPool2d) == pool
    assert m.fc.out_features == 4
    m.eval()
    assert m(torch.randn(1, *shape)).shape == (1, 4)
