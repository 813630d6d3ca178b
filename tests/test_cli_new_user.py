"""The command line as a new user meets it, scripts/train.py through a subprocess (a probe's
findings, 2026-12-07)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import ROOT

TINY = ("trainer.device=cpu", "trainer.max_steps=1", "instrument=none")


def _train(*args: str, cwd: Path = ROOT, env: dict | None = None) -> subprocess.CompletedProcess:
    flags = [a for a in args if a.startswith("-")]
    overrides = [a for a in args if not a.startswith("-")]
    return subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "train.py"), *flags, *overrides],
        cwd=cwd, capture_output=True, text=True, timeout=300,
        env={**os.environ, **(env or {})},
    )  # fmt: skip


def test_unresolvable_interpolation_in_an_override_is_a_one_line_refusal_recorded(
    tmp_path: Path,
) -> None:
    """README "What a run writes": a bad value ends a single run with ``Error: <key>: ...``,
    no traceback, exit 1, and metrics.json records ``status: failed``. In a multirun this
    override is exactly that (``ConfigError: Interpolation key 'data.batchsize' not found
    (key: optimizer.lr)``); a single run printed a 20-line traceback from
    ``run._job_identity`` and its folder had no metrics.json."""
    run_dir = tmp_path / "run"
    proc = _train("optimizer.lr=${data.batchsize}", *TINY, f"hydra.run.dir={run_dir}")
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    assert "Error: " in proc.stderr and "data.batchsize" in proc.stderr, proc.stderr
    assert "optimizer.lr" in proc.stderr, proc.stderr
    metrics = run_dir / "metrics.json"
    assert metrics.is_file(), sorted(p.name for p in run_dir.iterdir())
    assert json.loads(metrics.read_text())["status"] == "failed"


@pytest.fixture(scope="module")
def chdir_interpolated_run(tmp_path_factory):
    """One tiny run: an interpolated override, hydra.job.chdir=true, a relative run dir."""
    cwd = tmp_path_factory.mktemp("launch")
    proc = _train("seed=${data.split_seed}", *TINY, "hydra.job.chdir=true",
                  "hydra.run.dir=rel/run", cwd=cwd)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return proc, cwd, cwd / "rel" / "run"


def test_metrics_json_overrides_are_as_written(chdir_interpolated_run) -> None:
    """README: metrics.json's ``overrides`` are "the job's command-line overrides, as
    ``.hydra/overrides.yaml`` holds them". A single run's interpolation was resolved there
    (``seed=0`` recorded for ``seed=${data.split_seed}``; ``optimizer.lr=64`` for
    ``optimizer.lr=${data.batch_size}``)."""
    _, _, run_dir = chdir_interpolated_run
    written = yaml.safe_load((run_dir / ".hydra" / "overrides.yaml").read_text())
    recorded = json.loads((run_dir / "metrics.json").read_text())["overrides"]
    assert recorded == written


def test_chdir_run_prints_a_run_dir_the_user_can_open(chdir_interpolated_run) -> None:
    """With ``hydra.job.chdir=true`` the summary said ``run dir: .`` and ``tensorboard
    --logdir .``: relative to the run dir itself, not to the folder the user launched from,
    where ``.`` is not the run."""
    proc, cwd, run_dir = chdir_interpolated_run
    out = proc.stdout + proc.stderr
    line = next(x for x in out.splitlines() if "run dir: " in x)
    shown = line.split("run dir: ", 1)[1].strip()
    assert (cwd / shown).resolve() == run_dir.resolve(), line


def test_world_size_without_rank_is_a_one_line_refusal_recorded(tmp_path: Path) -> None:
    """``WORLD_SIZE=2`` left in the environment without ``RANK`` (not under torchrun): a
    ``KeyError: 'RANK'`` traceback from ``distributed.from_env`` (called before the run's
    failure handling), and no metrics.json in the run's folder."""
    run_dir = tmp_path / "run"
    env = {"WORLD_SIZE": "2"}
    proc = _train(*TINY, f"hydra.run.dir={run_dir}", env=env)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    assert "RANK" in proc.stderr and "WORLD_SIZE" in proc.stderr, proc.stderr
    metrics = run_dir / "metrics.json"
    assert metrics.is_file(), sorted(p.name for p in run_dir.iterdir())
    assert json.loads(metrics.read_text())["status"] == "failed"


