"""A review of the replaced-parameter following (2026-12-07): a layer frozen in the hook that
swaps a head, buffers of a replaced module, a checkpoint between a replacement and its reading,
fits called again, a removed parameter."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import make_cfg, train
from torch import nn

from trainer.callbacks import Callback


class WithNorm(nn.Module):
    """fc1, a BatchNorm without affine parameters (buffers only), head."""

    def __init__(self, in_shape, out_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(math.prod(in_shape), 16)
        self.bn = nn.BatchNorm1d(16, affine=False)
        self.head = nn.Linear(16, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.bn(self.fc1(x.flatten(1)))))


STEPS = ["~model", f"+model._target_={__name__}.WithNorm", "data=synthetic", "data.num_train=256",
         "data.num_val=64", "data.batch_size=32", "optimizer=sgd", "trainer.max_steps=4",
         "logging.every_n_steps=1", "instrument.nonfinite.policy=skip"]  # fmt: skip


class ReplaceNormThenNaN(Callback):
    """After step 2: ``model.bn = nn.BatchNorm1d(16, affine=...)`` (a fresh norm; without
    affine, buffers and no parameters; with, its parameters frozen). Step 3's input holds a
    NaN: the guard skips it, and the buffers must be put back as they were before step 3's
    forward (README: restore-on-skip; the buffer slots made again after a replacement)."""

    def __init__(self, affine: bool) -> None:
        self.affine = affine

    def on_train_step_end(self, trainer, out) -> None:
        if out.step == 2:
            trainer.model.bn = nn.BatchNorm1d(16, affine=self.affine).requires_grad_(False)
            self.bn = trainer.model.bn

    def on_train_batch_start(self, trainer, batch) -> None:
        if trainer.global_step + 1 == 3:
            self.mean_before = trainer.model.bn.running_mean.clone()
            batch.x[0].view(-1)[0] = float("nan")


@pytest.mark.parametrize("affine", [True, False], ids=["frozen_params", "buffers_only"])
def test_a_replaced_norm_is_put_back_on_a_skipped_step(tmp_path, affine) -> None:
    """A module with buffers and no parameters set on the model: torch's module registration
    hook fires, but ``_follow_replaced`` returns at "same parameters" before it sets
    ``_buffers_due``, so the slots stay the removed module's: the skipped step's NaN stays
    in the new norm's running statistics (the frozen-affine variant passes)."""
    cb = ReplaceNormThenNaN(affine)
    train(tmp_path, *STEPS, callbacks=[cb])
    # step 3 skipped: its buffers put back; step 4's batch is finite
    assert torch.isfinite(cb.bn.running_mean).all(), "step 3's NaN stayed in bn.running_mean"


def _refittable(tmp_path, *overrides: str, callbacks=()):
    from trainer.run import build_trainer

    cfg = make_cfg("trainer.max_steps=2", "logging.every_n_steps=1", "logging.progress=false",
                   "trainer.checkpoint.every_n_steps=0", "optimizer=sgd",
                   *overrides)  # fmt: skip
    return build_trainer(cfg, tmp_path, list(callbacks), with_logger=False)


@pytest.mark.parametrize("held", [False, True], ids=["optimizer_not_told", "add_param_group"])
def test_a_module_replaced_between_two_fits_is_followed(tmp_path, held) -> None:
    """``fit()`` called again (as tests/test_nonfinite.py does) after the model's last layer
    was replaced between the fits: the registration hooks are held only while ``fit()``
    runs, so the second fit never reads the model again. Not held by the optimizer, the new
    layer trains with a gradient never applied, unsaid (the refusal the README promises never
    comes); held, it is updated outside ``Trainer.params`` (unclipped, out of
    ``grad_norm/total``, unguarded)."""
    trainer = _refittable(tmp_path)
    assert trainer.fit()["step"] == 2
    net = trainer.model.net
    last = len(net) - 1
    net[last] = nn.Linear(net[last].in_features, net[last].out_features)
    if held:
        trainer.optimizer.add_param_group({"params": list(net[last].parameters())})
    trainer.max_steps = 4
    if not held:
        with pytest.raises(RuntimeError, match="the optimizer does not hold"):
            trainer.fit()
        return
    trainer.fit()
    model = {id(p) for p in trainer.model.parameters() if p.requires_grad}
    assert {id(p) for p in trainer.params} == model, "Trainer.params are not the model's"


class FixNewHead(Callback):
    """After step 3: ``model.head`` replaced by a fresh head kept fixed
    (``requires_grad_(False)``, as the refusal's message advises). A run resumed from step 3
    builds its model again and does not run this (it is past step 3)."""

    def on_train_step_end(self, trainer, out) -> None:
        if out.step == 3:
            torch.manual_seed(123)
            head = trainer.model.head
            trainer.model.head = nn.Linear(16, head.out_features).requires_grad_(False)


