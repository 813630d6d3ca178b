"""Tests written to kill mutants of the code written on 2026-12-07 that the suite let survive (a
mutation round: replaced parameters, the flush cadence, λ kept by value, the scheduler and
report checks' boundaries)."""

from __future__ import annotations

import logging

import torch
from conftest import make_cfg
from torch import nn

from trainer.data.base import InMemoryLoader, TensorSplit
from trainer.loop import Callback, Trainer
from trainer.losses import CrossEntropy
from trainer.regularizers import Regularizer, _l2_grad, l2
from trainer.run import _warn_rising_cosine, build_scheduler

CPU = torch.device("cpu")


def _split() -> TensorSplit:
    g = torch.Generator().manual_seed(0)
    return TensorSplit(torch.randn(16, 4, generator=g), torch.randint(3, (16,), generator=g))


def test_a_user_bound_selection_is_kept_when_the_trainable_parameters_change() -> None:
    """An L2 its user bound to the head alone keeps that selection when a callback unfreezes
    a layer mid-run (the trainer selects again among the trainable parameters, from the
    module the regularizer was bound to, not the whole model: loop.py's follow)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    model[0].requires_grad_(False)
    reg = Regularizer("l2", 0.5).bind(model[2])

    class Unfreezes(Callback):
        def on_train_step_end(self, trainer, out) -> None:
            trainer.model[0].requires_grad_(True)

    split = _split()
    trainer = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1),
                      InMemoryLoader(split, 8, CPU, shuffle=False),
                      InMemoryLoader(split, 8, CPU, shuffle=False), criterion=CrossEntropy(),
                      device=CPU, max_steps=2, regularizers=[reg],
                      callbacks=[Unfreezes()])  # fmt: skip
    trainer.fit()
    assert trainer.global_step == 2
    assert model[0].weight.requires_grad
    assert [id(p) for p in reg.params] == [id(model[2].weight)], reg.names


def _cosine_warnings(caplog, eta_min: float, *lrs: float) -> list[str]:
    params = [nn.Parameter(torch.ones(2)) for _ in lrs]
    opt = torch.optim.SGD([{"params": [p], "lr": lr} for p, lr in zip(params, lrs, strict=True)])
    cfg = make_cfg("scheduler=cosine", f"scheduler.eta_min={eta_min}")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="trainer.run"):
        _warn_rising_cosine(build_scheduler(cfg.scheduler, opt, total_steps=8))
    return [r.getMessage() for r in caplog.records if "eta_min" in r.getMessage()]


def test_a_cosine_schedule_rising_in_a_later_parameter_group_is_warned_naming_it(caplog) -> None:
    """Each parameter group is checked: the second group's rate (1e-3) below eta_min (0.01)
    rises over the run while the first (0.1) decays; warned, naming group 1."""
    said = _cosine_warnings(caplog, 0.01, 0.1, 1e-3)
    assert len(said) == 1, said
    assert said[0].startswith("scheduler.eta_min (0.01) is above the learning rate "
                              "(0.001, parameter group 1)"), said  # fmt: skip


def test_a_cosine_schedule_whose_eta_min_equals_the_learning_rate_is_not_warned(caplog) -> None:
    """eta_min equal to the learning rate keeps it constant: nothing rises, nothing warned."""
    assert _cosine_warnings(caplog, 0.001, 0.001) == []


class _Identity(nn.Module):
    def forward(self, w):
        return w


def _hand_built(model, callbacks, max_steps=2) -> Trainer:
    split = _split()
    return Trainer(model, torch.optim.SGD([p for p in model.parameters() if p.requires_grad],
                                          lr=0.1),
                   InMemoryLoader(split, 8, CPU, shuffle=False),
                   InMemoryLoader(split, 8, CPU, shuffle=False), criterion=CrossEntropy(),
                   device=CPU, max_steps=max_steps, callbacks=callbacks)  # fmt: skip


def test_a_parametrization_registered_mid_run_renames_the_parameters_followed() -> None:
    """A parametrization registered by a callback moves ``0.weight`` to
    ``0.parametrizations.weight.original``, the same tensor: the trainer's names follow (they
    name the per-layer norms), read by name as well as by tensor."""
    from torch.nn.utils import parametrize

    torch.manual_seed(0)  # (no bias: the renamed tensor keeps its place in the list)
    model = nn.Sequential(nn.Linear(4, 8, bias=False), nn.ReLU(), nn.Linear(8, 3))

    class Parametrizes(Callback):
        def on_train_step_end(self, trainer, out) -> None:
            if not parametrize.is_parametrized(trainer.model[0]):
                parametrize.register_parametrization(trainer.model[0], "weight", _Identity())

    trainer = _hand_built(model, [Parametrizes()])
    trainer.fit()
    assert trainer.global_step == 2
    assert trainer.param_names == [n for n, p in model.named_parameters() if p.requires_grad]
    assert "0.parametrizations.weight.original" in trainer.param_names


def test_a_layer_frozen_while_its_neighbour_is_renamed_is_named_as_changed(caplog) -> None:
    """A callback that registers a parametrization (a rename: the same tensors) and freezes a
    layer in one go: the change is said naming the frozen layer, not as a rename alone (the
    list also decides data-parallel's refusal)."""
    from torch.nn.utils import parametrize

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))

    class Both(Callback):
        def on_train_step_end(self, trainer, out) -> None:
            if not parametrize.is_parametrized(trainer.model[0]):
                parametrize.register_parametrization(trainer.model[0], "weight", _Identity())
                trainer.model[2].requires_grad_(False)

    trainer = _hand_built(model, [Both()])
    with caplog.at_level(logging.INFO, logger="trainer.loop"):
        trainer.fit()
    said = [r.getMessage() for r in caplog.records if "at step 1" in r.getMessage()]
    assert said and said[0].startswith("the model's parameters changed at step 1 (2.bias, "
                                       "2.weight)"), said  # fmt: skip


