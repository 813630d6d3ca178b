"""A callback of one's own that replaces a module or a parameter of the model mid-run (a new
head, ``setattr`` of a new ``nn.Parameter``), with or without giving the optimizer the new
tensors (a probe's findings, 2026-12-07). The new head got a gradient every step, summed, and
was never updated, unsaid; given to the optimizer, it was updated unclipped, left out of
``grad_norm/total``, the guard and per-sample norms (coverage 1.0), and ``param_norm`` went
on reporting the removed tensor. Now the trainer follows the model (the optimizer holding the
new tensors) or refuses, naming the parameter (the optimizer not holding them)."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import final_params, read_scalars, train
from test_unfreeze import CLIP, LR, STEPS, Partly  # noqa: F401 (Partly: the model's _target_)
from torch import nn
from torch.func import functional_call, grad, vmap

from trainer.callbacks import Callback

STEPS = [s.replace("test_unfreeze.Partly", f"{__name__}.Partly") for s in STEPS]


REFUSED = (
    r"head.weight(, head.bias)?: a new tensor set on the model .* has a gradient at "
    r"step 3, and the optimizer does not hold it"
)


class Recorder(Callback):
    """Each step's gradients (every parameter of the model as it is then), weights before
    the update, the update, and the per-sample gradient norms by torch.func."""

    def __init__(self) -> None:
        self.grads: dict[int, dict[str, torch.Tensor]] = {}
        self.before: dict[int, dict[str, torch.Tensor]] = {}
        self.updates: dict[int, dict[str, torch.Tensor]] = {}
        self.per_sample: dict[int, float] = {}

    def on_train_batch_start(self, trainer, batch) -> None:
        self.batch = batch

    def on_before_optimizer_step(self, trainer, optimizer) -> None:
        model, step = trainer.model, trainer.global_step
        named = dict(model.named_parameters())
        self.grads[step] = {n: p.grad.clone() for n, p in named.items() if p.grad is not None}
        self.before[step] = {n: p.detach().clone() for n, p in named.items()}
        params = {n: p.detach() for n, p in named.items() if p.requires_grad}

        def loss(ps, x, y):
            out = functional_call(model, ps, (x[None],))
            return torch.nn.functional.cross_entropy(out, y[None])

        g = vmap(grad(loss), in_dims=(None, 0, 0))(params, self.batch.x, self.batch.y)
        sq = sum(v.flatten(1).double().square().sum(1) for v in g.values())
        self.per_sample[step] = float(sq.sqrt().mean())

    def on_train_step_end(self, trainer, out) -> None:
        named = dict(trainer.model.named_parameters())
        self.updates[out.step] = {n: named[n].detach() - b for n, b in self.before[out.step].items()
                                  if n in named}  # fmt: skip


def new_head(trainer, hand_over: bool = True) -> None:
    """``model.head`` replaced by a fresh (seeded) ``nn.Linear``, the old head's tensors taken
    out of the optimizer's first group; with ``hand_over``, the new one added as a group of its
    own (everything a user can do to have it trained)."""
    model = trainer.model
    old = {id(p) for p in model.head.parameters()}
    group = trainer.optimizer.param_groups[0]
    group["params"] = [p for p in group["params"] if id(p) not in old]
    torch.manual_seed(123)
    model.head = nn.Linear(16, model.head.out_features)
    if hand_over:
        trainer.optimizer.add_param_group({"params": list(model.head.parameters())})


class ReplaceHead(Recorder):
    """After step 2: ``model.head = nn.Linear(...)`` (a fresh head). With ``optimizer``, the
    old head's tensors are taken out of the optimizer's group and the new ones added as a
    group of their own (everything a user can do to have them trained)."""

    def __init__(self, optimizer: bool, nan_at: int | None = None) -> None:
        super().__init__()
        self.optimizer, self.nan_at = optimizer, nan_at

    def on_after_backward(self, trainer, batch, losses, weights) -> None:
        if self.nan_at is not None and trainer.global_step + 1 == self.nan_at:
            trainer.model.head.weight.grad.view(-1)[0] = float("nan")

    def on_train_step_end(self, trainer, out) -> None:
        super().on_train_step_end(trainer, out)
        if out.step != 2:
            return
        if self.optimizer:
            new_head(trainer)
        else:  # (the optimizer not told)
            torch.manual_seed(123)
            trainer.model.head = nn.Linear(16, trainer.model.head.out_features)


class SetNewParameter(Recorder):
    """After step 2: ``setattr(model.head, "weight", nn.Parameter(...))`` (a re-initialised
    weight as a new Parameter), the optimizer not told."""

    def on_train_step_end(self, trainer, out) -> None:
        super().on_train_step_end(trainer, out)
        if out.step == 2:
            head = trainer.model.head
            torch.manual_seed(123)
            head.weight = nn.Parameter(torch.randn_like(head.weight) * 0.1)


@pytest.mark.parametrize("callback", [lambda: ReplaceHead(optimizer=False), SetNewParameter],
                         ids=["new_module", "setattr_new_parameter"])  # fmt: skip
def test_a_replaced_parameter_the_optimizer_does_not_hold_is_refused(tmp_path, callback):
    """The new ``head.weight`` got a gradient every step (summed: no one cleared it) and was
    never updated (the optimizer and ``Trainer.params`` held the old tensor), with no word;
    the checkpoint held the untrained head, and a run resumed from it trained the head (a
    fresh optimizer), so the two ended differently. Refused at the next step now, naming the
    parameter, before that step's update (its update and its checkpoint never happen)."""
    rec = callback()
    steps = [*STEPS[:-2], "instrument=none", "trainer.checkpoint.every_n_steps=1",
             "trainer.max_steps=6"]  # fmt: skip
    with pytest.raises(RuntimeError, match=REFUSED):
        train(tmp_path, *steps, callbacks=[rec])
    assert sorted(rec.updates) == [1, 2]
    assert not (tmp_path / "checkpoints" / "step_000000003.pt").exists()


