"""A review of 21cb4b7 (2026-12-07): optimizer state a checkpoint must not change (a key of an
optimizer's own, a tensor out of its group for a while), a head the optimizer takes a hook later
regularized."""

from __future__ import annotations

import torch
from conftest import read_scalars, train
from test_flush_and_refusals import ReplaceThenHandOver
from test_replaced_params import STEPS, Partly  # noqa: F401 (Partly: the model's _target_)

from trainer.callbacks import Callback


class CountingSGD(torch.optim.SGD):
    """An SGD of one's own keeping a run-wide counter in its state under a non-tensor key
    (torch's ``state_dict``/``load_state_dict`` keep such keys as they are: ``packed_state``
    maps tensors only): its lr warms up over the calls it counts."""

    def step(self, closure=None):
        calls = self.state["calls"] = self.state.get("calls", 0) + 1
        for group in self.param_groups:
            group["lr"] = group["initial_lr"] * min(1.0, calls / 4)
        return super().step(closure)


def counting_sgd(params, lr: float):
    opt = CountingSGD(params, lr=lr)
    for group in opt.param_groups:
        group["initial_lr"] = lr
    return opt


class Keeps(Callback):
    def on_fit_end(self, trainer, metrics) -> None:
        self.calls = trainer.optimizer.state.get("calls")


RUN = ("data=synthetic", "data.num_train=64", "data.num_val=16", "data.shape=[4]",
       "data.batch_size=16", "model.hidden=[4]", "instrument=none", "trainer.max_steps=6",
       "logging.every_n_steps=1", "~optimizer", f"+optimizer._target_={__name__}.counting_sgd",
       "+optimizer._partial_=true", "+optimizer.lr=0.1")  # fmt: skip


def test_optimizer_state_under_a_non_tensor_key_survives_a_checkpoint(tmp_path) -> None:
    """``Trainer._optimizer_state`` deletes every ``optimizer.state`` key whose ``id`` no
    param group holds, before ``state_dict()``: a non-tensor key (an optimizer's run-wide
    counter) is deleted at every checkpoint, so a run checkpointed every step trains
    differently from one that is not, and the checkpoint loses the state."""
    every, none = Keeps(), Keeps()
    train(tmp_path / "every", *RUN, "trainer.checkpoint.every_n_steps=1", callbacks=[every])
    train(tmp_path / "none", *RUN, "trainer.checkpoint.every_n_steps=0", callbacks=[none])
    assert none.calls == 6
    assert every.calls == 6, f"the optimizer's counter after 6 steps: {every.calls}"
    a, b = read_scalars(tmp_path / "every"), read_scalars(tmp_path / "none")
    assert a["train/loss"] == b["train/loss"]


class ReplaceThenHandOverLater(ReplaceThenHandOver):
    """After step 2 a fresh head set on the model and the old head taken out of the optimizer;
    the new head given to the optimizer in step 3's ``on_train_batch_start`` (the pattern of
    tests/test_flush_and_refusals.py::ReplaceThenHandOver, which trains). At the end: which
    tensors the regularizer covers, and whether the head is trainable and held."""

    def on_fit_end(self, trainer, metrics) -> None:
        (reg,) = trainer.objective.regularizers
        self.covered = {id(p) for p in reg.params}
        self.head = {
            id(p) for p in trainer.model.head.parameters() if p.ndim >= 2
        }  # (l2: min_ndim 2)
        self.held = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}


def test_a_head_handed_to_the_optimizer_a_hook_later_is_regularized(tmp_path) -> None:
    """``_follow_trainable`` leaves out of every regularizer a new tensor the optimizer does
    not hold when the replacement is followed (an EMA's copy). A head the optimizer is given
    one hook later (before its first forward) is trainable, held and updated, and matched by
    l2's ``include: ["*"]``, but the regularizers are not bound again (the lists change only
    when the parameters or their flags do): it trains unregularized for the rest of the run,
    and ``reg/*`` and the loss present the penalty as the whole model's."""
    cb = ReplaceThenHandOverLater()
    train(tmp_path, *STEPS, "instrument=none", "regularizer=[l2]", callbacks=[cb])
    assert cb.head <= cb.held
    missing = cb.head - cb.covered
    assert not missing, f"{len(missing)} of the head's held, trained tensors not regularized"


class PausesTheHead(Callback):
    """Takes the head out of AdamW's group after step 2 (paused: trained by nothing) and gives
    it back after step 4; torch keeps its moments in ``optimizer.state`` meanwhile (keyed by
    the tensor), and they are used again from step 5 on."""

    def on_train_step_end(self, trainer, out) -> None:
        group = trainer.optimizer.param_groups[0]
        head = list(trainer.model.parameters())[-2:]  # (the last layer)
        if out.step == 2:
            group["params"] = [p for p in group["params"] if not any(p is h for h in head)]
        if out.step == 4:
            group["params"] = [*group["params"], *head]


PAUSE = ("data=synthetic", "data.num_train=128", "data.num_val=16", "data.shape=[4]",
         "data.batch_size=16", "model.hidden=[4]", "instrument=none", "trainer.max_steps=7",
         "logging.every_n_steps=1", "optimizer=adamw")  # fmt: skip


def test_a_checkpoint_does_not_change_the_training(tmp_path) -> None:
    """``_optimizer_state`` deletes, in the live optimizer, the state of every tensor no group
    holds at the checkpoint: a head paused at that moment loses its AdamW moments for the
    rest of the run, so the run checkpointed every step trains differently from the same run
    with no checkpoints (it should change only what is written)."""
    train(tmp_path / "every", *PAUSE, "trainer.checkpoint.every_n_steps=1",
          callbacks=[PausesTheHead()])  # fmt: skip
    train(tmp_path / "none", *PAUSE, "trainer.checkpoint.every_n_steps=0",
          callbacks=[PausesTheHead()])  # fmt: skip
    a, b = read_scalars(tmp_path / "every"), read_scalars(tmp_path / "none")
    assert a["train/loss"][:5] == b["train/loss"][:5]
    assert a["train/loss"] == b["train/loss"], "the losses after the head was given back"
