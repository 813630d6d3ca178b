"""A layer frozen when the trainer is built and unfrozen by a callback mid-run (gradual
unfreezing): the guard, clipping, ``grad_norm/total`` and the instruments cover it from then on,
checked against the gradients recorded by an independent callback."""

from __future__ import annotations

import logging
import math

import pytest
import torch
from conftest import read_scalars, train
from torch import nn
from torch.func import functional_call, grad, vmap

from trainer.callbacks import Callback

LR, CLIP = 0.1, 0.05
STEPS = ["~model", f"+model._target_={__name__}.Partly", "data=synthetic", "data.num_train=256",
         "data.num_val=64", "data.batch_size=32", "optimizer=sgd", "optimizer.momentum=0",
         f"optimizer.lr={LR}", "trainer.max_steps=4", "logging.every_n_steps=1",
         "instrument.norms.every_n_steps=1", "instrument.per_sample.every_n_steps=1"]  # fmt: skip


class Partly(nn.Module):
    """An MLP whose middle layer starts frozen (a pretrained backbone being fine-tuned)."""

    def __init__(self, in_shape, out_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(math.prod(in_shape), 16)
        self.backbone = nn.Linear(16, 16)
        self.backbone.requires_grad_(False)
        self.head = nn.Linear(16, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.backbone(torch.relu(self.fc1(x.flatten(1))))))


class Unfreeze(Callback):
    """Unfreezes the backbone after step ``after``; records each step's gradients (all of
    the model's, before clipping), weights and the per-sample gradient norms by torch.func."""

    def __init__(self, after: int = 2) -> None:
        self.after = after
        self.grads: dict[int, dict[str, torch.Tensor]] = {}
        self.before: dict[str, torch.Tensor] = {}
        self.updates: dict[int, dict[str, torch.Tensor]] = {}
        self.per_sample: dict[int, torch.Tensor] = {}

    def on_train_batch_start(self, trainer, batch) -> None:
        self.batch = batch

    def on_before_optimizer_step(self, trainer, optimizer) -> None:
        model, step = trainer.model, trainer.global_step
        params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}

        def loss(ps, x, y):
            out = functional_call(model, ps, (x[None],))
            return torch.nn.functional.cross_entropy(out, y[None])

        # (after the backward: the instrument's hooks are gone, this forward is not measured)
        g = vmap(grad(loss), in_dims=(None, 0, 0))(params, self.batch.x, self.batch.y)
        sq = sum(v.flatten(1).double().square().sum(1) for v in g.values())
        self.per_sample[step] = sq.sqrt()
        named = model.named_parameters()
        self.grads[step] = {n: p.grad.clone() for n, p in named if p.grad is not None}
        self.before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}

    def on_train_step_end(self, trainer, out) -> None:
        self.updates[out.step] = {
            n: p.detach() - self.before[n] for n, p in trainer.model.named_parameters()
        }
        if out.step == self.after:
            trainer.model.backbone.requires_grad_(True)


def total(grads: dict[str, torch.Tensor]) -> float:
    return math.sqrt(sum(float(g.double().square().sum()) for g in grads.values()))


