"""A review's findings (2026-12-07) on that day's fixes: regularizers of one's own (a float32
backward, λ changed in place or inside value(), a selection its user bound), scheduler checks
(a factory's ChainedScheduler and OneCycleLR); its report finding is in test_report_edges.py."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import make_cfg, read_scalars, train
from torch import nn
from torch.autograd import Function

from trainer.config import ConfigError
from trainer.data.base import InMemoryLoader, TensorSplit
from trainer.loop import Callback, Trainer
from trainer.losses import CrossEntropy
from trainer.models.mlp import MLP
from trainer.regularizers import Regularizer, _l2_grad, l2
from trainer.run import _check_own_schedule_length, build_scheduler

CPU = torch.device("cpu")


# ---------------------------------------------------------------- schedulers (e41afac)
def chained_factory(optimizer, T_max):
    """A factory of one's own returning a ChainedScheduler (no ``schedulers`` key in the file)."""
    return torch.optim.lr_scheduler.ChainedScheduler([
        torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=T_max),
        torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=0.99),
    ])  # fmt: skip


def test_a_chained_scheduler_from_a_factory_still_trains(tmp_path) -> None:
    """_check_own_schedule_length reads ``cfg.schedulers[i]`` for every part of any
    ChainedScheduler: one a factory returns (its file has no ``schedulers``) stopped the run
    before training with OmegaConf's "Key 'schedulers' is not in struct" (it trained before
    e41afac), though none of its parts is a OneCycleLR."""
    m = train(tmp_path, "data=synthetic", "data.num_train=64", "data.num_val=16",
              "data.batch_size=32", "data.shape=[8]", "data.num_classes=3", "model.hidden=[8]",
              "optimizer=sgd", "trainer.max_steps=3", "instrument=none", "~scheduler",
              f"+scheduler._target_={__name__}.chained_factory",
              "+scheduler._partial_=true")  # fmt: skip
    assert m["status"] == "completed" and m["step"] == 3


def one_cycle_factory(optimizer):
    """A factory of one's own returning a OneCycleLR of its own length (3 steps)."""
    return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.1, total_steps=3)


def test_a_short_one_cycle_from_a_factory_is_refused_naming_a_key_the_file_has() -> None:
    """The refusal names `scheduler.total_steps` where the file sets it, else
    `scheduler.epochs × scheduler.steps_per_epoch`: a factory's OneCycleLR (its length its
    own code's) was refused naming two keys its file does not have, not the factory."""
    cfg = make_cfg("~scheduler", f"+scheduler._target_={__name__}.one_cycle_factory",
                   "+scheduler._partial_=true")  # fmt: skip
    opt = torch.optim.SGD([nn.Parameter(torch.ones(2))], lr=0.1)
    scheduler = build_scheduler(cfg.scheduler, opt, total_steps=8)
    with pytest.raises(ConfigError) as e:
        _check_own_schedule_length(cfg.scheduler, scheduler, 8)
    keys = ("epochs", "steps_per_epoch", "total_steps")
    named = [k for k in keys if f"scheduler.{k}" in str(e.value)]
    assert all(k in cfg.scheduler for k in named), str(e.value)


# ------------------------------------------------------ regularizers of one's own (a1df19d)
class _Quartic32(Function):
    """λ Σ p⁴/4, its backward computed in float32 as the built-ins are written (the scale
    grad·λ first, then one product per tensor): correct up to float32's rounding."""

    @staticmethod
    def forward(ctx, coef, *params):
        ctx.coef = coef
        ctx.save_for_backward(*params)
        return coef * torch.stack([(p.double() ** 4).sum() / 4 for p in params]).sum()

    @staticmethod
    def backward(ctx, grad):
        scale = grad.float() * ctx.coef
        return (None, *((p.float() ** 3 * scale).to(p.dtype) for p in ctx.saved_tensors))


class Quartic32(Regularizer):
    KINDS = {**Regularizer.KINDS, "q": lambda *ps, coef=1.0: _Quartic32.apply(coef, *ps)}
    GRADS = {**Regularizer.GRADS, "q": lambda p: (p.float() ** 3).to(p.dtype)}


def test_a_backward_in_float32_that_scales_with_its_gradient_is_not_refused() -> None:
    """The new check compares the backward at an incoming gradient of 3 with 3× its value at
    1 within rtol 1e-7, below float32's rounding (2⁻²³): a backward computed in float32,
    multiplied by its grad_output and agreeing with GRADS (the check before it passes), is
    refused as one that "does not scale with the gradient it is given", its message showing
    0.00497809 for 3 × 0.00165936. (It trained before a1df19d; 17 of 25 random λ refused.)"""
    torch.manual_seed(0)
    model = MLP((64,), 10, hidden=[128])
    Quartic32("q", 0.85).bind(model).check_gradient()