def test_a_checkpoint_written_after_a_replacement_keeps_the_new_tensors_flags(tmp_path) -> None:
    """The step-3 checkpoint is written at step 3's rest point, after ``on_train_step_end``
    replaced the head and before the next micro-batch reads the model again:
    ``state_dict()["trainable"]`` is read from ``_all_params`` (the removed head: True), so
    the resumed run trains the head that the uninterrupted run keeps fixed."""
    from test_unfreeze import STEPS as UNFREEZE
    from test_unfreeze import whole_and_resumed

    from trainer.checkpoint import load_checkpoint

    steps = [*UNFREEZE[:-2], "instrument=none", "trainer.checkpoint.every_n_steps=1",
             "trainer.checkpoint.keep_last=10", "trainer.max_steps=6"]  # fmt: skip
    try:
        whole_and_resumed(tmp_path, steps, FixNewHead)
    finally:
        saved = load_checkpoint(tmp_path / "whole" / "checkpoints" / "step_000000003.pt")
        assert saved["trainable"]["head.weight"] is False, saved["trainable"]


class ReplaceLast(Callback):
    """After step 2: the MLP's last layer replaced by a fresh one, the optimizer not told."""

    def on_train_step_end(self, trainer, out) -> None:
        if out.step == 2:
            net = trainer.model.net
            net[len(net) - 1] = nn.Linear(net[-1].in_features, net[-1].out_features)


def test_a_refused_replacement_is_refused_again_by_the_next_fit(tmp_path) -> None:
    """The refusal clears ``_registered`` before it raises and leaves ``_all_params`` the old
    tensors: a fit called again (the loop supports it: "the last fit failed inside step k's
    window; this one trains it again") reads nothing anew and trains on, the new layer getting
    a gradient every step and never updated, the instruments measuring the old tensors as
    complete: the very thing the refusal was for."""
    trainer = _refittable(tmp_path, "trainer.max_steps=4", callbacks=[ReplaceLast()])
    with pytest.raises(RuntimeError, match="the optimizer does not hold"):
        trainer.fit()
    with pytest.raises(RuntimeError, match="the optimizer does not hold"):
        trainer.fit()


class DropBias(Callback):
    """After step 2: ``model.head.bias = None`` (the bias removed; torch runs no registration
    hook for it); records the trainer's parameter names at each later step."""

    def __init__(self) -> None:
        self.names: dict[int, list[str]] = {}

    def on_train_step_end(self, trainer, out) -> None:
        if out.step == 2:
            trainer.model.head.bias = None

    def on_before_optimizer_step(self, trainer, optimizer) -> None:
        self.names[trainer.global_step] = list(trainer.param_names)


def test_a_removed_parameter_is_no_longer_reported(tmp_path) -> None:
    """The removed bias stays in ``Trainer.params``: ``param_norm/head.bias`` keeps reporting
    the removed tensor (the same value at steps 3 and 4) and ``update_ratio/head.bias`` is
    logged as a measured 0.0 (what the commit's own tests call a defect for a replaced one)."""
    from conftest import read_scalars
    from test_unfreeze import STEPS as UNFREEZE

    cb = DropBias()
    train(tmp_path, *UNFREEZE, "instrument.norms.param_norm=true", callbacks=[cb])
    scalars = read_scalars(tmp_path)
    assert "head.bias" not in cb.names[3], cb.names[3]
    assert 3 not in dict(scalars["update_ratio/head.bias"]), scalars["update_ratio/head.bias"]


class FreezeAndSwapHead(Callback):
    """In step 3's ``on_after_backward`` (its gradients there): ``fc1`` frozen and the head
    replaced by a fresh one given to the optimizer (a fine-tuning stage's switch, made in one
    hook). Records fc1.weight before and after step 3."""

    def __init__(self, swap: bool) -> None:
        self.swap = swap

    def on_after_backward(self, trainer, batch, losses, weights) -> None:
        if trainer.global_step + 1 != 3:
            return
        model = trainer.model
        self.before = model.fc1.weight.detach().clone()
        model.fc1.requires_grad_(False)
        if self.swap:
            torch.manual_seed(123)
            model.head = nn.Linear(16, model.head.out_features)
            trainer.optimizer.add_param_group({"params": list(model.head.parameters())})

    def on_train_step_end(self, trainer, out) -> None:
        if out.step == 3:
            self.after = trainer.model.fc1.weight.detach().clone()


@pytest.mark.parametrize("swap", [False, True], ids=["freeze_alone", "freeze_and_new_head"])
def test_a_layer_frozen_with_its_gradient_there_is_not_updated_when_a_head_is_swapped_too(
    tmp_path, swap
) -> None:
    """README: "A layer frozen while its gradient of the step already exists (in
    on_after_backward, say) loses that gradient: it is not updated, rather than updated
    unclipped and unchecked". With a replacement seen at the same look, ``_follow_trainable``
    skips the drop (``if not replaced``; ``_trainable`` was overwritten), so fc1 is updated by
    its whole gradient, outside ``Trainer.params``: unclipped, out of ``grad_norm/total``,
    unguarded."""
    from test_unfreeze import STEPS as UNFREEZE

    cb = FreezeAndSwapHead(swap)
    train(tmp_path, *UNFREEZE, "trainer.grad_clip=0.05", callbacks=[cb])
    assert torch.equal(cb.after, cb.before), "fc1 updated after it was frozen"
