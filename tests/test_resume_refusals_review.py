"""A review's findings on the resume fixes of 2026-12-07: what a run refused before its first
step leaves of a used folder, what repeated resumes keep in abandoned/, and a completed run's
last.pt whose step file is gone (each failed before its fix)."""

from __future__ import annotations

import hashlib
import json

import pytest
from conftest import train

from trainer.callbacks import Callback
from trainer.checkpoint import load_checkpoint

BASE = ("trainer.device=cpu", "logging.progress=false", "model.hidden=[16]",
        "data.batch_size=64", "trainer.run_id=x", "trainer.checkpoint.every_n_steps=5",
        "trainer.max_steps=15", "logging.every_n_steps=1")  # fmt: skip


def _digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_resuming_twice_from_the_same_step_keeps_both_abandoned_stretches(tmp_path) -> None:
    """Resumed from step 5 twice (each resumed run completed), the first abandoned stretch's
    step 10 and step 15 were overwritten in checkpoints/abandoned/ by the second's (os.replace
    onto the same names): a completed trajectory's checkpoints silently lost. The second
    stretch goes to abandoned/2/ now."""
    base = (*BASE, f"trainer.checkpoint.search_dir={tmp_path}")
    run_dir = tmp_path / "a"
    ckpts = run_dir / "checkpoints"
    train(run_dir, *base)  # trajectory 1: steps 5, 10, 15
    first = {n: _digest(ckpts / n) for n in ("step_000000010.pt", "step_000000015.pt")}
    resume = f"trainer.resume={ckpts}/step_000000005.pt"
    train(tmp_path / "j1", *base, resume)  # trajectory 2 from step 5: 1's 10, 15 abandoned
    assert {n: _digest(ckpts / "abandoned" / n) for n in first} == first
    train(tmp_path / "j2", *base, resume)  # trajectory 3 from step 5: 2's 10, 15 abandoned
    assert {n: _digest(ckpts / "abandoned" / n) for n in first} == first  # (kept)
    assert sorted(p.name for p in (ckpts / "abandoned" / "2").iterdir()) == list(first)
    assert json.loads((run_dir / "metrics.json").read_text())["status"] == "completed"
    assert load_checkpoint(ckpts / "last.pt")["step"] == 15


def test_resume_auto_continues_a_completed_runs_last_pt_whose_step_file_is_gone(tmp_path) -> None:
    """A completed run keeps step 5, 10, 15 and last.pt (step 15); its step_15 file is deleted
    (space, a copy without it), last.pt kept. ``resume=auto`` ("the newest valid checkpoint of
    the run"; test_resume_refused_and_last's ``last_pt_only`` case says "resume=auto takes a
    completed run's last.pt ... where the step file was deleted, last.pt becomes it") took
    step 10 instead: find_checkpoints lists step_*.pt only, so steps 11-15 were trained again
    without a word and the real step-15 checkpoint went to abandoned/last.pt."""
    from conftest import StopAt

    base = (*BASE[:-2], f"trainer.checkpoint.search_dir={tmp_path}")
    run_dir = tmp_path / "a"
    ckpts = run_dir / "checkpoints"
    train(run_dir, *base, "trainer.max_steps=15")
    original = _digest(ckpts / "last.pt")
    (ckpts / "step_000000015.pt").unlink()
    with pytest.raises(SystemExit):
        train(run_dir, *base, "trainer.max_steps=20", "trainer.resume=auto",
              callbacks=[StopAt(18)])  # fmt: skip
    assert not (ckpts / "abandoned").exists(), "resumed from an older checkpoint"
    assert _digest(ckpts / "step_000000015.pt") == original  # (last.pt, under its step name)
    assert load_checkpoint(ckpts / "step_000000018.pt")["step"] == 18


class Unsaveable(Callback):
    """A callback of one's own whose state a checkpoint cannot hold (from the start)."""

    def state_dict(self):
        return {"thing": object()}


def _files(folder) -> dict:
    return {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_a_new_run_refused_for_a_callbacks_state_leaves_a_used_run_dir_as_it_was(
    tmp_path,
) -> None:
    """The resume's checks were moved before any file is moved; a run that is not a resume,
    started in a folder holding an earlier run (a fixed hydra.run.dir), is refused by the same
    check in fit, after the earlier run was set aside into previous/1 (its run.json made
    superseded.json): test_checkpoint_safety's "a run refused early in a used run dir leaves
    the earlier run as it was", and a later resume=auto of that run starts from scratch."""
    named = (*BASE[:-2], f"trainer.checkpoint.search_dir={tmp_path}", "trainer.max_steps=5")
    train(tmp_path, *named)
    before = _files(tmp_path)
    with pytest.raises(ValueError, match="callback Unsaveable: its state_dict"):
        train(tmp_path, *named, "optimizer.lr=0.01", callbacks=[Unsaveable()])
    assert not (tmp_path / "previous").exists()
    assert _files(tmp_path) == before


def test_a_new_run_refused_for_disk_space_leaves_a_used_run_dir_as_it_was(
    tmp_path, monkeypatch
) -> None:
    """The same for the free-space check of a run that is not a resume (run.py: after
    _set_aside_previous and write_run_marker)."""
    import collections
    import importlib

    run_module = importlib.import_module("trainer.run")
    named = (*BASE[:-2], f"trainer.checkpoint.search_dir={tmp_path}", "trainer.max_steps=5")
    train(tmp_path, *named)
    before = _files(tmp_path)
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(run_module.shutil, "disk_usage", lambda path: usage(2**40, 0, 1000))
    with pytest.raises(OSError, match="free"):
        train(tmp_path, *named, "optimizer.lr=0.01")
    monkeypatch.undo()
    assert not (tmp_path / "previous").exists()
    assert _files(tmp_path) == before
