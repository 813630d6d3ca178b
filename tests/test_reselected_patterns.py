"""Regularizer patterns at the trainer's re-selection mid-run (``bind(..., empty_ok=True)``):
a probe's, 2026-12-07."""

from __future__ import annotations

import pytest
from conftest import train
from torch.nn.utils import prune

from trainer.callbacks import Callback


class _PruneAt(Callback):
    """Registers pruning on the MLP's head after step 1 (torch renames ``net.3.weight`` to
    ``net.3.weight_orig``, the same Parameter), and records each step's selection."""

    def __init__(self) -> None:
        self.selected: dict[int, list[str]] = {}

    def on_train_step_end(self, trainer, out) -> None:
        self.selected[out.step] = list(trainer.objective.regularizers[0].names)
        if out.step == 1:
            prune.identity(trainer.model.net[3], "weight")


def test_an_exclude_pattern_a_rename_mid_run_leaves_matching_nothing_is_not_dropped_unsaid(
    tmp_path,
) -> None:
    """``regularizer.l2.exclude=[net.3.weight]`` leaves the head out; pruning registered at
    step 1 (a rename the trainer follows: "the model's parameters renamed") makes the pattern
    match no parameter, which ``bind`` refuses when the trainer is built, but the re-selection
    binds with ``empty_ok=True``, which skips the check: the head meant to be left out is
    regularized from step 2, unsaid (the defect the exclude refusal was added for)."""
    cb = _PruneAt()
    with pytest.raises(ValueError, match=r"^regularizer.l2.exclude: \['net.3.weight'\] matches "
                       r"no parameter of the model since the model's parameters changed mid-run "
                       r"\(renamed: prune's weight_orig"):  # fmt: skip
        train(
            tmp_path,
            "trainer.device=cpu",
            "logging.progress=false",
            "model.hidden=[16]",
            "data.batch_size=64",
            "trainer.max_steps=3",
            "instrument=none",
            "regularizer=[l2]",
            "regularizer.l2.exclude=[net.3.weight]",
            callbacks=[cb],
        )
    assert cb.selected == {1: ["net.1.weight"]}  # (the head never regularized)
