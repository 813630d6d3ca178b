"""The callback API: hooks, what a callback keeps, what the run says of it (a probe's
findings, 2026-12-07)."""

from __future__ import annotations

import json
import logging
import signal

import pytest
import torch
from conftest import final_params, train

from trainer.callbacks import Callback
from trainer.run import Interrupted

SMALL = ["trainer.max_epochs=2", "data.batch_size=256", "logging.every_n_steps=2"]


class _Kept(Callback):
    """A callback with state whose ``state_dict`` fails from step 4 on (a bug of one's own)."""

    def __init__(self) -> None:
        self.step = 0

    def on_train_step_end(self, trainer, out) -> None:
        self.step = out.step

    def state_dict(self):
        if self.step >= 4:
            raise KeyError("oops")
        return {"step": self.step}


def test_a_failing_state_dict_is_recorded_as_its_callbacks(tmp_path):
    """A callback's ``state_dict()`` raising at a periodic checkpoint: the error recorded (the
    raised error's notes, ``metrics.json``'s ``error``) names that callback, as a hook's error
    names its callback and hook. It named the trainer's own ``PeriodicCheckpoints`` alone:
    ``KeyError: 'oops' (in PeriodicCheckpoints.on_rest_point)``."""
    with pytest.raises(KeyError) as raised:
        train(tmp_path, *SMALL, "trainer.checkpoint.every_n_steps=2", callbacks=[_Kept()])
    recorded = json.loads((tmp_path / "metrics.json").read_text())
    assert (recorded["status"], recorded["error"]) == (
        "failed", "KeyError: 'oops' (in _Kept.state_dict) (in PeriodicCheckpoints.on_rest_point)"
    )  # fmt: skip
    assert raised.value.__notes__[0] == "(in _Kept.state_dict)"


class _Loads(Callback):
    def on_train_step_end(self, trainer, out) -> None:
        pass

    def state_dict(self):
        return {"n": 1}


class _LoadsBadly(_Loads):
    """The same callback, its ``load_state_dict`` with a bug (a key it never wrote)."""

    def load_state_dict(self, state) -> None:
        self.n = state["count"]


_LoadsBadly.__name__ = _LoadsBadly.__qualname__ = "_Loads"  # (the checkpoint's class name)


def test_a_failing_load_state_dict_names_its_callback(tmp_path):
    """A callback's ``load_state_dict`` raising on a resume is said as the checkpoint's fault,
    ``checkpoint .../step_000000006.pt does not fit this run: 'count'``, naming neither the
    callback nor its method."""
    common = ["trainer.max_epochs=1", "data.batch_size=256", "trainer.run_id=q"]
    train(tmp_path, *common, callbacks=[_Loads()])
    with pytest.raises(KeyError, match=r"^'count'\n") as raised:
        train(tmp_path, *common, "trainer.max_epochs=2", "trainer.resume=auto",
              callbacks=[_LoadsBadly()])  # fmt: skip
    assert raised.value.__notes__[0] == "(in _Loads.load_state_dict)"


class _Curriculum(Callback):
    """A per-epoch loss weight (the gradient scaled by it), set where each epoch starts: the
    epoch says what it is, nothing to keep."""

    def __init__(self, stop_at: int | None = None) -> None:
        self.scale, self.stop_at, self.epochs = 1.0, stop_at, []

    def on_train_epoch_start(self, trainer, epoch) -> None:
        self.epochs.append(epoch)
        self.scale = 1.0 + 2.0 * epoch

    def on_after_backward(self, trainer, batch, losses, weights) -> None:
        for p in trainer.params:
            if p.grad is not None:
                p.grad.mul_(self.scale)

    def on_train_step_end(self, trainer, out) -> None:
        if out.step == self.stop_at:
            trainer.stop_signal = signal.SIGTERM


def test_a_run_resumed_mid_epoch_starts_its_epoch_for_the_callbacks(tmp_path):
    """``on_train_epoch_start(trainer, epoch)`` fires "each epoch"; a run resumed mid-epoch
    (stopped at step 5 of 6, epoch 1) never fires it for the epoch it trains in, so a
    callback that sets a per-epoch value there (a curriculum's loss weight) trains the rest of
    that epoch with its initial value: another run than the uninterrupted one, unsaid."""
    common = [*SMALL, "trainer.run_id=c", "optimizer=sgd", "data.batch_size=512"]
    train(tmp_path / "full", *common, callbacks=[_Curriculum()])
    with pytest.raises(Interrupted):
        train(tmp_path / "part", *common, callbacks=[_Curriculum(stop_at=5)])
    resumed = _Curriculum()
    train(tmp_path / "part", *common, "trainer.resume=auto", callbacks=[resumed])
    assert resumed.epochs == [1]
    a, b = final_params(tmp_path / "full"), final_params(tmp_path / "part")
    assert all(torch.equal(a[k], b[k]) for k in a)


class _ChecksOnly(Callback):
    """A callback that only refuses a setting before the run (check_before_fit)."""

    def __init__(self) -> None:
        self.checked = 0

    def check_before_fit(self, trainer) -> None:
        self.checked += 1


def test_a_check_only_callback_is_not_said_to_be_never_called(tmp_path, caplog):
    """The loop calls ``check_before_fit``; a callback overriding only it was warned "overrides
    none of the hooks (trainer.callbacks.Callback), so the loop never calls it"."""
    cb = _ChecksOnly()
    with caplog.at_level(logging.WARNING):
        train(tmp_path, "trainer.max_epochs=1", "data.batch_size=512", callbacks=[cb])
    assert cb.checked >= 1
    assert "never calls it" not in caplog.text, caplog.text