class AnnealAfter(Regularizer):
    """l2 whose value() anneals λ for the next step after taking this step's λR."""

    KINDS = {**Regularizer.KINDS, "q": l2}
    GRADS = {**Regularizer.GRADS, "q": _l2_grad}

    def value(self):
        v = super().value()
        self.coef = self.coef * 0.5
        return v


class TensorCoef(Regularizer):
    """l2 whose λ is a 0-d tensor (an annealed coefficient kept as checkpointed state)."""

    KINDS = {**Regularizer.KINDS, "q": l2}
    GRADS = {**Regularizer.GRADS, "q": _l2_grad}

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.coef = torch.tensor(float(self.coef), dtype=torch.float64)

    def state_dict(self):
        return {"coef": self.coef}

    def load_state_dict(self, state):
        self.coef = state["coef"]


class _Weights(Callback):
    """The initial weights; with ``double``, λ doubled (``r.coef *= 2``) after the backward."""

    def __init__(self, double: bool = False) -> None:
        self.w: dict[str, torch.Tensor] = {}
        self.double = double

    def on_fit_start(self, trainer) -> None:
        self.w = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}

    def on_before_optimizer_step(self, trainer, optimizer) -> None:
        if self.double and trainer.global_step == 1:
            trainer.objective.regularizers[0].coef *= 2  # (in place for a tensor λ)


@pytest.mark.parametrize("cls, double", [("AnnealAfter", False), ("TensorCoef", True)])
def test_grad_norm_reg_is_of_the_lambda_the_backward_took(tmp_path, caplog, cls, double):
    """Objective recorded λ after value() and restored it only where ``r.coef`` was another
    object: a value() that anneals λ after taking λR (AnnealAfter) logged grad_norm/reg at the
    next step's λ (0.6445 for a true 1.289), and a tensor λ a callback anneals in place
    (``r.coef *= 2``) at the new λ (2.578 for 1.289: the README's own example, said fixed),
    while reg/q and the step hold λ = 0.5. The tensor λ's is exact now; a value() changing
    its λ leaves which λ it took unknown: NaN, warned, not a number presented as complete."""
    import logging

    cb = _Weights(double)
    with caplog.at_level(logging.WARNING, logger="trainer.objective"):
        train(tmp_path, "trainer.max_steps=1", "logging.every_n_steps=1", "optimizer=sgd",
              "model.hidden=[8]", "instrument=none", f"+regularizer.q._target_={__name__}.{cls}",
              "+regularizer.q.coef=0.5", callbacks=[cb])  # fmt: skip
    scalars = read_scalars(tmp_path)
    logged = scalars["grad_norm/reg"][0][1]
    if cls == "AnnealAfter":
        assert math.isnan(logged) and math.isnan(scalars["grad_norm/data"][0][1])
        assert "steps where regularizer q's value() changes its λ (0.5 to 0.25)" in caplog.text
        return
    norm = math.sqrt(sum(float((w.double() ** 2).sum()) for w in cb.w.values() if w.ndim >= 2))
    # float32 norms of float32 gradients: within 1e-5 relative (a few hundred elements)
    assert logged == pytest.approx(0.5 * norm, rel=1e-5), (logged, 0.5 * norm)


def test_a_hand_built_trainer_keeps_the_selection_of_a_regularizer_bound_by_its_user() -> None:
    """The README: a Trainer built by hand "binds a regularizer given to it unbound". It binds
    every one again, to the whole model: an L2 its user bound to the head alone
    (``.bind(model[2])``) regularized every layer's weight, unsaid."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    reg = Regularizer("l2", 0.5).bind(model[2])
    assert reg.params == [model[2].weight]
    g = torch.Generator().manual_seed(0)
    split = TensorSplit(torch.randn(16, 4, generator=g), torch.randint(3, (16,), generator=g))
    Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1),
            InMemoryLoader(split, 16, CPU, shuffle=False),
            InMemoryLoader(split, 16, CPU, shuffle=False), criterion=CrossEntropy(),
            device=CPU, max_steps=1, regularizers=[reg])  # fmt: skip
    assert [id(p) for p in reg.params] == [id(model[2].weight)], reg.names
    other = nn.Linear(8, 3)  # (bound to another model's parameters: refused, naming them)
    with pytest.raises(ValueError, match=r"regularizer l2 \(Regularizer\) is bound to "
                       r"parameters that are not the Trainer's model's \(weight\)"):  # fmt: skip
        Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1),
                InMemoryLoader(split, 16, CPU, shuffle=False),
                InMemoryLoader(split, 16, CPU, shuffle=False), criterion=CrossEntropy(),
                device=CPU, max_steps=1,
                regularizers=[Regularizer("l2", 0.5).bind(other)])  # fmt: skip
