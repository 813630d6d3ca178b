"""A review of the README sentences added 2026-12-07: "A run refused before its first step (a
changed config, a disk without room for a checkpoint, a state a checkpoint cannot hold) leaves
the run it would continue, or the earlier run in its folder, as it was". A refusal of the
config raised as the fit starts (an instrument's ``on_fit_start``: ``instrument.per_sample.
units`` naming no module, a key a resume may change) comes after the files are moved."""

from __future__ import annotations

import pytest
from conftest import read_scalars, train

from trainer.callbacks import Callback
from trainer.config import ContractError

BASE = ("trainer.device=cpu", "logging.progress=false", "model.hidden=[16]",
        "data.batch_size=64", "trainer.run_id=x", "trainer.checkpoint.every_n_steps=5",
        "trainer.max_steps=15", "logging.every_n_steps=1")  # fmt: skip
TYPO = ("instrument.per_sample.every_n_steps=1", "instrument.per_sample.units=[nosuch]")


def _files(folder) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes()
            for p in sorted(folder.rglob("*")) if p.is_file()}  # fmt: skip


def test_a_resume_refused_for_a_per_sample_unit_pattern_leaves_the_run_as_it_was(tmp_path):
    base = (*BASE, f"trainer.checkpoint.search_dir={tmp_path}")
    run_dir = tmp_path / "a"
    train(run_dir, *base)
    checkpoints = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    steps = [s for s, _ in read_scalars(run_dir)["train/loss"]]
    metrics = (run_dir / "metrics.json").read_text()
    with pytest.raises(ValueError, match="instrument.per_sample.units"):
        train(tmp_path / "job", *base, *TYPO,
              f"trainer.resume={run_dir}/checkpoints/step_000000005.pt")  # fmt: skip
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == checkpoints
    assert [s for s, _ in read_scalars(run_dir)["train/loss"]] == steps
    assert (run_dir / "metrics.json").read_text() == metrics


def test_a_new_run_refused_for_a_per_sample_unit_pattern_leaves_a_used_run_dir_as_it_was(
    tmp_path,
) -> None:
    named = (*BASE[:-2], f"trainer.checkpoint.search_dir={tmp_path}", "trainer.max_steps=5")
    train(tmp_path, *named)
    before = _files(tmp_path)
    with pytest.raises(ValueError, match="instrument.per_sample.units"):
        train(tmp_path, *named, "optimizer.lr=0.01", *TYPO)
    assert not (tmp_path / "previous").exists()
    assert _files(tmp_path).keys() == before.keys()


class _FlagNamedCheck(Callback):
    """A callback of one's own (written before check_before_fit existed) with a setting of
    that name: not a method."""

    def __init__(self) -> None:
        self.check_before_fit = True  # (its own switch: check the batch before the fit)

    def on_train_step_end(self, trainer, out) -> None:  # noqa: ARG002
        pass


def test_a_callback_attribute_named_check_before_fit_is_no_unexplained_type_error(
    tmp_path,
) -> None:
    """``Trainer.check_states`` calls whatever ``getattr(cb, "check_before_fit")`` is: a
    callback of one's own holding a flag of that name stopped the run with torch-less
    "TypeError: 'bool' object is not callable", naming neither the callback nor the name
    (the hooks' own checks refuse such a flag naming it, or the loop leaves it alone)."""
    with pytest.raises(ContractError, match=r"^callback _FlagNamedCheck: check_before_fit is a "
                       r"bool, and the trainer calls check_before_fit\(trainer\) before a fit "
                       r"\(trainer.callbacks.Callback\): rename that attribute"):  # fmt: skip
        train(tmp_path, *BASE[:-3], "trainer.max_steps=2", callbacks=[_FlagNamedCheck()])
