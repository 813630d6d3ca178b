"""Regularizers of one's own (custom autograd Functions) and their place in a step (a probe's
findings, 2026-12-07): a backward that ignores its incoming gradient, λ changed after the
backward, a Trainer built by hand given a regularizer unbound or unchecked."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import read_scalars, train
from torch import nn
from torch.autograd import Function

from trainer.config import ContractError
from trainer.data.base import InMemoryLoader, TensorSplit
from trainer.loop import Callback, Trainer
from trainer.losses import CrossEntropy
from trainer.models.mlp import MLP
from trainer.regularizers import Regularizer

CPU = torch.device("cpu")


class _Quartic(Function):
    """λ Σ p⁴/4, backward λ p³ · grad, times ``scale`` (2: a wrong backward)."""

    scale = 1.0

    @staticmethod
    def forward(ctx, coef, *params):
        ctx.coef = coef
        ctx.save_for_backward(*params)
        return coef * torch.stack([(p**4).sum() / 4 for p in params]).sum()

    @staticmethod
    def backward(ctx, grad):
        return (None, *[grad * ctx.coef * _Quartic.scale * p**3 for p in ctx.saved_tensors])


class _QuarticForgetsGrad(_Quartic):
    """λ Σ p⁴/4 whose backward returns λ p³ without multiplying by the incoming gradient
    (a common slip in a hand-written backward; right only where the upstream gradient is 1)."""

    @staticmethod
    def backward(ctx, grad):
        return (None, *[ctx.coef * p**3 for p in ctx.saved_tensors])  # (no `grad *`)


def _cube(p):
    return p**3


class ForgetsGrad(Regularizer):
    KINDS = {**Regularizer.KINDS, "q": lambda *ps, coef=1.0: _QuarticForgetsGrad.apply(coef, *ps)}
    GRADS = {**Regularizer.GRADS, "q": _cube}


class Quartic(Regularizer):
    KINDS = {**Regularizer.KINDS, "q": lambda *ps, coef=1.0: _Quartic.apply(coef, *ps)}
    GRADS = {**Regularizer.GRADS, "q": _cube}


@pytest.mark.parametrize("hidden", [[5], [128]], ids=["gradcheck", "directional"])
def test_a_backward_ignoring_its_incoming_gradient_is_refused(hidden) -> None:
    """torch's gradcheck names it ("backward not multiplied by grad_output"), but the trainer
    takes any gradcheck failure for a kink: its element check (and, above 4,096 elements, the
    only check, the directional one) differentiates R with an upstream gradient of 1, which
    such a backward matches. It trained with a warning blaming a kink (small model) or with
    no word at all (large model)."""
    torch.manual_seed(0)
    model = MLP((64,), 10, hidden=hidden)
    reg = ForgetsGrad("q", 5.0).bind(model)
    with pytest.raises(ValueError, match=r"regularizer q \(ForgetsGrad\)"):
        reg.check_gradient()


class _KeepFirstGrads(Callback):
    def __init__(self) -> None:
        self.init: dict[str, torch.Tensor] = {}
        self.grads: dict[str, torch.Tensor] = {}

    def on_fit_start(self, trainer) -> None:
        self.init = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}

    def on_before_optimizer_step(self, trainer, optimizer) -> None:
        if not self.grads:
            self.grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters()}


@pytest.mark.parametrize("regularizer", ["ForgetsGrad", "Quartic"])
def test_under_a_grad_scaler_the_step_holds_the_regularizers_gradient_it_reports(
    tmp_path, regularizer
) -> None:
    """trainer.precision=16: the GradScaler scales λR's upstream gradient by s; a backward
    that ignored it gave λ∇R unscaled, and unscale_ divided it by s (65536): the step trained
    without the regularizer while grad_norm/reg reported its full gradient and grad_norm/data
    the total less it. Such a backward is refused before training now; a correct one's
    unscaled step gradient minus the plain run's is λ∇R."""
    common = ["trainer.precision=16", "trainer.max_steps=1", "logging.every_n_steps=1",
              "model.hidden=[8]", "instrument=none", "optimizer=sgd"]  # fmt: skip
    plain, reg = _KeepFirstGrads(), _KeepFirstGrads()
    train(tmp_path / "plain", *common, callbacks=[plain])
    own = (f"+regularizer.q._target_={__name__}.{regularizer}", "+regularizer.q.coef=5.0")
    if regularizer == "ForgetsGrad":
        with pytest.raises(ValueError, match=r"regularizer q \(ForgetsGrad\): its Function's "
                           r"backward does not scale with the gradient it is given"):  # fmt: skip
            train(tmp_path / "reg", *common, *own, callbacks=[reg])
        return
    train(tmp_path / "reg", *common, *own, callbacks=[reg])
    for name, w in reg.init.items():
        expected = 5.0 * w**3 if w.ndim >= 2 else torch.zeros_like(w)
        # float32 gradients (the data part bit-identical in both runs, the unscale an exact
        # power of 2): the difference holds one float32 rounding of the sum, ≤ 2⁻²³ of it
        scale = float(reg.grads[name].abs().max())
        torch.testing.assert_close(reg.grads[name] - plain.grads[name], expected,
                                   rtol=0, atol=4 * 2**-23 * scale + 1e-30)  # fmt: skip


