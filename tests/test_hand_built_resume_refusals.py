"""A Trainer built by hand, stopped and resumed through ``state_dict`` / ``load_state_dict``
(a probe's, 2026-12-08): the checkpoint of another data position's meaning (batch size,
shuffle seed, accumulation) or of another weighting was taken without a word; refused or said
now."""

from __future__ import annotations

import logging
import signal

import pytest
import torch
from torch import nn

from trainer.callbacks import Callback
from trainer.data.base import InMemoryLoader, TensorSplit
from trainer.loop import Trainer
from trainer.losses import CrossEntropy
from trainer.weighting import Weighting

CPU = torch.device("cpu")


class _EmaWeighting(Weighting):
    """A weighting of one's own with state: r = 1 + (loss > running mean of batch means)."""

    def __init__(self) -> None:
        super().__init__()
        self.ema: torch.Tensor | None = None

    def raw(self, losses, logits, targets, indices):
        m = losses.detach().mean()
        self.ema = m.clone() if self.ema is None else 0.7 * self.ema + 0.3 * m
        return 1.0 + (losses.detach() > self.ema).to(losses.dtype)

    def state_dict(self):
        return {"ema": self.ema}

    def load_state_dict(self, state) -> None:
        self.ema = state["ema"]


class _StopAt(Callback):
    """Requests a stop after step ``at`` and keeps the trainer's state at that rest point."""

    def __init__(self, at: int) -> None:
        self.at, self.state = at, None

    def on_train_step_end(self, trainer, out) -> None:
        if trainer.global_step == self.at:
            trainer.stop_signal = int(signal.SIGTERM)

    def on_rest_point(self, trainer) -> None:
        if trainer.stopped_by is not None:
            self.state = trainer.state_dict()


def _trainer(batch_size=6, seed=3, accumulate=3, weighting=None, callbacks=()) -> Trainer:
    g = torch.Generator().manual_seed(0)
    split = TensorSplit(torch.randn(40, 4, generator=g), torch.randint(3, (40,), generator=g))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    return Trainer(
        model, torch.optim.SGD(model.parameters(), lr=0.1),
        InMemoryLoader(split, batch_size, CPU, shuffle=True, seed=seed),
        InMemoryLoader(split, 8, CPU, shuffle=False), criterion=CrossEntropy(), device=CPU,
        weighting=weighting, accumulate_grad_batches=accumulate, max_epochs=2,
        callbacks=callbacks,
    )  # fmt: skip


def _stopped(at: int, **kw) -> dict:
    stop = _StopAt(at)
    _trainer(callbacks=[stop], **kw).fit()
    assert stop.state is not None
    return stop.state


@pytest.mark.parametrize("changed", [{"batch_size": 5}, {"seed": 4}])
def test_a_checkpoint_of_another_batch_size_or_data_order_is_refused_naming_it(changed) -> None:
    """Stopped mid-epoch (step 2 of 3: 6 of 7 batches of 6 trained), the checkpoint keeps
    ``batch_in_epoch`` = 6, a position that means "the first 36 samples of epoch 0's
    permutation under seed 3". ``load_state_dict`` takes it into a Trainer whose loader cuts
    batches of 5 (it then starts the epoch's rest at sample 30: six samples trained twice) or
    draws another permutation (seed 4: the rest of the epoch is another order's, some samples
    twice, others never), without a word, as it refuses a split of another size for the same
    reason (``train_samples``). Refused now, naming what differs."""
    state = _stopped(2)
    resumed = _trainer(**changed)
    with pytest.raises(ValueError) as e:
        resumed.load_state_dict(state)
    (key, before), after = next(iter(changed.items())), {"batch_size": 6, "seed": 3}
    name = "global_batch_size" if key == "batch_size" else key
    assert str(e.value) == (
        f"the checkpoint's position in its epoch (batch 6) was saved with {name}="
        f"{after[key]}, this run has {name}={before}: the rest of the epoch would train other "
        "samples (some twice, some never) or other windows; resume with the checkpoint's "
        "settings, or start a new run"
    )
    _trainer().load_state_dict(state)  # (the same settings: taken)


def test_a_checkpoint_of_another_accumulation_is_refused_naming_it() -> None:
    """Stopped after step 1 of ``accumulate_grad_batches=3`` (batch_in_epoch 3), resumed in a
    Trainer accumulating 4: the resumed epoch's windows are batches 3-6, which neither run has
    (accumulating 4 from the start: 0-3 and 4-6), and the step count goes on from the other
    run's, unsaid (``trainer.run`` refuses the change as a changed config)."""
    state = _stopped(1)
    resumed = _trainer(accumulate=4)
    with pytest.raises(ValueError) as e:
        resumed.load_state_dict(state)
    assert str(e.value).startswith(
        "the checkpoint's position in its epoch (batch 3) was saved with "
        "accumulate_grad_batches=3, this run has accumulate_grad_batches=4:"
    ), str(e.value)


def test_a_weightings_state_no_part_of_the_resumed_run_takes_is_said(caplog) -> None:
    """A checkpoint holding a stateful weighting's state (``objective.weighting``), loaded
    into a Trainer with no weighting (scalar mode), drops that state without a word; a
    callback's state no callback takes is warned of, naming it (README, "Callbacks"). The
    objective's parts were kept by key alone (``weighting``), not by class, so another stateful
    weighting with the same keys would take it as its own, too: refused now."""
    state = _stopped(2, weighting=_EmaWeighting())
    assert state["objective"]["weighting"]["ema"] is not None
    resumed = _trainer()
    with caplog.at_level(logging.WARNING, logger="trainer"):
        resumed.load_state_dict(state)
    said = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert (
        f"the checkpoint's state of weighting {__name__}._EmaWeighting is not taken by this "
        "run, which has no such part: dropped"
    ) in said, said
    with pytest.raises(ValueError) as e:
        _trainer(weighting=_OtherEma()).load_state_dict(state)
    assert str(e.value) == (
        f"the checkpoint's weighting state is a {__name__}._EmaWeighting's, and this run's "
        f"weighting is a {__name__}._OtherEma: resume with the checkpoint's weighting, or "
        "start a new run"
    )


class _OtherEma(_EmaWeighting):
    """Another weighting keeping the same keys."""
