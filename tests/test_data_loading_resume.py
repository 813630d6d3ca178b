"""Data loading options and exactness across a resume: eval_batch_size with workers, a training
split whose length changed, a worker that dies (a probe's findings, 2026-12-07)."""

from __future__ import annotations

import json
import logging
import os
import shutil

import pytest
import torch
from conftest import train
from torch.utils.data import Dataset, get_worker_info

from trainer.data.base import TensorSplit
from trainer.data.digits import DigitsData

TINY = ["data.batch_size=8", "instrument=none", "logging.every_n_steps=1", "model.hidden=[8]",
        "trainer.max_epochs=5", "trainer.checkpoint.every_n_steps=3",
        "trainer.checkpoint.keep_last=10"]  # fmt: skip


def _xy(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 4, generator=g)
    return x, (x[:, 0] > 0).long()


class Pairs(Dataset):
    def __init__(self, x, y, noise: float = 0.0):
        self.x, self.y, self.noise = x, y, noise

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        if self.noise:  # (augmentation: draws from torch's global generator)
            return self.x[i] + self.noise * torch.rand(4), self.y[i]
        return self.x[i], self.y[i]


class Small(DigitsData):
    """Two classes of 4-d inputs (the digits preset's keys accepted, unused)."""

    num_classes = 2
    n = 40

    def __init__(self, **digits) -> None:
        super().__init__(**digits)
        self.input_shape = None

    def load(self):
        x, y = _xy(80)
        return Pairs(x[: self.n], y[: self.n]), TensorSplit(x[60:], y[60:])


class AugmentedVal(Small):
    """Training and validation samples drawn with random noise (test-time augmentation)."""

    def load(self):
        x, y = _xy(80)
        return Pairs(x[:40], y[:40], 0.5), Pairs(x[60:], y[60:], 0.5)


def test_a_resume_changing_eval_batch_size_keeps_the_validation_or_says_it_differs(
    tmp_path, caplog
) -> None:
    """``data.eval_batch_size`` is among the keys a resume may change ("how data is loaded, not
    which": the loader paths give the same batches). With workers, a Dataset's draws are seeded
    per batch number, so another eval_batch_size draws other augmentations for the same
    samples: the resumed run's validation differs from the uninterrupted run's past any
    rounding of the mean (20 samples, float32), and nothing says so (a change of
    num_workers between 0 and more is warned of)."""
    data = [f"data._target_={__name__}.AugmentedVal", "data.num_workers=2", *TINY,
            "trainer.max_steps=8"]  # fmt: skip
    straight = train(tmp_path / "a", *data, "data.eval_batch_size=1024")
    shutil.copytree(tmp_path / "a", tmp_path / "r")
    step3 = tmp_path / "r" / "checkpoints" / "step_000000003.pt"
    with caplog.at_level(logging.WARNING):
        resumed = train(tmp_path / "b", *data, "data.eval_batch_size=7", f"trainer.resume={step3}")
    said = [r.getMessage() for r in caplog.records if "eval_batch_size" in r.getMessage()]
    assert said == [
        "resume: data.eval_batch_size 1024 -> 7: with workers, random draws of the validation "
        "Dataset (augmentation) are seeded per batch, so this run's validation draws differ "
        "from the checkpoint run's (validation data that draws nothing is not affected)"
    ]
    assert resumed["val/loss"] != straight["val/loss"]  # (what it says: they differ here)


def test_a_resume_of_a_training_split_whose_length_changed_is_refused_or_said(
    tmp_path, caplog, monkeypatch
) -> None:
    """The epoch's order is a permutation of range(len(train)) from (seed, epoch): a run
    resumed mid-epoch on a split of another length (a file that grew, the same config, the
    same run id) trains the rest of the epoch on another permutation's batches, some samples
    twice and others not at all in that epoch, and nothing says so (only a position past the
    new epoch's end is refused: loop.py's "another data set or batch size?")."""
    data = [f"data._target_={__name__}.Small", "data.num_workers=0", *TINY, "trainer.max_steps=8"]
    train(tmp_path / "a", *data)
    step3 = tmp_path / "a" / "checkpoints" / "step_000000003.pt"
    monkeypatch.setattr(Small, "n", 48)  # 5 batches of 8 -> 6: position 3 is within both
    with pytest.raises(
        ValueError,
        match=r"does not fit this run: its training split had 40 "
        r"samples, this run's has 48 \(the same config: a data file rewritten",
    ):
        train(tmp_path / "b", *data, f"trainer.resume={step3}")  # fmt: skip


class ExitsInWorker(Pairs):
    def __getitem__(self, i: int):
        if i == 5 and get_worker_info() is not None:
            os._exit(3)  # (a native crash in a decoder, say)
        return super().__getitem__(i)


class WorkerDies(Small):
    def load(self):
        x, y = _xy(80)
        return ExitsInWorker(x[:40], y[:40]), TensorSplit(x[60:], y[60:])


def test_a_worker_that_dies_is_named_with_its_data_set(tmp_path) -> None:
    """A Dataset's raised error names the sample and the data set; a worker that dies (exit
    code 3, a segfault in native code) is reported in torch's words alone, "DataLoader worker
    (pid(s) N) exited unexpectedly": no data set, no batch, no exit code."""
    data = [f"data._target_={__name__}.WorkerDies", "data.num_workers=1", *TINY,
            "trainer.max_steps=8", "data.train_subset=0"]  # fmt: skip
    with pytest.raises(RuntimeError) as info:
        train(tmp_path, *data)
    said = ("(a worker loading ExitsInWorker for this loader died: a crash in native code its "
            "__getitem__ calls, the memory it was given, or os._exit; data.num_workers=0 loads "
            "in this process, where the error shows)")  # fmt: skip
    assert info.value.__notes__[0] == said
    recorded = json.loads((tmp_path / "metrics.json").read_text())["error"]
    assert recorded.startswith("RuntimeError: DataLoader worker (pid(s) ") and said in recorded
