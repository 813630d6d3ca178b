"""A review of 2026-12-07's changes: the in-place GRADS check, the value's λ-scaling at
CHECK_COEF, and the input penalty on a model writing in place."""

from __future__ import annotations

import pytest
import torch
from conftest import final_params, train

from trainer.models.mlp import MLP
from trainer.regularizers import Regularizer


class _Square(torch.autograd.Function):
    """λ Σ p², backward g · λ · 2p."""

    @staticmethod
    def forward(ctx, coef, *params):
        ctx.coef = coef
        ctx.save_for_backward(*params)
        return coef * sum((p * p).sum() for p in params)

    @staticmethod
    def backward(ctx, g):
        return (None, *[g * ctx.coef * 2 * p for p in ctx.saved_tensors])


def _grads_in_float32(p):
    """2p "computed in float32": p.float() is a copy of the checks' float64 copies, but the
    live float32 weight itself, which mul_ then doubles."""
    g = p.float()
    g.mul_(2)
    return g.to(p.dtype)


class Square(Regularizer):
    KINDS = {**Regularizer.KINDS, "sq": lambda *ps, coef: _Square.apply(coef, *ps)}
    GRADS = {**Regularizer.GRADS, "sq": lambda p: 2 * p}


class SquareGradsInFloat32InPlace(Square):
    GRADS = {**Regularizer.GRADS, "sq": _grads_in_float32}


class SquareGradsThroughData(Square):
    """2p written in place through ``.data``, which has a version counter of its own."""

    GRADS = {**Regularizer.GRADS, "sq": lambda p: p.data.mul_(2)}


def test_a_grads_writing_the_live_weights_in_place_is_refused_or_given_a_copy(tmp_path) -> None:
    """The check looked at the version counter of the float64 copies only: a GRADS writing
    through ``.data`` (a version counter of its own) passed, and one whose write lands on its
    input only where the input is float32 (``p.float()`` copies a float64 tensor, returns a
    float32 one itself) passes still; each logging step then doubled the live weights. The
    first is refused (the values compared too); the second, unseen, is given a copy of the
    weights, and trains as the out-of-place GRADS does, bit for bit."""
    steps = ["trainer.max_steps=3", "logging.every_n_steps=1", "optimizer=sgd",
             "+regularizer.sq.coef=0.01"]  # fmt: skip
    train(tmp_path / "good", *steps, f"+regularizer.sq._target_={__name__}.Square")
    with pytest.raises(
        ValueError,
        match=r"^regularizer sq \(SquareGradsThroughData\): "
        r"GRADS\['sq'\] writes its input in place \(on net.1.weight\)",
    ):
        train(tmp_path / "data", *steps,
              f"+regularizer.sq._target_={__name__}.SquareGradsThroughData")  # fmt: skip
    train(tmp_path / "f32", *steps,
          f"+regularizer.sq._target_={__name__}.SquareGradsInFloat32InPlace")  # fmt: skip
    a, b = final_params(tmp_path / "good"), final_params(tmp_path / "f32")
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"trained to other parameters: {different}"


class _LogCoshFloat32(torch.autograd.Function):
    """λ Σ log cosh(p) computed in float32 (λ applied there too), returned in the
    parameters' dtype; backward g · λ · tanh p."""

    @staticmethod
    def forward(ctx, coef, *params):
        ctx.coef = coef
        ctx.save_for_backward(*params)
        value = sum(torch.log(torch.cosh(p.float())).sum() for p in params)
        return (coef * value).to(params[0].dtype)

    @staticmethod
    def backward(ctx, g):
        return (None, *[g * ctx.coef * torch.tanh(p) for p in ctx.saved_tensors])


class LogCoshFloat32(Regularizer):
    KINDS = {**Regularizer.KINDS, "lc": lambda *ps, coef: _LogCoshFloat32.apply(coef, *ps)}
    GRADS = {**Regularizer.GRADS, "lc": torch.tanh}


@pytest.mark.parametrize("coef", [1.0, 0.0])
def test_a_value_computed_in_float32_is_not_refused_at_check_coef(coef, caplog) -> None:
    """A value computed in float32 is λR to float32's rounding (README: "within the value's
    own rounding: a float32 value ... was refused at 1e-9"); returned in the parameters'
    dtype (float64 on the checks' copies), the λ-scaling is compared at 1e-9, and at a run's
    λ of 1 or 0, which passed before 2026-12-07 (above 4,096 elements, with the directions'
    warning), it is now refused at λ = 0.3 with two values printed equal."""
    torch.manual_seed(0)
    r = LogCoshFloat32("lc", coef).bind(MLP((64,), 10, hidden=[128]))
    r.check_gradient()  # raises "its value at λ = 0.3 is 6.84624, not λ times ... (6.84624)"


class ClampsItsWeightInPlace(torch.nn.Module):
    """A max-norm constraint written in the forward without no_grad: an in-place write to a
    parameter; the input is left alone."""

    def __init__(self, in_shape, out_dim) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 8),
                                       torch.nn.Tanh(), torch.nn.Linear(8, out_dim))  # fmt: skip

    def forward(self, x):
        self.net[1].weight.clamp_(-1, 1)
        return self.net(x)


def test_an_in_place_write_to_a_parameter_is_not_blamed_on_the_input(tmp_path) -> None:
    """torch's "a leaf Variable that requires grad is being used in an in-place operation"
    is raised for a parameter as for the input; with the input penalty on, the first step
    said "the model writes its input in place" and told to write x = x / 16."""
    model = ["~model", f"+model._target_={__name__}.ClampsItsWeightInPlace",
             "trainer.max_steps=1"]  # fmt: skip
    said = r"^a leaf Variable that requires grad is being used in an in-place operation.$"
    with pytest.raises(RuntimeError, match=said):
        train(tmp_path / "plain", *model)
    with pytest.raises(RuntimeError, match=said):  # (torch's own words: the model's write)
        train(tmp_path / "penalty", *model, "regularizer=[input_grad_penalty]")
