"""A review of the README sentences added 2026-12-07: "A run refused before its first step (a
changed config, a disk without room for a checkpoint, a state a checkpoint cannot hold) leaves
the run it would continue, or the earlier run in its folder, as it was". A refusal of the
config raised as the fit starts (an instrument's ``on_fit_start``: ``instrument.per_sample.
units`` naming no module, a key a resume may change) comes after the files are moved."""

from __future__ import annotations

import pytest
from conftest import read_scalars, train

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
