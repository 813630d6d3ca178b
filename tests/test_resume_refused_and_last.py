"""A run resumed from an earlier checkpoint: what it leaves of the run it continues when it
is refused before its first step (the run as it was), and the completed run's ``last.pt``
(set aside with the stretch it ended, or gone where the run trains on past it): a probe's
findings, 2026-12-07."""

from __future__ import annotations

import json

import pytest
from conftest import StopAt, train

from trainer.callbacks import Callback
from trainer.checkpoint import load_checkpoint

BASE = ("trainer.device=cpu", "logging.progress=false", "model.hidden=[16]",
        "data.batch_size=64", "trainer.run_id=x", "trainer.checkpoint.every_n_steps=5",
        "trainer.max_steps=15")  # fmt: skip


def test_a_resume_from_an_earlier_step_does_not_leave_the_abandoned_last_pt(tmp_path) -> None:
    base = ("trainer.device=cpu", "logging.progress=false", "model.hidden=[16]",
            "data.batch_size=64", "trainer.run_id=x", f"trainer.checkpoint.search_dir={tmp_path}",
            "trainer.checkpoint.every_n_steps=5", "trainer.max_steps=15")  # fmt: skip
    run_dir = tmp_path / "a"
    train(run_dir, *base)  # completed: step_5, step_10, step_15 = last.pt
    resume = f"trainer.resume={run_dir}/checkpoints/step_000000005.pt"
    with pytest.raises(SystemExit):  # resumed from step 5, stopped at step 8
        train(tmp_path / "job", *base, resume, callbacks=[StopAt(8)])
    ckpts = run_dir / "checkpoints"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["status"] == "interrupted" and metrics["step"] == 8
    assert sorted(p.name for p in (ckpts / "abandoned").iterdir()) == [
        "step_000000010.pt", "step_000000015.pt"]  # fmt: skip
    # last.pt must not present the abandoned trajectory's step 15 as this run's last checkpoint
    last = ckpts / "last.pt"
    assert not last.exists()  # (its second name of step 15's file, which abandoned/ holds)
    # and the hint for a folder given as a checkpoint names the newest one, step 8
    with pytest.raises(IsADirectoryError, match="step_000000008.pt"):
        load_checkpoint(run_dir)


def test_a_resume_refused_for_disk_space_leaves_the_run_it_resumes_as_it_was(
    tmp_path, monkeypatch
) -> None:
    """The free-space check is "an error before training", but it runs after the resume has
    set the later checkpoints aside, deleted the later TensorBoard events and it then records
    the refusal over the completed run's metrics.json."""
    import collections
    import importlib

    from conftest import read_scalars

    run_module = importlib.import_module("trainer.run")
    base = ("trainer.device=cpu", "logging.progress=false", "model.hidden=[16]",
            "data.batch_size=64", "trainer.run_id=x", f"trainer.checkpoint.search_dir={tmp_path}",
            "trainer.checkpoint.every_n_steps=5", "trainer.max_steps=15",
            "logging.every_n_steps=1")  # fmt: skip
    run_dir = tmp_path / "a"
    train(run_dir, *base)
    metrics = (run_dir / "metrics.json").read_text()
    steps = [s for s, _ in read_scalars(run_dir)["train/loss"]]
    assert steps == list(range(1, 16))
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(run_module.shutil, "disk_usage", lambda path: usage(2**40, 0, 1000))
    resume = f"trainer.resume={run_dir}/checkpoints/step_000000005.pt"
    with pytest.raises(OSError, match="free"):
        train(tmp_path / "job", *base, resume)
    monkeypatch.undo()
    # refused before training: the run it would have continued is as it was
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("step_*.pt")) == [
        "step_000000005.pt", "step_000000010.pt", "step_000000015.pt"]  # fmt: skip
    assert [s for s, _ in read_scalars(run_dir)["train/loss"]] == steps
    assert (run_dir / "metrics.json").read_text() == metrics


class Unsaveable(Callback):
    """A callback of one's own whose state a checkpoint cannot hold."""

    def state_dict(self):
        return {"thing": object()}


def test_a_resume_refused_for_a_callbacks_state_leaves_the_run_it_resumes_as_it_was(
    tmp_path,
) -> None:
    """The same for the refusal of a state a checkpoint cannot hold, "before its first step":
    it came after the later checkpoints were set aside and their events dropped."""
    from conftest import read_scalars

    base = (*BASE, f"trainer.checkpoint.search_dir={tmp_path}", "logging.every_n_steps=1")
    run_dir = tmp_path / "a"
    train(run_dir, *base)
    metrics = (run_dir / "metrics.json").read_text()
    scalars = read_scalars(run_dir)
    with pytest.raises(ValueError, match="callback Unsaveable: its state_dict"):
        train(tmp_path / "job", *base, f"trainer.resume={run_dir}/checkpoints/step_000000005.pt",
              callbacks=[Unsaveable()])  # fmt: skip
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == [
        "last.pt", "run.json", "step_000000005.pt", "step_000000010.pt",
        "step_000000015.pt"]  # fmt: skip
    assert read_scalars(run_dir) == scalars
    assert (run_dir / "metrics.json").read_text() == metrics


@pytest.mark.parametrize("step_file", [True, False], ids=["with_its_step_file", "last_pt_only"])
def test_a_completed_run_resumed_to_train_longer_leaves_no_stale_last_pt(
    tmp_path, step_file
) -> None:
    """``resume=auto`` continues a completed run at its step 15 (its step file, or, where
    that was deleted, its ``last.pt``); trained on to step 20 and stopped at 18, the run's
    latest is step 18, not the ``last.pt`` of step 15 that outranked it. The step-15
    checkpoint stays (under its step name: ``last.pt`` becomes it where the step file was
    deleted), and metrics.json names a checkpoint that exists."""
    base = (*BASE, f"trainer.checkpoint.search_dir={tmp_path}")
    run_dir = tmp_path / "a"
    train(run_dir, *base)
    ckpts = run_dir / "checkpoints"
    if not step_file:
        (ckpts / "step_000000015.pt").unlink()
    with pytest.raises(SystemExit):
        train(run_dir, *base[:-1], "trainer.max_steps=20", "trainer.resume=auto",
              f"trainer.checkpoint.search_dir={tmp_path}", callbacks=[StopAt(18)])  # fmt: skip
    assert not (ckpts / "last.pt").exists()
    assert load_checkpoint(ckpts / "step_000000015.pt")["step"] == 15
    assert load_checkpoint(ckpts / "step_000000018.pt")["step"] == 18
    with pytest.raises(IsADirectoryError, match="step_000000018.pt"):
        load_checkpoint(run_dir)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["status"] == "interrupted" and metrics["step"] == 18
    assert metrics["checkpoint"] == str((ckpts / "step_000000018.pt").resolve())
