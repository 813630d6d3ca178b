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


@pytest.mark.parametrize(
    ("shape", "small"),
    [((3, 32, 32), "auto"), ((1, 64, 96), "auto"), ((3, 96, 96), "auto"), ((3, 65, 65), "auto"),
     ((3, 96, 96), "true")],
)  # fmt: skip
def test_the_resnet_stem_keeps_or_quarters_the_resolution(shape, small) -> None:
    """The small stem (3×3, stride 1, no pool) leaves the first stage at the image's own
    resolution; the ImageNet stem (7×7 stride 2, then a stride-2 pool) at a quarter of it,
    rounded up."""
    m = resnet18(shape, 4, small_input=small).eval()
    seen = []
    m.layer1.register_forward_hook(lambda mod, args, out: seen.append(tuple(out.shape[2:])))
    m(torch.randn(1, *shape))
    h, w = shape[1:]
    small_stem = small == "true" or min(h, w) <= 64
    assert seen == [(h, w) if small_stem else (-(-h // 4), -(-w // 4))]


@pytest.mark.parametrize("dropout", [0.0, 0.5])
def test_the_cnns_dropout_is_drawn_in_training_mode_only(dropout) -> None:
    """``dropout > 0``: two training-mode forwards of the same input differ (fresh masks),
    evaluation-mode ones do not; ``dropout=0``: no randomness at all."""
    torch.manual_seed(0)
    m = CNN((1, 8, 8), 3, channels=(4,), hidden=64, dropout=dropout)
    x = torch.randn(4, 1, 8, 8)
    assert torch.equal(m(x), m(x)) == (dropout == 0)
    m.eval()
    assert torch.equal(m(x), m(x))


def char_lm():
    from trainer.models.char_lm import CharTransformer

    torch.manual_seed(0)
    return CharTransformer(11, (8,), d_model=16, n_heads=2, n_layers=2, dim_feedforward=32).eval()


def test_the_character_transformer_is_causal() -> None:
    """Position t's logits depend on tokens ≤ t only: changing the last token changes the last
    position's logits and no earlier one's (to float32 rounding of the same computation,
    atol 1e-6 on logits of order 1); changing the first changes every position's."""
    lm = char_lm()
    tokens = torch.randint(0, 11, (2, 8), generator=torch.Generator().manual_seed(1))
    base = lm(tokens)
    late = tokens.clone()
    late[:, -1] = (late[:, -1] + 1) % 11
    out = lm(late)
    torch.testing.assert_close(out[:, :-1], base[:, :-1], rtol=0, atol=1e-6)
    assert (out[:, -1] - base[:, -1]).abs().max() > 1e-3
    early = tokens.clone()
    early[:, 0] = (early[:, 0] + 1) % 11
    assert ((lm(early) - base).abs().amax(dim=(0, 2)) > 1e-3).all()


def test_the_character_transformer_sees_positions_and_normalizes_before_its_head() -> None:
    """A sequence of one repeated token: without its learned positions every position would
    attend to identical values and give the same logits (to rounding, 1e-6); with them they
    differ. The head reads the final LayerNorm's output: zero mean and unit variance over
    d_model at every position (γ = 1, β = 0 at initialization; the variance is v / (v + eps)
    with eps = 1e-5, within 1e-3 of 1)."""
    lm = char_lm()
    seen = []
    lm.head.register_forward_hook(lambda mod, args, out: seen.append(args[0]))
    logits = lm(torch.full((1, 8), 3))
    assert (logits[0, 1:] - logits[0, :1]).abs().amax(dim=1).min() > 1e-4
    (h,) = seen
    torch.testing.assert_close(h.mean(-1), torch.zeros(1, 8), rtol=0, atol=1e-5)
    torch.testing.assert_close(h.var(-1, unbiased=False), torch.ones(1, 8), rtol=0, atol=1e-3)
