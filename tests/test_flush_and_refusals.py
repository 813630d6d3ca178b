"""A review of today's loop changes (2026-12-07): on_flush after the last validation and after a
failure next to a periodic flush, a refusal through one's own bug keeping its traceback, an EMA
copy with a regularizer, a head the optimizer holds by the update."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import read_scalars, train
from test_replaced_params import STEPS, Partly, new_head  # noqa: F401 (Partly: the model's _target_)
from torch import nn

import trainer.loop
from trainer.callbacks import Callback

FLUSH_RUN = ("data=synthetic", "data.num_train=80", "data.num_val=16", "data.shape=[4]",
             "data.batch_size=8", "model.hidden=[4]", "instrument=none",
             "logging.every_n_steps=100", "trainer.checkpoint.every_n_steps=0")  # fmt: skip


class KeepsOwnValues(Callback):
    """README, "Callbacks" (``on_flush``): a callback keeping unread device values of its own
    writes them on logging steps (``on_train_step_end``, ``trainer.logging_step``) and in
    ``on_flush`` ("before a checkpoint, at the end, after a failure ... so a checkpoint holds
    none and a failed run loses none"). It keeps a value per micro-batch (``on_after_backward``)
    and one per validation (``on_validation_end``), each for its step."""

    def __init__(self, fail_at: int | None = None) -> None:
        self.kept: list[tuple[str, int, torch.Tensor]] = []
        self.fail_at = fail_at

    def on_after_backward(self, trainer, batch, losses, weights) -> None:
        step = trainer.global_step + 1
        self.kept.append(("mine/loss", step, losses.detach().mean()))
        if step == self.fail_at:
            raise RuntimeError(f"failed in step {step}")

    def on_validation_end(self, trainer, metrics) -> None:
        self.kept.append(("mine/validated", trainer.global_step, torch.ones(())))

    def on_train_step_end(self, trainer, out) -> None:
        if trainer.logging_step:
            self._write(trainer)

    def on_flush(self, trainer) -> None:
        self._write(trainer)

    def _write(self, trainer) -> None:
        kept, self.kept = self.kept, []
        for tag, step, value in kept:
            trainer.logger.add_floats({tag: float(value)}, step)


def test_the_ends_on_flush_follows_the_last_validation_when_the_last_step_is_a_read_every_step(
    tmp_path, monkeypatch
) -> None:
    """``_write_step`` now calls ``write_deferred`` (hence ``on_flush``) at every READ_EVERY-th
    step, also a logging one, before that step's validation; the end's ``write_deferred`` at
    the same step then skips ``on_flush`` (``_flushed_at``: once a step). A run whose
    ``max_steps`` is a multiple of 1,000 (10,000 say) has no ``on_flush`` after its final
    validation: what a callback kept there is never written. READ_EVERY is made 4 here, with
    ``max_steps=4``; the same run with READ_EVERY=1000 writes it."""
    monkeypatch.setattr(trainer.loop, "READ_EVERY", 4)
    cb = KeepsOwnValues()
    train(tmp_path, *FLUSH_RUN, "trainer.max_steps=4", callbacks=[cb])
    unread = [(tag, step) for tag, step, _ in cb.kept]
    assert not unread, f"never written (no on_flush after the final validation): {unread}"
    assert read_scalars(tmp_path).get("mine/validated") == [(4, 1.0)]


def test_a_failure_after_a_read_every_steps_flush_loses_nothing(tmp_path, monkeypatch) -> None:
    """The failure's ``write_deferred`` runs at ``global_step``, the last step taken: where
    that step was a READ_EVERY-th one, ``on_flush`` already ran there (in ``_write_step``)
    and is skipped, so a callback's values of the failing step are lost (README: "after a
    failure ... a failed run loses none"). With READ_EVERY=1000 the same run writes
    ``mine/loss`` at steps 1-5; with READ_EVERY=4, step 5's is lost."""
    monkeypatch.setattr(trainer.loop, "READ_EVERY", 4)
    cb = KeepsOwnValues(fail_at=5)
    with pytest.raises(RuntimeError, match="failed in step 5"):
        train(tmp_path, *FLUSH_RUN, "trainer.max_steps=8", callbacks=[cb])
    unread = [(tag, step) for tag, step, _ in cb.kept]
    assert not unread, f"lost: {unread}"
    assert [s for s, _ in read_scalars(tmp_path)["mine/loss"]] == [1, 2, 3, 4, 5]


class PassesItsOptionsOn(nn.Module):
    """A model of one's own with a bug: it reads ``width`` from ``**options`` but passes
    ``options`` on to ``nn.Module.__init__`` (meant: ``super().__init__()``)."""

    def __init__(self, in_dim: int = 4, out_dim: int = 3, **options) -> None:
        super().__init__(**options)  # the bug, where the traceback points
        self.fc = nn.Linear(in_dim, options.get("width", 8))


def test_a_keyword_refused_through_ones_own_bug_keeps_its_traceback() -> None:
    """``components.build`` marks every refused-key ConfigError ``whole_story`` and
    ``own_refusal`` then prints it as one line: also where the key is one's own (in one's own
    YAML or ``+model.width=16``, no built-in preset has it) and the refusal comes from one's
    own ``super().__init__(**options)``. The message then says the class "takes no 'width'"
    (it does: it reads it) and suggests a preset mix-up, and the traceback that points at
    the buggy line is dropped (before the commit it was kept)."""
    from trainer.components import build
    from trainer.config import ConfigError
    from trainer.sweep import own_refusal

    with pytest.raises(ConfigError, match=r"model\.width") as refused:
        build("model", {"_target_": f"{__name__}.PassesItsOptionsOn", "width": 16})
    assert not own_refusal(refused.value), (
        "a key that is one's own, refused inside one's own __init__, printed as one line "
        "without the traceback to the bug"
    )


def test_a_copy_kept_on_the_model_trains_as_without_it_also_with_a_regularizer(tmp_path) -> None:
    """README, "Replacing parameters": "A copy kept on the model outside the forward (an
    EMA's) gets no gradient and trains on as without it." With a regularizer (``include:
    ["*"]``, the presets'), the regularizers select again among the parameters trainable now,
    the copy's weights included: the penalty gives them a gradient, and the run is refused
    at step 1 ("a new tensor set on the model ... has a gradient at step 1, and the optimizer
    does not hold it")."""

    class KeepsCopy(Callback):
        def on_fit_start(self, trainer) -> None:
            trainer.model.ema = copy.deepcopy(trainer.model.head)

    steps = [*STEPS, "regularizer=[l2]", "instrument=none"]
    train(tmp_path / "copy", *steps, callbacks=[KeepsCopy()])
    train(tmp_path / "plain", *steps)
    a, b = read_scalars(tmp_path / "copy"), read_scalars(tmp_path / "plain")
    for tag in b:
        if not tag.startswith("time/") and "per_sec" not in tag:
            assert a[tag] == b[tag], tag


class ReplaceThenHandOver(Callback):
    """After step 2: a fresh head set on the model, the old head's tensors taken out of the
    optimizer; the new head given to the optimizer (``add_param_group``) in the next step's
    ``on_train_batch_start``, before its forward, backward and update."""

    def on_train_step_end(self, trainer, out) -> None:
        if out.step == 2:
            new_head(trainer, hand_over=False)

    def on_train_batch_start(self, trainer, batch) -> None:
        if trainer.global_step + 1 == 3:
            trainer.optimizer.add_param_group({"params": list(trainer.model.head.parameters())})
            self.handed_over = {id(p) for p in trainer.model.head.parameters()}


def test_a_new_head_the_optimizer_holds_at_the_update_is_not_refused(tmp_path) -> None:
    """``_refuse_unheld`` reads ``_unowned``, made when the replacement was followed (the
    first micro-batch of step 3, before ``on_train_batch_start``), not the optimizer's groups
    at the update: the head, held by the optimizer since before step 3's forward, is refused
    at step 3 as one "the optimizer does not hold" (and is trained when not refused)."""
    cb = ReplaceThenHandOver()
    train(tmp_path, *STEPS, "instrument=none", callbacks=[cb])
    assert cb.handed_over
