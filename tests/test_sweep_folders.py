"""Sweep folders a sweep's report and summary must follow: a job continued by a later
sweep, jobs in nested folders or one folder, run numbers in a reused folder (a probe's
findings, 2026-12-07)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, in_background

from trainer import report

BASIC = "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"


def _job(root: Path, name: str, metrics, overrides: list[str] | None) -> Path:
    path = root / name
    (path / ".hydra").mkdir(parents=True)
    if metrics is not None:
        (path / "metrics.json").write_text(json.dumps(metrics))
    if overrides is not None:
        (path / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    return path


def _sweep(root: Path, sweep_id: str, task: list[str]) -> None:
    """multirun.yaml as Hydra writes it (the basic sweeper, job folders by number) and the
    sweep's id as trainer.sweep.SweepSummary writes it."""
    root.mkdir(parents=True, exist_ok=True)
    hydra = {"mode": "MULTIRUN", "sweeper": {"_target_": BASIC, "params": None},
             "overrides": {"task": task}, "sweep": {"subdir": "${hydra.job.num}"}}  # fmt: skip
    (root / "multirun.yaml").write_text(yaml.safe_dump({"hydra": hydra}))
    (root / ".sweep.json").write_text(json.dumps({"sweep_id": sweep_id}))


@pytest.mark.parametrize("started_by", ["sweep-a", "sweep-0", None])
def test_a_job_a_later_sweep_continued_is_not_listed_as_an_earlier_sweeps_run_never_started(
    tmp_path, started_by
) -> None:
    """Sweep A's job 0 ran (interrupted at a checkpoint, or completed); sweep B, started
    later in its own dir with trainer.resume=auto (the README's advice for requeued jobs),
    continued that run in A/0, the checkpoint's home: A/0/metrics.json is B's continuation
    (B's sweep id, job_dir B/0), B/0 holds continued.json and its copy (what two real tiny
    sweeps leave, probe 439). The README: "a job a later run continued in another folder
    shows that continuation's result, noted (`continued by <dir>`)". A's report listed job 0
    as `not started`, "not run by this sweep: its folder holds an earlier sweep's completed
    run": A did run it, and B is a later sweep, not an earlier one."""
    a, b = tmp_path / "A", tmp_path / "B"
    task = ["optimizer.lr=0.01,0.1", "trainer.max_steps=6"]
    _sweep(a, "sweep-a", task)
    _sweep(b, "sweep-b", [*task, "trainer.resume=auto"])
    jobs = [[f"optimizer.lr={lr}", "trainer.max_steps=6"] for lr in ("0.01", "0.1")]
    result = {"status": "completed", "step": 6, "epoch": 0, "wall_s": 2.0, "monitor": "val/acc",
              "val/acc": 0.66, "val/loss": 1.16, "train/loss": 1.89}  # fmt: skip
    for n, job in enumerate(jobs):
        theirs = {**result, "overrides": [*job, "trainer.resume=auto"], "sweep_id": "sweep-b",
                  "job_dir": str(b / str(n)), "run_sweep_id": started_by}  # fmt: skip
        _job(a, str(n), theirs, job)  # (A's .hydra/: A's overrides)
        _job(b, str(n), theirs, [*job, "trainer.resume=auto"])
        (b / str(n) / "continued.json").write_text(
            json.dumps({"job_dir": str(b / str(n)), "run_dir": str(a / str(n))})
        )
    runs = report.collect_runs(a, curves=False)
    if started_by != "sweep-a":  # (the run continued was an earlier sweep's in a reused dir,
        # "sweep-0", or its starter is not known: not this sweep's job, as before)
        assert [(r.name, r.status) for r in runs] == [("0", "not started"), ("1", "not started")]
        return
    assert [(r.name, r.status) for r in runs] == [("0", "completed"), ("1", "completed")], [
        (r.name, r.status, r.note) for r in runs
    ]
    assert all(r.note.startswith(f"continued by {b / r.name}") for r in runs), [
        r.note for r in runs
    ]


def _shared_nested_folder(path: Path):
    sweep = path / "sweep"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "train.py"), "-m", f"hydra.sweep.dir={sweep}",
         "hydra.sweep.subdir=one/folder", "trainer.device=cpu", "trainer.max_steps=1",
         "seed=0,1"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    return proc, sweep


