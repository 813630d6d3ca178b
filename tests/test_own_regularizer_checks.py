"""The checks of a regularizer of one's own, and the input-gradient penalty's, on what a
probe found (2026-12-07): the λ-scaling was compared only at λ = 1 and at the run's λ, so at
a run's λ of 0 (a warm-up's start) or 1 a Function leaving λ out of its backward or its
forward passed, and the run trained or logged R, not λR; a GRADS written in place; a model
writing its input in place under the penalty; the penalty's logging backward drawing random
numbers."""

from __future__ import annotations

import pytest
import torch
from conftest import train

from trainer.models.mlp import MLP
from trainer.regularizers import Regularizer


class _LogCosh(torch.autograd.Function):
    """λ Σ log cosh(p), backward g · λ · tanh p."""

    @staticmethod
    def forward(ctx, coef, *params):
        ctx.coef = coef
        ctx.save_for_backward(*params)
        return coef * sum(torch.log(torch.cosh(p)).sum() for p in params)

    @staticmethod
    def backward(ctx, g):
        return (None, *[g * ctx.coef * torch.tanh(p) for p in ctx.saved_tensors])


class _NoCoefBackward(_LogCosh):
    """λ Σ log cosh(p); its backward forgets λ (returns g · tanh p)."""

    @staticmethod
    def backward(ctx, g):
        return (None, *[g * torch.tanh(p) for p in ctx.saved_tensors])


class _NoCoefForward(_LogCosh):
    """Σ log cosh(p), λ left out of the forward; its backward right (g · λ · tanh p)."""

    @staticmethod
    def forward(ctx, coef, *params):
        ctx.coef = coef
        ctx.save_for_backward(*params)
        return sum(torch.log(torch.cosh(p)).sum() for p in params)


class NoCoefBackward(Regularizer):
    KINDS = {**Regularizer.KINDS, "lc": lambda *ps, coef: _NoCoefBackward.apply(coef, *ps)}
    GRADS = {**Regularizer.GRADS, "lc": torch.tanh}


class NoCoefForward(Regularizer):
    KINDS = {**Regularizer.KINDS, "lc": lambda *ps, coef: _NoCoefForward.apply(coef, *ps)}
    GRADS = {**Regularizer.GRADS, "lc": torch.tanh}


@pytest.mark.parametrize("coef", [0.0, 1.0, 0.01])
@pytest.mark.parametrize("cls", [NoCoefBackward, NoCoefForward])
def test_a_function_leaving_lambda_out_is_refused_whatever_the_runs_lambda(cls, coef) -> None:
    """At λ = 0.01 both were refused (disagree with GRADS / not λ times the value at 1); at
    λ = 0 or 1 both passed: the λ-scaling was compared at no λ other than 0 and 1."""
    torch.manual_seed(0)
    r = cls("lc", coef).bind(MLP((6,), 3, hidden=[5]))
    at = 0.3 if coef in (0.0, 1.0) else coef  # (the first λ other than 1 checked)
    said = (
        rf"its backward and GRADS\['lc'\] disagree on net.1.weight at λ = {at:g} "
        if cls is NoCoefBackward
        else rf"its value at λ = {coef if coef != 1.0 else at:g} is [0-9.]+, not λ times "
    )
    with pytest.raises(ValueError, match=rf"^regularizer lc \({cls.__name__}\): {said}"):
        r.check_gradient()


def test_a_warm_up_from_lambda_0_is_refused_before_training(tmp_path) -> None:
    """λ = 0 (a warm-up's first value): a backward that forgets λ passed the checks and added
    the whole ∇R = tanh(W) to every weight's gradient at step 1, unsaid (reg/lc and
    grad_norm/reg 0); refused through the config now, before anything is written."""
    with pytest.raises(ValueError, match=r"^regularizer lc \(NoCoefBackward\): its backward "
                       r"and GRADS\['lc'\] disagree on net.1.weight at λ = 0.3 "):  # fmt: skip
        train(tmp_path, "trainer.max_steps=1", f"+regularizer.lc._target_={__name__}."
              "NoCoefBackward", "+regularizer.lc.coef=0.0")  # fmt: skip
    assert not (tmp_path / "checkpoints").exists()


class ScalesItsInputInPlace(torch.nn.Module):
    """A model that scales its input in place (``x.div_(16)``, pixels to [0, 1]): it trains
    without the penalty."""

    def __init__(self, in_shape, out_dim) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 8),
                                       torch.nn.Tanh(), torch.nn.Linear(8, out_dim))  # fmt: skip

    def forward(self, x):
        x.div_(16.0)
        return self.net(x)


class ScalesItsInputOutOfPlace(ScalesItsInputInPlace):
    def forward(self, x):
        return self.net(x / 16.0)


