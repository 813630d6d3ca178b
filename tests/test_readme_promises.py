"""README promises of "Callbacks", "Bring your own" and "What a run writes" checked against what
the trainer does (a probe's findings, 2026-12-07: on_flush's cadence, a preset key refused by a
data module that passes **common on, a loader key a data module swallows)."""

from __future__ import annotations

import pytest
import torch
from conftest import train

import trainer.loop
from trainer.callbacks import Callback
from trainer.config import ConfigError
from trainer.data.base import DataModule, TensorSplit


class FlushSteps(Callback):
    """Records the steps at which ``on_flush`` fires."""

    def __init__(self) -> None:
        self.steps: list[int] = []

    def on_train_step_end(self, trainer, out) -> None:  # (a device value of its own, unread)
        pass

    def on_flush(self, trainer) -> None:
        self.steps.append(trainer.global_step)


def test_on_flush_fires_every_read_every_steps_at_the_latest(tmp_path, monkeypatch) -> None:
    """README, "Callbacks": ``on_flush`` fires "when the values measured on steps that did not
    log are written (every 1,000 steps at the latest, ...)", so that a callback keeping unread
    device values of its own writes them there. The loop only counts the steps that staged
    something (``len(self.staging.deferred) >= READ_EVERY``): with nothing staged between
    logging steps (``instrument=none``, or the defaults' norms on the logging cadence) and a
    logging cadence longer than READ_EVERY, ``on_flush`` is never called until the end (a
    probe: 2,300 steps with ``logging.every_n_steps=3000`` flushed once, at step 2,300).
    READ_EVERY is made 4 here so the test is short; the promise is the same."""
    monkeypatch.setattr(trainer.loop, "READ_EVERY", 4)
    cb = FlushSteps()
    train(
        tmp_path, "data=synthetic", "data.num_train=80", "data.num_val=16", "data.shape=[4]",
        "data.batch_size=8", "model.hidden=[4]", "instrument=none", "trainer.max_steps=10",
        "logging.every_n_steps=100", "trainer.checkpoint.every_n_steps=0", callbacks=[cb],
    )  # fmt: skip
    # (by step number, so a resumed run and every rank flush where the uninterrupted run does:
    # at 4 and 8, not 1, 5, 9, whose gaps are as short; and at the last step)
    assert cb.steps == [4, 8, 10], f"on_flush fired at steps {cb.steps} (READ_EVERY=4)"


class ForwardsCommon(DataModule):
    """The README's data contract followed to the letter: ``**common`` passed on."""

    def __init__(self, n: int = 40, **common) -> None:
        super().__init__(**common)
        self.n = n

    def load(self):
        x, y = torch.randn(self.n, 4), torch.arange(self.n) % 3
        return TensorSplit(x[:32], y[:32]), TensorSplit(x[32:], y[32:])


def test_a_preset_key_refused_by_a_contract_following_data_module_is_a_one_line_error() -> None:
    """README, "Bring your own": ``data._target_=my.Data`` on the digits preset names the
    preset's key it refuses (``data.val_fraction: my.Data takes no 'val_fraction'``), and
    "What a run writes": a component refused while it is built ends a single run with that
    message, ``Error: ...``, without a traceback. For a DataModule that passes ``**common``
    on to ``super().__init__`` as the contract asks, the TypeError is raised in the user's
    ``__init__`` frame (at the ``super()`` call), so ``own_refusal`` takes the refusal for one
    caused by one's own code and the CLI prints Hydra's 50-line traceback, the message last."""
    from conftest import make_cfg

    from trainer.components import build
    from trainer.sweep import own_refusal

    node = make_cfg(f"data._target_={__name__}.ForwardsCommon").data  # (the digits preset's)
    with pytest.raises(ConfigError, match=r"data\.(\w+): \S*ForwardsCommon takes no "
                       r"'\1'") as refused:  # fmt: skip
        build("data", node)
    assert own_refusal(refused.value), "the trainer's refusal keeps a traceback on the CLI"


class KeepsBatchSize(DataModule):
    """Takes ``batch_size`` by name (to size something of its own) and passes the rest of
    ``**common`` on: the loader's batch size is then DataModule's default, 64."""

    num_classes = 3

    def __init__(self, n: int = 80, batch_size: int = 64, **common) -> None:
        super().__init__(**common)
        self.n = n

    def load(self):
        g = torch.Generator().manual_seed(0)
        x, y = torch.randn(self.n + 16, 4, generator=g), torch.arange(self.n + 16) % 3
        return TensorSplit(x[: self.n], y[: self.n]), TensorSplit(x[self.n :], y[self.n :])


def test_a_loader_key_a_data_module_does_not_pass_on_is_named_or_used(tmp_path) -> None:
    """README, "Bring your own" (Data): take ``**common`` and pass it to
    ``super().__init__(**common)`` ("an ``__init__`` that does not is named"). One that
    takes a loader key by name and does not pass it on trains with DataModule's default
    instead, unsaid: ``data.batch_size=16`` on 80 samples trained 2 steps an epoch (batch 64)
    where 5 were configured, and HParams records 16."""
    from trainer.config import ContractError

    with pytest.raises(ContractError, match=r"data.batch_size: the config gives 16, and the "
                       r"built KeepsBatchSize holds 64: its __init__ takes batch_size and does "
                       r"not pass it on"):  # fmt: skip
        train(
            tmp_path, "~data", f"+data._target_={__name__}.KeepsBatchSize",
            "+data.batch_size=16", "trainer.max_epochs=1", "instrument=none",
        )  # fmt: skip