@in_background(_shared_nested_folder)
def test_a_job_given_another_jobs_folder_is_refused_and_counted_as_failed(background) -> None:
    """``hydra.sweep.subdir`` naming two jobs' folders alike (``lr${optimizer.lr}`` over
    ``optimizer.lr=0.01,0.1 seed=0,1``; here one folder for both, nested): the second job set
    the first one's outputs aside in ``previous/1``, warned as "an earlier run's", and the
    sweep's summary and report, which read each folder's result, listed the first job as
    never started, ranked without it, and exited 1 (a probe's). The second job is refused
    before anything moves, naming the subdir; the first job's outputs stay; the summary counts
    one job failed (not "not started"), with its error, found one level down."""
    proc, sweep = background
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out
    folder = sweep / "one" / "folder"
    kept = json.loads((folder / "metrics.json").read_text())
    ran = ["trainer.device=cpu", "trainer.max_steps=1", "seed=0"]
    assert (kept["status"], kept["overrides"]) == ("completed", ran), kept
    assert not (folder / "previous").exists()
    refusal = (f"ConfigError: hydra.sweep.subdir: job 1's folder {folder} holds the result of "
               "another job of this sweep (trainer.device=cpu trainer.max_steps=1 seed=0): the "
               "subdir (one/folder) gives both one folder")  # fmt: skip
    assert f"job 1: failed, the sweep goes on (its folder could not record it): {refusal}" in out
    assert f"job 1 failed: {refusal}" in out
    assert "sweep finished: 1 of 2 jobs failed;" in out, out


def test_a_sweep_whose_job_folders_are_nested_lists_its_completed_jobs(tmp_path) -> None:
    """``hydra.sweep.subdir=${hydra.job.override_dirname}`` (Hydra's own idiom) over
    ``optimizer.lr=0.01,0.1 monitor=val/loss``: the value's ``/`` makes each job's folder
    ``monitor=val/loss,optimizer.lr=...``, one level down (what a real sweep leaves, probe
    439; a subdir such as ``lr${optimizer.lr}/seed${seed}`` nests likewise). Both jobs
    completed, yet the sweep ended "2 of 2 jobs did not complete (2 not started)" with exit
    status 1, and the report listed both as `not started`, ranking none: only the sweep
    dir's direct subfolders are looked at as jobs."""
    root = tmp_path / "sweep"
    task = ["optimizer.lr=0.01,0.1", "monitor=val/loss", "trainer.max_steps=2"]
    _sweep(root, "this", task)
    (root / "multirun.yaml").write_text(
        (root / "multirun.yaml")
        .read_text()
        .replace("${hydra.job.num}", "${hydra.job.override_dirname}")
    )
    for lr, loss in (("0.01", 2.05), ("0.1", 10.98)):
        job = [f"optimizer.lr={lr}", "monitor=val/loss", "trainer.max_steps=2"]
        _job(root, f"monitor=val/loss,optimizer.lr={lr},trainer.max_steps=2",
             {"status": "completed", "step": 2, "epoch": 0, "wall_s": 1.0, "monitor": "val/loss",
              "val/loss": loss, "val/acc": 0.3, "train/loss": 2.2, "overrides": job,
              "sweep_id": "this"}, job)  # fmt: skip
    runs = report.collect_runs(root, curves=False)
    rows, count = report.not_started(root, runs)
    assert sorted(r.status for r in [*runs, *rows]) == ["completed", "completed"], [
        (r.name, r.status) for r in [*runs, *rows]
    ]
    assert count == 0


def _group(run_dir: Path) -> str:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import metadata

    from trainer.logger import event_dir

    acc = EventAccumulator(str(event_dir(run_dir)))
    acc.Reload()
    content = acc.PluginTagToContent(metadata.PLUGIN_NAME)[metadata.SESSION_START_INFO_TAG]
    return metadata.parse_session_start_info_plugin_data(content).group_name


def test_the_latest_set_aside_run_deleted_leaves_no_two_runs_one_session_group(tmp_path) -> None:
    """Three runs in one folder: previous/1 (``#1``), previous/2 (``#2``) and the run at the
    top (``#3``). previous/2 deleted, a fourth run sets the top one aside into previous/2 (one
    past the highest left, 1) and is itself numbered 1 + the highest, 2: ``#3``, the group
    of the run it set aside. TensorBoard's HPARAMS tab makes one row of a group, the mean of
    both runs' metrics (the defect the numbering fixed for a deleted previous/1)."""
    from conftest import train

    fast = ("trainer.checkpoint.every_n_steps=2", "logging.every_n_steps=1")
    for steps in (2, 3, 4):  # (logging.* is no hyperparameter: the same overrides)
        train(tmp_path, *fast, "trainer.max_steps=2", f"logging.every_n_steps={steps}")
    import shutil

    shutil.rmtree(tmp_path / "previous" / "2")
    train(tmp_path, *fast, "trainer.max_steps=2")
    groups = [_group(d) for d in sorted((tmp_path / "previous").iterdir())] + [_group(tmp_path)]
    assert len(set(groups)) == len(groups), groups
