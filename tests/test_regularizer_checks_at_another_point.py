"""Regularizers of one's own: the numbers reported for a value() of its own, the checks before
training at a second point and below gradcheck's absolute tolerance, two of one name (a
probe's findings, 2026-12-08)."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import read_scalars, train
from test_review_regularizers_schedulers_report import _Weights

from trainer.loop import Callback
from trainer.regularizers import Regularizer, _l2_grad, l2


class WarmUp(Regularizer):
    """l2 whose value() ramps λ in without storing it (a warm-up factor kept as state of its
    own, checkpointed): λ·ramp·R is what the step backpropagates and what reg/q logs."""

    KINDS = {**Regularizer.KINDS, "q": l2}
    GRADS = {**Regularizer.GRADS, "q": _l2_grad}
    ramp = 0.25

    def value(self):
        if not self.params:
            return self._zero
        return self.fn(*self.params, coef=self.coef * self.ramp)

    def state_dict(self):
        return {"ramp": self.ramp}

    def load_state_dict(self, state):
        self.ramp = state["ramp"]


class _Grads(Callback):
    def __init__(self) -> None:
        self.grads: dict[str, torch.Tensor] = {}

    def on_before_optimizer_step(self, trainer, optimizer) -> None:
        if not self.grads:
            self.grads = {n: p.grad.detach().clone() for n, p in trainer.model.named_parameters()}


def test_grad_norm_reg_is_of_the_regularizer_the_step_took(tmp_path, caplog) -> None:
    """reg/q logs value(), λ·ramp·R, and the step's gradient holds λ·ramp·W; grad_norm/reg
    is computed from coef × GRADS alone, λ·W: 4x the regularizer's gradient in the step, and
    grad_norm/data, the total less it, is off alike: numbers presented as complete (or they
    should be NaN, as where value() changes λ itself): NaN now, warned."""
    cb, grads = _Weights(False), _Grads()
    caplog.set_level("WARNING", logger="trainer")
    train(tmp_path, "trainer.max_steps=1", "logging.every_n_steps=1", "optimizer=sgd",
          "model.hidden=[8]", "instrument=none", f"+regularizer.q._target_={__name__}.WarmUp",
          "+regularizer.q.coef=0.5", callbacks=[cb, grads])  # fmt: skip
    scalars = read_scalars(tmp_path)
    weights = [w.double() for w in cb.w.values() if w.ndim >= 2]
    lam = 0.5 * WarmUp.ramp  # the λ the step took
    # reg/q is the value the step backpropagated (float32 sum of squares: within 1e-5)
    r = 0.5 * lam * sum(float((w**2).sum()) for w in weights)
    assert math.isclose(scalars["reg/q"][0][1], r, rel_tol=1e-5), (scalars["reg/q"], r)
    true_reg = lam * math.sqrt(sum(float((w**2).sum()) for w in weights))
    assert true_reg > 0
    assert math.isnan(scalars["grad_norm/reg"][0][1]), scalars["grad_norm/reg"]
    assert math.isnan(scalars["grad_norm/data"][0][1]), scalars["grad_norm/data"]
    assert "where regularizer q's value() (" in caplog.text
    assert "is not its function at its λ (" in caplog.text


class _Plain(WarmUp):
    ramp = 1.0


def test_a_value_of_its_own_that_is_its_function_keeps_grad_norm_reg(tmp_path) -> None:
    """The same subclass with no ramp (value() the function at λ, computed its own way):
    grad_norm/reg is λ‖W‖, no NaN."""
    cb = _Weights(False)
    train(tmp_path, "trainer.max_steps=1", "logging.every_n_steps=1", "optimizer=sgd",
          "model.hidden=[8]", "instrument=none", f"+regularizer.q._target_={__name__}._Plain",
          "+regularizer.q.coef=0.5", callbacks=[cb])  # fmt: skip
    weights = [w.double() for w in cb.w.values() if w.ndim >= 2]
    true_reg = 0.5 * math.sqrt(sum(float((w**2).sum()) for w in weights))
    # float32 norms of float32 gradients: within 1e-5 relative
    logged = read_scalars(tmp_path)["grad_norm/reg"][0][1]
    assert math.isclose(logged, true_reg, rel_tol=1e-5), (logged, true_reg)


class _HalfSquares(torch.autograd.Function):
    """λ ½Σp², whose backward (a slip) gives 1-D tensors twice their gradient."""

    @staticmethod
    def forward(ctx, coef, *params):
        ctx.coef = coef
        ctx.save_for_backward(*params)
        return coef * torch.stack([(p**2).sum() / 2 for p in params]).sum()

    @staticmethod
    def backward(ctx, grad):
        return (None, *[grad * ctx.coef * (2 if p.ndim == 1 else 1) * p
                        for p in ctx.saved_tensors])  # fmt: skip


def _twice_on_vectors(p):
    return (2 if p.ndim == 1 else 1) * p  # (GRADS alike wrong)


class HalfSquares(Regularizer):
    KINDS = {**Regularizer.KINDS, "sq": lambda *ps, coef=1.0: _HalfSquares.apply(coef, *ps)}
    GRADS = {**Regularizer.GRADS, "sq": _twice_on_vectors}


class _LayerScale(torch.nn.Module):
    """CaiT's per-channel residual scale, initialized at 1e-6 (its deep models' value)."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.gamma = torch.nn.Parameter(torch.full((d,), 1e-6))

    def forward(self, x):
        return x * self.gamma