def test_a_sweep_point_of_the_wrong_type_is_said_to_stop_the_sweep_before_any_job(
    tmp_path: Path,
) -> None:
    """README "Presets and sweeps": "A failing job does not sink the sweep": a job that fails
    (a bad value, ...) writes metrics.json with ``status: failed`` and the other jobs run.
    A value Hydra cannot convert (``trainer.max_steps=1,abc``) stopped the whole sweep before
    any job ran (the basic sweeper composes every point first): no job folder at all, and the
    summary said "the others' outputs are in <sweep dir>", where there are none. Hydra's
    own check, documented now; the summary says no job ran, and why."""
    sweep = tmp_path / "sweep"
    proc = _train("-m", "trainer.max_steps=1,abc", "trainer.device=cpu", "instrument=none",
                  f"hydra.sweep.dir={sweep}")  # fmt: skip
    assert proc.returncode == 1, proc.stderr
    assert sorted(p.name for p in sweep.iterdir()) == [".sweep.json", "multirun.yaml"]
    assert proc.stdout.rstrip().endswith(
        "sweep stopped before its end by the error above: 2 of 2 jobs did not complete (2 not "
        "started); no job ran: Hydra checks every point before the first job, and the error "
        "above stopped it (a value of another type than its key's, an unknown choice, ...); "
        "fix it and run the sweep again"
    ), proc.stdout[-800:]
    assert "Error merging override trainer.max_steps=abc" in proc.stderr


def test_a_run_put_in_a_sweep_dir_does_not_hide_the_sweeps_jobs(tmp_path: Path) -> None:
    """``hydra.run.dir=<a sweep dir>`` (a single run pointed at an existing sweep's folder, by
    hand or by a typo) ran there unsaid, and afterwards ``scripts/report.py <sweep dir>`` took
    the folder for a single run dir (``report.find_run_dirs``: ``is_run_dir(root)`` first) and
    listed that run alone: "1 job (1 completed)", the sweep's completed jobs left out unsaid
    (summary.csv rewritten with one row). The files below are what a 2-job basic sweep and a
    single run in its folder wrote (a real CLI sweep and run gave the same report)."""
    from trainer.report import collect_runs

    sweep_id = "fd04aa2a02f142b0bbc2fb17aba32f95"
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    (sweep / ".sweep.json").write_text(json.dumps({"sweep_id": sweep_id}))
    (sweep / "multirun.yaml").write_text(
        yaml.safe_dump(
            {
                "hydra": {
                    "mode": "MULTIRUN",
                    "sweep": {"dir": str(sweep), "subdir": "${hydra.job.num}"},
                    "overrides": {"task": ["optimizer.lr=0.01,0.02", "trainer.max_steps=2"]},
                }
            }
        )
    )

    def run_in(folder: Path, overrides: list[str], sid: str | None) -> None:
        (folder / ".hydra").mkdir(parents=True)
        (folder / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
        (folder / "metrics.json").write_text(
            json.dumps(
                {
                    "status": "completed",
                    "step": 2,
                    "epoch": 0,
                    "monitor": "val/acc",
                    "val/acc": 0.3,
                    "val/loss": 2.0,
                    "train/loss": 2.2,
                    "wall_s": 1.0,
                    "overrides": overrides,
                    "sweep_id": sid,
                }
            )
        )

    for num, lr in enumerate(("0.01", "0.02")):
        run_in(sweep / str(num), [f"optimizer.lr={lr}", "trainer.max_steps=2"], sweep_id)
    run_in(sweep, ["trainer.max_steps=1"], None)  # the single run put in the sweep's folder

    names = [r.name for r in collect_runs(sweep, curves=False)]
    assert "0" in names and "1" in names, names