def test_a_parameter_copied_into_in_place_or_a_module_built_aside_is_not_a_replacement(
    tmp_path,
) -> None:
    """What the refusal's message advises (``p.copy_(new)`` under ``no_grad``) trains the
    copied values, and a module a callback builds without setting it on the model (torch's
    registration hooks fire for its own parameters) changes nothing: the run is bit for bit
    the one that copies alone, and the registration hooks are gone after the fit."""
    from torch.nn.modules import module as modules

    class CopyIn(Recorder):
        def __init__(self, aside: bool) -> None:
            super().__init__()
            self.aside = aside

        def on_train_step_end(self, trainer, out) -> None:
            super().on_train_step_end(trainer, out)
            if self.aside:
                nn.Linear(3, 3)  # (built, registered its parameters, never attached)
            if out.step == 2:
                torch.manual_seed(123)
                with torch.no_grad():
                    trainer.model.head.weight.copy_(torch.randn_like(trainer.model.head.weight))

    hooks = (len(modules._global_parameter_registration_hooks),
             len(modules._global_module_registration_hooks))  # fmt: skip
    runs = {}
    for aside in (False, True):
        rec = CopyIn(aside)
        train(tmp_path / str(aside), *STEPS, callbacks=[rec])
        assert float(rec.updates[3]["head.weight"].abs().max()) > 0  # (trained after the copy)
        runs[aside] = final_params(tmp_path / str(aside))
    assert all(torch.equal(runs[False][k], runs[True][k]) for k in runs[False])
    assert (len(modules._global_parameter_registration_hooks),
            len(modules._global_module_registration_hooks)) == hooks  # fmt: skip


def total(grads: dict[str, torch.Tensor]) -> float:
    return math.sqrt(sum(float(g.double().square().sum()) for g in grads.values()))


def test_a_new_head_given_to_the_optimizer_is_counted_and_clipped(tmp_path) -> None:
    """The new head is updated (the optimizer holds it) but ``grad_norm/total`` and the
    clipping leave it out: at step 3 the logged total is 0.508 for 0.580, and the head is
    moved by −lr·g, unclipped (coefficient 1 for CLIP/total = 0.086)."""
    rec = ReplaceHead(optimizer=True)
    train(tmp_path, *STEPS, f"trainer.grad_clip={CLIP}", callbacks=[rec])
    logged = dict(read_scalars(tmp_path)["grad_norm/total"])
    for step in (3, 4):
        norm = total(rec.grads[step])
        assert logged[step] == pytest.approx(norm, rel=1e-6), step
        coef = min(1.0, CLIP / norm)
        for name in ("head.weight", "fc1.weight"):
            torch.testing.assert_close(rec.updates[step][name], -LR * coef * rec.grads[step][name],
                                       rtol=1e-4, atol=1e-7)  # fmt: skip