class _DoubleLambdaBeforeStep(Callback):
    """An annealing callback of one's own: λ changed after the step's backward took λR."""

    def __init__(self) -> None:
        self.weights: dict[str, torch.Tensor] = {}
        self.coef_at_backward = math.nan

    def on_before_optimizer_step(self, trainer, optimizer) -> None:
        if trainer.global_step == 1:
            r = trainer.objective.regularizers[0]
            self.weights = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
            self.coef_at_backward = r.coef
            r.coef = 2 * r.coef


def test_grad_norm_reg_is_of_the_lambda_the_backward_took_or_nan(tmp_path) -> None:
    """The step's gradient holds λ∇R at the λ its backward took; grad_norm/reg (and /data, the
    total less it) were computed with the λ a callback set after the backward: 2x the
    regularizer's gradient reported as complete. (The same change of weights is NaN and
    warned of; a change of λ is not.)"""
    cb = _DoubleLambdaBeforeStep()
    train(tmp_path, "regularizer=[l2]", "regularizer.l2.coef=0.5", "trainer.max_steps=1",
          "logging.every_n_steps=1", "optimizer=sgd", "model.hidden=[8]", "instrument=none",
          callbacks=[cb])  # fmt: skip
    logged = read_scalars(tmp_path)["grad_norm/reg"][0][1]
    weights = [w.double() for w in cb.weights.values() if w.ndim >= 2]
    true = cb.coef_at_backward * math.sqrt(sum(float((w**2).sum()) for w in weights))
    # float32 norms of float32 gradients: within 1e-5 relative (a few hundred elements)
    assert logged == pytest.approx(true, rel=1e-5), (logged, true)


def _hand_built(reg: Regularizer, model: nn.Module) -> Trainer:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, 4, generator=g), torch.randint(3, (16,), generator=g)
    split = TensorSplit(x, y)
    return Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1),
                   InMemoryLoader(split, 16, CPU, shuffle=False),
                   InMemoryLoader(split, 16, CPU, shuffle=False), criterion=CrossEntropy(),
                   device=CPU, max_steps=1, regularizers=[reg])  # fmt: skip


def test_a_hand_built_trainer_checks_a_regularizer_of_ones_own() -> None:
    """run() checks a regularizer of one's own before training (its backward against GRADS,
    gradcheck); a Trainer built by hand with the same regularizer trained a backward 2x its
    GRADS unchecked (grad_norm/data then reports the total less the other gradient)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3))
    _Quartic.scale = 2.0
    try:
        with pytest.raises((ValueError, ContractError), match=r"regularizer q \(Quartic\)"):
            _hand_built(Quartic("q", 0.5).bind(model), model).fit()
    finally:
        _Quartic.scale = 1.0


def test_a_hand_built_trainer_does_not_train_an_unbound_regularizer_as_absent() -> None:
    """A Regularizer given to a hand-built Trainer without bind() selected nothing: the run
    trained with no regularization and logged reg/<name> 0, unsaid. Bound by the Trainer, or
    refused naming bind()."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3))
    reg = Quartic("q", 0.5)  # (not bound)
    _hand_built(reg, model).fit()
    assert reg.names == ["0.weight"], "the regularizer selected nothing: trained without it"