def test_a_layer_unfrozen_mid_run_is_counted_clipped_and_measured(tmp_path) -> None:
    rec = Unfreeze(after=2)
    train(tmp_path, *STEPS, f"trainer.grad_clip={CLIP}", callbacks=[rec])
    scalars = read_scalars(tmp_path)
    assert sorted(rec.grads[2]) == ["fc1.bias", "fc1.weight", "head.bias", "head.weight"]
    assert "backbone.weight" in rec.grads[3]  # (the recorder sees every gradient)
    for step in (1, 2, 3, 4):
        norm = total(rec.grads[step])
        assert dict(scalars["grad_norm/total"])[step] == pytest.approx(norm, rel=1e-6)
        assert norm > CLIP  # so clipping scaled every gradient down, the unfrozen one too
        coef = CLIP / norm
        for name, g in rec.grads[step].items():  # plain SGD: Δθ = −lr · coef · g
            torch.testing.assert_close(rec.updates[step][name], -LR * coef * g, rtol=1e-4,
                                       atol=1e-7)  # fmt: skip
        # the total after clipping, measured: the clip value
        assert dict(scalars["grad_norm/total_clipped"])[step] == pytest.approx(CLIP, rel=1e-5)
        # per-sample norms over every trainable parameter, the unfrozen layer too
        assert dict(scalars["per_sample/coverage"])[step] == 1.0
        want = rec.per_sample[step]
        got = dict(scalars["per_sample/grad_norm_mean"])[step]
        assert got == pytest.approx(float(want.mean()), rel=1e-5)
    frozen = rec.updates[2]["backbone.weight"]
    assert torch.equal(frozen, torch.zeros_like(frozen))
    for tag in ("grad_norm/backbone.weight", "update_ratio/backbone.bias"):
        assert [s for s, _ in scalars[tag]] == [3, 4], tag
    norms = [v for _, v in scalars["grad_norm/backbone.weight"]]
    want = [float(rec.grads[s]["backbone.weight"].norm()) for s in (3, 4)]
    assert norms == pytest.approx(want, rel=1e-6)


class PoisonBackbone(Unfreeze):
    """Also puts a NaN into the unfrozen layer's gradient on step 3."""

    def on_after_backward(self, trainer, batch, losses, weights) -> None:
        if trainer.global_step + 1 == 3:
            trainer.model.backbone.weight.grad.view(-1)[0] = float("nan")

    def on_train_step_end(self, trainer, out) -> None:
        super().on_train_step_end(trainer, out)
        where = None if out.skip_where is None else bool(out.skip_where)  # (a test: reads)
        self.skips = getattr(self, "skips", []) + [(out.skipped, where)]


@pytest.mark.parametrize("sync", ["step", "deferred"])
def test_the_guard_checks_a_layer_unfrozen_mid_run(tmp_path, sync, caplog) -> None:
    rec = PoisonBackbone(after=2)
    with caplog.at_level(logging.WARNING):
        train(tmp_path, *STEPS, "instrument.nonfinite.policy=skip",
              f"instrument.nonfinite.sync={sync}", callbacks=[rec])  # fmt: skip
    for name, delta in rec.updates[3].items():  # skipped: nothing moved
        assert torch.equal(delta, torch.zeros_like(delta)), name
    assert all(torch.isfinite(p).all() for p in rec.before.values())
    assert any(d.abs().max() > 0 for d in rec.updates[4].values())
    assert read_scalars(tmp_path)["nonfinite/skipped_steps"] == [(3, 1.0)]
    # what on_train_step_end is told: on the host (step mode), or as the device flag
    if sync == "step":
        assert rec.skips == [(False, None), (False, None), (True, None), (False, None)]
    else:
        assert rec.skips == [(False, False), (False, False), (False, True), (False, False)]
    assert "backbone.weight" in caplog.text


class UnfreezeMidWindow(Unfreeze):
    """Unfreezes after the first micro-batch of step 2's window (accumulation 2)."""

    def on_after_backward(self, trainer, batch, losses, weights) -> None:
        if trainer.global_step + 1 == 2 and not trainer.model.backbone.weight.requires_grad:
            trainer.model.backbone.requires_grad_(True)

    def on_train_step_end(self, trainer, out) -> None:
        self.updates[out.step] = {}


def test_per_sample_norms_skip_a_window_whose_parameters_changed(tmp_path, caplog) -> None:
    with caplog.at_level(logging.WARNING):
        train(tmp_path, *STEPS, "trainer.accumulate_grad_batches=2",
              callbacks=[UnfreezeMidWindow()])  # fmt: skip
    scalars = read_scalars(tmp_path)
    # step 2's first micro-batch was measured without the backbone: the step logs none
    assert [s for s, _ in scalars["per_sample/grad_norm_mean"]] == [1, 3, 4]
    assert [v for _, v in scalars["per_sample/coverage"]] == [1.0, 1.0, 1.0]
    assert "step 2 is not measured: the trainable parameters changed" in caplog.text
    assert [s for s, _ in scalars["grad_norm/backbone.weight"]] == [2, 3, 4]