def test_the_input_penalty_on_a_model_writing_its_input_in_place(tmp_path) -> None:
    """The same model trains without the penalty; with it, the run stopped at its first step
    with torch's "a leaf Variable that requires grad is being used in an in-place operation",
    naming neither input_grad_penalty (whose prepare() made the input that leaf) nor the way
    out. The model is given a copy of the leaf now, and trains with the penalty bit for bit
    as the same model written out of place (x / 16)."""
    from conftest import final_params

    steps = ["trainer.max_steps=3", "optimizer=sgd", "regularizer=[input_grad_penalty]"]
    for name in ("ScalesItsInputInPlace", "ScalesItsInputOutOfPlace"):
        train(tmp_path / name, "~model", f"+model._target_={__name__}.{name}", *steps)
    a = final_params(tmp_path / "ScalesItsInputInPlace")
    b = final_params(tmp_path / "ScalesItsInputOutOfPlace")
    assert all(torch.equal(a[k], b[k]) for k in a)
    train(
        tmp_path / "none",
        "~model",
        f"+model._target_={__name__}.ScalesItsInputOutOfPlace",
        *steps[:2],
    )  # (the penalty trained: not the run without it)
    assert not torch.equal(a["net.1.weight"], final_params(tmp_path / "none")["net.1.weight"])


class NoisyGradients(torch.nn.Module):
    """Annealed gradient noise (Neelakantan et al., 2015) by a tensor hook on a weight: the
    hook draws from torch's global generator each time that weight's gradient is computed."""

    def __init__(self, in_shape, out_dim) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 8),
                                       torch.nn.Tanh(), torch.nn.Linear(8, out_dim))  # fmt: skip
        self.calls = 0
        self.net[1].weight.register_hook(self._noise)

    def _noise(self, g):
        self.calls += 1
        return g + 0.01 / (1 + self.calls) ** 0.55 * torch.randn_like(g)

    def forward(self, x):
        return self.net(x)


def test_the_penaltys_logging_backward_draws_nothing_from_the_runs_generators(tmp_path) -> None:
    """ "Measuring never changes the run: ... [no instrument] draws from the run's random
    generators" (docs/instrumentation.md). The input-gradient penalty's extra backward on
    logging steps (for grad_norm/reg) runs the model's backward hooks again, and this one drew
    from torch's generator there (its counter is put back, the generator's state is not): the
    steps after a logging step drew other noise, and how often the run logged changed the
    parameters it trained to (logging every step vs every third, 6 steps)."""
    from conftest import final_params

    base = ["~model", f"+model._target_={__name__}.NoisyGradients", "trainer.max_steps=6",
            "optimizer=sgd", "regularizer=[input_grad_penalty]"]  # fmt: skip
    train(tmp_path / "every1", *base, "logging.every_n_steps=1")
    train(tmp_path / "every3", *base, "logging.every_n_steps=3")
    a, b = final_params(tmp_path / "every1"), final_params(tmp_path / "every3")
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"logging every step vs every third trained other {different}"


class LogCosh(Regularizer):
    KINDS = {**Regularizer.KINDS, "lc": lambda *ps, coef: _LogCosh.apply(coef, *ps)}
    GRADS = {**Regularizer.GRADS, "lc": torch.tanh}


class LogCoshGradsInPlace(LogCosh):
    """The same Function; its GRADS computes tanh in place (``p.tanh_()``): right values."""

    GRADS = {**Regularizer.GRADS, "lc": lambda p: p.tanh_()}


def test_a_grads_written_in_place_is_refused(tmp_path) -> None:
    """The checks call GRADS on float64 copies, where an in-place GRADS gives the right values
    and passes; the trainer then calls it (Regularizer.grad(), for grad_norm/reg and /data) on
    the live parameters on every logging step, and each logging step replaced the weights by
    tanh(W) before the update, unsaid: the run trained to other parameters than with the
    out-of-place GRADS (and how often it logged changed them)."""

    steps = ["trainer.max_steps=3", "logging.every_n_steps=1", "optimizer=sgd",
             "+regularizer.lc.coef=0.01"]  # fmt: skip
    train(tmp_path / "good", *steps, f"+regularizer.lc._target_={__name__}.LogCosh")
    with pytest.raises(ValueError, match=r"^regularizer lc \(LogCoshGradsInPlace\): "
                       r"GRADS\['lc'\] writes its input in place \(on net.1.weight\); the "
                       r"trainer calls it on the live parameters on logging steps: return a new "
                       r"tensor \(torch.tanh\(p\), not p.tanh_\(\)\)$"):  # fmt: skip
        train(tmp_path / "inplace", *steps,
              f"+regularizer.lc._target_={__name__}.LogCoshGradsInPlace")  # fmt: skip
    assert not (tmp_path / "inplace" / "checkpoints").exists()