def test_the_element_check_sees_a_factor_on_a_tensor_of_small_gradients() -> None:
    """README: "the element check below 4,096 elements sees each" error a random direction
    cannot (a tensor whose gradient is a millionth of the others'). But it runs only where
    torch's gradcheck fails, and gradcheck's absolute tolerance, 1e-5, passes any error below
    it: a backward 2x on a LayerScale's γ = 1e-6 (272 elements in all) trained unchecked,
    although the element check itself names it (2e-06 for a difference of 1e-06)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 16, bias=False), _LayerScale(16))
    reg = HalfSquares("sq", 0.01, min_ndim=1).bind(model)
    assert sum(p.numel() for p in reg.params) <= 4096
    with pytest.raises(ValueError) as e:
        reg.check_gradient()
    assert str(e.value).startswith(
        "regularizer sq (HalfSquares): its Function's backward passes torch.autograd.gradcheck "
        "only by its absolute tolerance (1e-5), and on 1.gamma["
    ), str(e.value)


class _QuarticNoLambda(torch.autograd.Function):
    """Σp⁴/4 whose forward leaves λ out (a slip the README says is refused); backward right."""

    @staticmethod
    def forward(ctx, coef, *params):
        ctx.coef = coef
        ctx.save_for_backward(*params)
        return torch.stack([(p**4).sum() / 4 for p in params]).sum()  # (no coef *)

    @staticmethod
    def backward(ctx, grad):
        return (None, *[grad * ctx.coef * p**3 for p in ctx.saved_tensors])


def _cube(p):
    return p**3


class QuarticNoLambda(Regularizer):
    KINDS = {**Regularizer.KINDS, "q": lambda *ps, coef=1.0: _QuarticNoLambda.apply(coef, *ps)}
    GRADS = {**Regularizer.GRADS, "q": _cube}


def test_a_forward_leaving_lambda_out_is_refused_on_zero_initialized_weights() -> None:
    """README: "the forward's value at the run's λ and at 0.3 must be λ times its value at 1
    (reg/<name> logs it: a forward that left λ out logged R ...)". The check compares values
    at the run's parameters only: on a zero-initialized layer (a zero-init head, LoRA's B)
    R = 0 at every λ, so the forward leaving λ out passed, and once the step moved the
    weights reg/q logged R for λR (100x at λ = 0.01). Scaling with λ does not depend on the
    point: a check at any other parameters (random copies) tells."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    torch.nn.init.zeros_(model[2].weight)
    reg = QuarticNoLambda("q", 0.01, include=["2.*"]).bind(model)
    with pytest.raises(ValueError) as e:
        reg.check_gradient()
    assert str(e.value).startswith("regularizer q (QuarticNoLambda): its value at λ = 0.01 is "), (
        str(e.value)
    )
    assert "not λ times its value at λ = 1" in str(e.value)


def test_two_regularizers_of_one_name_given_by_hand_are_both_reported() -> None:
    """A Trainer built by hand takes any list of Regularizers: two l2s with their own λ per
    layer group (what a config, one entry per name, cannot say). Both train, but reg_scalars
    keys them by name, reg/l2: the second's value replaced the first's, and the logged λR
    (0.0466) is not the step's (0.0478), unsaid (checkpoints key their state alike,
    ``regularizer.l2``). Refused now, naming the name."""
    from trainer.data.base import InMemoryLoader, TensorSplit
    from trainer.loop import Trainer
    from trainer.losses import CrossEntropy

    class _Reg(Callback):
        def on_fit_start(self, trainer) -> None:
            self.w = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}

        def on_before_optimizer_step(self, trainer, optimizer) -> None:
            self.logged = {k: float(v) for k, v in trainer.objective.reg_scalars().items()}

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    g = torch.Generator().manual_seed(0)
    split = TensorSplit(torch.randn(16, 4, generator=g), torch.randint(3, (16,), generator=g))
    regs = [Regularizer("l2", 1e-3, include=["0.*"]), Regularizer("l2", 1e-1, include=["2.*"])]
    cb, cpu = _Reg(), torch.device("cpu")
    from trainer.config import ConfigError

    with pytest.raises(ConfigError) as e:
        Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1),
                InMemoryLoader(split, 16, cpu, shuffle=False),
                InMemoryLoader(split, 16, cpu, shuffle=False), criterion=CrossEntropy(),
                device=cpu, max_steps=1, regularizers=regs, callbacks=[cb])  # fmt: skip
    assert str(e.value) == (
        "regularizers: the name(s) ['l2'] are given to more than one regularizer; each logs "
        "reg/<name> and keeps its state under it: give each its own name"
    )


class HalfSquaresRightGrads(Regularizer):
    """The same slip in the backward (2× on 1-D tensors), GRADS right."""

    KINDS = {**Regularizer.KINDS, "sq": lambda *ps, coef=1.0: _HalfSquares.apply(coef, *ps)}
    GRADS = {**Regularizer.GRADS, "sq": lambda p: p}


def test_a_backward_off_on_zero_biases_is_refused() -> None:
    """Zero biases (min_ndim=1): at the run's parameters the backward's 2×p and GRADS' p are
    both 0, so the backward passed every check there and trained biases on twice their
    gradient once they moved (a probe's); at a random point they disagree."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    for m in (model[0], model[2]):
        torch.nn.init.zeros_(m.bias)
    reg = HalfSquaresRightGrads("sq", 0.01, include=["*.bias"], min_ndim=1).bind(model)
    with pytest.raises(ValueError) as e:
        reg.check_gradient()
    assert str(e.value).startswith(
        "regularizer sq (HalfSquaresRightGrads): its backward and GRADS['sq'] disagree on "
        "0.bias at λ = 1"
    ), str(e.value)