def test_the_guard_checks_a_new_head_given_to_the_optimizer(tmp_path) -> None:
    """A NaN in the new head's gradient at step 3 with ``policy=skip``: the guard does not
    look at the new head, the step is taken and the NaN reaches its weights."""
    rec = ReplaceHead(optimizer=True, nan_at=3)
    train(tmp_path, *STEPS, "instrument.nonfinite.policy=skip", callbacks=[rec])
    assert torch.isfinite(rec.before[4]["head.weight"]).all(), "the NaN reached the weights"
    assert dict(read_scalars(tmp_path)["nonfinite/skipped_steps"]).get(3) == 1.0


def test_per_sample_norms_and_param_norms_follow_a_new_head(tmp_path) -> None:
    """``per_sample/grad_norm_mean`` leaves the new head out while ``per_sample/coverage`` says
    1.0 (1.92 for 2.46 at step 3), and ``param_norm/head.weight`` keeps reporting the removed
    tensor's norm (the same value at steps 3 and 4)."""
    rec = ReplaceHead(optimizer=True)
    steps = [*STEPS, "instrument.norms.param_norm=true"]
    train(tmp_path, *steps, callbacks=[rec])
    scalars = read_scalars(tmp_path)
    coverage = dict(scalars["per_sample/coverage"])
    got = dict(scalars["per_sample/grad_norm_mean"])
    for step in (3, 4):
        assert coverage[step] == 1.0  # presented as complete: must be exact
        assert got[step] == pytest.approx(rec.per_sample[step], rel=1e-5), step
        want = float(rec.before[step]["head.weight"].norm())
        assert dict(scalars["param_norm/head.weight"])[step] == pytest.approx(want, rel=1e-6)


def test_a_copy_kept_on_the_model_outside_the_forward_is_not_refused(tmp_path) -> None:
    """A callback keeping a copy on the model (``model.ema = deepcopy(model.head)`` in
    on_fit_start, an EMA's): trainable, not the optimizer's, and never in the forward, so it
    never gets a gradient. Refused as a replacement by the first version of the follow (a
    review's); trained now as without the copy, bit for bit."""
    import copy

    class KeepsCopy(Callback):
        def on_fit_start(self, trainer) -> None:
            trainer.model.ema = copy.deepcopy(trainer.model.head)

    train(tmp_path / "copy", *STEPS, callbacks=[KeepsCopy()])
    train(tmp_path / "plain", *STEPS)
    a, b = final_params(tmp_path / "copy"), final_params(tmp_path / "plain")
    assert sorted(a) == sorted([*b, "ema.weight", "ema.bias"])
    assert all(torch.equal(a[k], b[k]) for k in b)


class ReassignsItsBuffer(nn.Module):
    """A model whose forward reassigns a buffer (``self.calls = self.calls + 1``), as
    research code keeping a counter or an EMA does."""

    def __init__(self, in_shape, out_dim: int) -> None:
        super().__init__()
        self.fc = nn.Linear(math.prod(in_shape), out_dim)
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls = self.calls + 1
        return self.fc(x.flatten(1))


def test_a_forward_reassigning_its_buffer_does_not_make_every_step_read_the_model(
    tmp_path, monkeypatch
) -> None:
    """torch's buffer registration hook fires for a buffer reassigned in place of the old one
    too: every micro-batch read the model's parameters again (a review's). Only a new slot
    counts now: on a run logging every 5 steps of 10, the model is read at the fit's start
    and on the logging steps alone, and the buffer still counts every forward."""
    from trainer.loop import Trainer

    reads = []
    follow = Trainer._follow_replaced

    def counted(self):
        reads.append(self.global_step)
        return follow(self)

    monkeypatch.setattr(Trainer, "_follow_replaced", counted)
    train(tmp_path, "~model", f"+model._target_={__name__}.ReassignsItsBuffer",
          "data=synthetic", "data.num_train=320", "data.num_val=32", "data.batch_size=32",
          "optimizer=sgd", "trainer.max_steps=10", "logging.every_n_steps=5",
          "instrument=none")  # fmt: skip
    assert reads == [0, 5, 10], reads  # (the fit's start; the logging steps 5 and 10)
