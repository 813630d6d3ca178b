"""A sweep whose job's folder is the sweep's folder itself (``hydra.sweep.subdir=.``, or a
``${hydra.job.override_dirname}`` subdir that comes out empty): a legitimate single-job
multirun, which the trainer does not refuse (it refuses only a *single* run there). Since
255ee7d the report leaves a run's outputs at a sweep folder's top out, so the sweep's one job
is dropped: the sweep summary says "all 0 jobs completed" and the report lists 0 jobs
(before: "its 1 job completed", the job listed and ranked best)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from conftest import ROOT


def _sweep(sweep: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "train.py"), "-m", "trainer.device=cpu",
         "trainer.max_steps=1", "instrument=none", f"hydra.sweep.dir={sweep}",
         "hydra.sweep.subdir=."],
        cwd=ROOT, capture_output=True, text=True, timeout=300, env=dict(os.environ),
    )  # fmt: skip


def test_a_single_job_sweep_in_the_sweep_folder_is_counted_and_reported(tmp_path: Path) -> None:
    from trainer.report import find_run_dirs

    sweep = tmp_path / "sweep"
    proc = _sweep(sweep)
    assert proc.returncode == 0, proc.stderr
    assert (sweep / "metrics.json").is_file() and (sweep / "multirun.yaml").is_file()
    out = proc.stdout + proc.stderr
    # the job ran (in multirun: not refused) and completed; the summary must count it
    assert "its 1 job completed" in out, out[-1500:]
    assert find_run_dirs(sweep) == [sweep]


def test_a_sweep_stopped_by_an_unknown_choice_is_not_said_to_have_a_value_of_the_wrong_type(
    tmp_path: Path,
) -> None:
    """The summary of a sweep that ran no job gives one cause, "a value Hydra cannot read for
    its key's type", whatever stopped it: an unknown group choice (``model=nope,mlp``), which
    the basic sweeper's check of every point also stops at, is said to be a type error."""
    sweep = tmp_path / "sweep"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "train.py"), "-m", "trainer.device=cpu",
         "trainer.max_steps=1", "instrument=none", f"hydra.sweep.dir={sweep}",
         "model=nope,mlp"],
        cwd=ROOT, capture_output=True, text=True, timeout=300, env=dict(os.environ),
    )  # fmt: skip
    out = proc.stdout + proc.stderr
    assert "Could not find 'model/nope'" in out, out[-1500:]
    line = next(x for x in out.splitlines() if "no job ran" in x)
    assert "for its key's type" not in line, line
    assert line.endswith(
        "no job ran: Hydra checks every point before the first job, and the error above "
        "stopped it (a value of another type than its key's, an unknown choice, ...); fix it "
        "and run the sweep again"
    ), line