def test_a_regularizer_bound_to_another_models_frozen_layer_is_refused() -> None:
    """Bound to another model's layer that is frozen for now (matched, to be unfrozen
    mid-run): still not the Trainer's model's, refused as a trainable one is (it would select
    that other model's tensors again at each change, regularizing nothing of this one)."""
    import pytest

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    other = nn.Linear(8, 3).requires_grad_(False)
    reg = Regularizer("l2", 0.5).bind(other)
    assert reg.params == [] and [n for n, _ in reg._frozen] == ["weight"]
    split = _split()
    with pytest.raises(ValueError, match=r"regularizer l2 \(Regularizer\) is bound to "
                       r"parameters that are not the Trainer's model's \(weight\)"):  # fmt: skip
        Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1),
                InMemoryLoader(split, 16, CPU, shuffle=False),
                InMemoryLoader(split, 16, CPU, shuffle=False), criterion=CrossEntropy(),
                device=CPU, max_steps=1, regularizers=[reg])  # fmt: skip


class Tracks(nn.Module):
    """fc1, head; once a callback registered the buffer ``seen`` on it, the forward adds its
    input's mean to it in place (an EMA's statistic added mid-run)."""

    def __init__(self, in_shape, out_dim: int) -> None:
        import math

        super().__init__()
        self.fc1 = nn.Linear(math.prod(in_shape), 16)
        self.head = nn.Linear(16, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        if "seen" in self._buffers:
            self.seen.add_(x.detach().mean())
        return self.head(torch.relu(self.fc1(x)))


class AddBufferThenNaN(Callback):
    """After step 2: ``model.register_buffer("seen", zeros)`` (a buffer alone: no module, no
    parameter registered). Step 3's input holds a NaN: the guard skips it and puts the
    buffers back as they were before its forward."""

    def on_train_step_end(self, trainer, out) -> None:
        if out.step == 2:
            trainer.model.register_buffer("seen", torch.zeros(()))
            self.model = trainer.model

    def on_train_batch_start(self, trainer, batch) -> None:
        if trainer.global_step + 1 == 3:
            batch.x[0].view(-1)[0] = float("nan")


def test_a_buffer_registered_mid_run_is_put_back_on_a_skipped_step(tmp_path) -> None:
    """README: restore-on-skip puts the model's buffers back on a skipped step; a buffer
    registered mid-run (torch's buffer registration hook) is among them from the next window:
    step 3's NaN does not stay in it."""
    from conftest import train

    cb = AddBufferThenNaN()
    train(tmp_path, "~model", f"+model._target_={__name__}.Tracks", "data=synthetic",
          "data.num_train=256", "data.num_val=64", "data.batch_size=32", "optimizer=sgd",
          "trainer.max_steps=4", "logging.every_n_steps=1",
          "instrument.nonfinite.policy=skip", callbacks=[cb])  # fmt: skip
    assert torch.isfinite(cb.model.seen), "step 3's NaN stayed in the buffer registered at step 2"


def test_a_layer_replaced_between_fits_is_followed_at_the_next_fits_first_step(tmp_path):
    """Between two fits (no registration hook watching), the last layer replaced and given to
    the optimizer: the second fit reads the model again as it starts, so its first step's
    norms, clipping and guard cover the new layer, not only the next logging step's."""
    from test_replaced_params_review import _refittable

    class Records(Callback):
        seen: dict[int, set[int]] = {}

        def on_train_step_end(self, trainer, out) -> None:
            self.seen[out.step] = {id(p) for p in trainer.params}

    cb = Records()
    trainer = _refittable(tmp_path, "logging.every_n_steps=100", callbacks=[cb])
    assert trainer.fit()["step"] == 2
    net = trainer.model.net
    last = len(net) - 1
    net[last] = nn.Linear(net[last].in_features, net[last].out_features)
    trainer.optimizer.add_param_group({"params": list(net[last].parameters())})
    trainer.max_steps = 4
    trainer.fit()
    model = {id(p) for p in trainer.model.parameters() if p.requires_grad}
    assert cb.seen[3] == model, "step 3 measured the replaced layer's old tensors"


class Recomputes(Regularizer):
    """l2 whose value() sets λ again to the same number (a schedule recomputed each call,
    constant here): a new float object of equal value."""

    KINDS = {**Regularizer.KINDS, "q": l2}
    GRADS = {**Regularizer.GRADS, "q": _l2_grad}

    def value(self):
        v = super().value()
        self.coef = float(self.coef) * 1.0
        return v


def test_a_value_setting_lambda_to_the_same_number_keeps_grad_norm_reg(tmp_path) -> None:
    """λ is compared by value: a value() that sets it again to the same number took λR at
    that λ, known: grad_norm/reg is 0.5 × ‖W‖ (of the matrices, as the step holds), not NaN."""
    import math

    import pytest
    from conftest import read_scalars, train
    from test_review_regularizers_schedulers_report import _Weights

    cb = _Weights(False)
    train(tmp_path, "trainer.max_steps=1", "logging.every_n_steps=1", "optimizer=sgd",
          "model.hidden=[8]", "instrument=none", f"+regularizer.q._target_={__name__}.Recomputes",
          "+regularizer.q.coef=0.5", callbacks=[cb])  # fmt: skip
    logged = read_scalars(tmp_path)["grad_norm/reg"][0][1]
    norm = math.sqrt(sum(float((w.double() ** 2).sum()) for w in cb.w.values() if w.ndim >= 2))
    # float32 norms of float32 gradients: within 1e-5 relative (as the suite's own test)
    assert logged == pytest.approx(0.5 * norm, rel=1e-5), (logged, 0.5 * norm)


def test_a_whole_event_file_is_not_said_to_be_damaged(tmp_path, capsys) -> None:
    """A completed job whose event files end at its metrics.json's step (as every intact run
    does): its curves are whole, no "damaged or cut event file" warning."""
    from test_report import completed, make_run

    from trainer import report

    root = tmp_path / "sweep"
    logged = make_run(root / "0", completed(0.8, 0.5, 0.1), ["x=1"])
    (run,) = report.collect_runs(root)
    assert run.status == "completed"
    assert [s for s, _ in run.curves["train/loss"]] == [s for s, _ in logged["train/loss"]]
    assert "event files end at step" not in capsys.readouterr().err


def test_a_one_cycle_one_step_short_is_refused_and_one_of_the_runs_length_is_not() -> None:
    """OneCycleLR steps at most its total_steps times: one step short of the run (13 of 14)
    fails at the run's last step, so it is refused before training; 14 of 14 trains."""
    import pytest

    from trainer.config import ConfigError
    from trainer.run import _check_own_schedule_length

    for length, refused in ((13, True), (14, False)):
        cfg = make_cfg("~scheduler", "+scheduler._target_=torch.optim.lr_scheduler.OneCycleLR",
                       "+scheduler._partial_=true", "+scheduler.max_lr=0.1",
                       f"+scheduler.total_steps={length}")  # fmt: skip
        opt = torch.optim.SGD([nn.Parameter(torch.ones(2))], lr=0.1)
        scheduler = build_scheduler(cfg.scheduler, opt, total_steps=14)
        assert scheduler.total_steps == length
        if refused:
            with pytest.raises(ConfigError, match=r"^scheduler.total_steps: OneCycleLR's "
                               r"schedule is 13 steps and this run trains 14"):  # fmt: skip
                _check_own_schedule_length(cfg.scheduler, scheduler, 14)
        else:
            _check_own_schedule_length(cfg.scheduler, scheduler, 14)


def test_a_new_head_the_optimizer_holds_trains_beside_a_body_it_does_not() -> None:
    """An optimizer given the head only (the body trainable, outside it: warned, measured,
    never updated); a callback swaps the head and gives the optimizer the new one
    (add_param_group, as the refusal advises): it trains, not refused as a tensor the
    optimizer does not hold."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))

    class Swaps(Callback):
        def on_train_step_end(self, trainer, out) -> None:
            if out.step == 1:
                trainer.model[2] = nn.Linear(8, 3)
                self.head = trainer.model[2]
                self.before = self.head.weight.detach().clone()
                trainer.optimizer.add_param_group({"params": list(self.head.parameters())})

    cb = Swaps()
    split = _split()
    trainer = Trainer(model, torch.optim.SGD(model[2].parameters(), lr=0.1),
                      InMemoryLoader(split, 8, CPU, shuffle=False),
                      InMemoryLoader(split, 8, CPU, shuffle=False), criterion=CrossEntropy(),
                      device=CPU, max_epochs=2, max_steps=3, callbacks=[cb])  # fmt: skip
    trainer.fit()
    assert trainer.global_step == 3
    assert not torch.equal(cb.head.weight, cb.before), "the new head was not updated"
