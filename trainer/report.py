"""Summarize a sweep (or one run): a ranked table, ``summary.csv`` and ``curves.png``.

    python scripts/report.py outputs/sweep                      # rank by val/acc, best first
    python scripts/report.py outputs/sweep --metric val/loss    # lowest val/loss first
    python scripts/report.py outputs/run                        # a single run dir works too

``<dir>`` is a Hydra multirun dir (job subdirs ``0/ 1/ 2/ ...``, ordered numerically) or one run
dir (it holds ``metrics.json``, ``tb/`` or ``.hydra/``). Per job, the final metrics come from
``metrics.json``, the overrides from ``.hydra/overrides.yaml`` and the learning curves from the
event files in ``tb/``, read with tensorboard's own reader. A job's status is that of its
``metrics.json`` (``completed``, ``failed``, ``interrupted``), ``missing`` when there is none
(killed hard) and ``unreadable`` when it cannot be parsed; such jobs are still listed, after the
ranked ones. The table goes to stdout; ``summary.csv`` (full precision, full error text) and
``curves.png`` (train/loss and val/acc against step, one line per job) go into ``<dir>``.
"""

from __future__ import annotations

import argparse
import csv
import inspect
import json
import math
import os
import re
import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

#: in a job's folder when it resumed a checkpoint of another run dir and continued there:
#: ``{"run_dir": that dir}``
CONTINUED = "continued.json"

#: columns of the table and the CSV, in order; the ranking metric and the other metrics the
#: jobs report (val/mse, val/ppl, ...) are added when not among them
METRICS = ("train/loss", "val/loss", "val/acc", "step", "wall_s")
#: the panels of curves.png, read from the event files (:func:`curve_tags`: the ranking metric's)
CURVE_TAGS = ("train/loss", "val/acc")
#: whether the highest (max) or the lowest (min) is best, for the trainer's own metrics
DIRECTIONS = {
    "val/acc": "max", "val/token_acc": "max", "val/loss": "min", "val/mse": "min",
    "val/ppl": "min", "train/loss": "min", "wall_s": "min",
}  # fmt: skip
#: words (whole, of a name split at non-alphanumerics) that make ``auto`` take the highest
#: as best
HIGHER_IS_BETTER = frozenset({
    "acc", "accuracy", "f1", "auc", "auroc", "precision", "recall", "score", "iou", "miou",
    "map", "dice", "r2",
})  # fmt: skip
#: keys of metrics.json that are not metrics (not shown as columns)
NOT_METRICS = {"epoch", "monitor", "status", "run_id", "checkpoint", "error", "signal", "loss"}
MAX_LABEL = 70  # characters of a legend label; a sweep's overrides can run long


class ReportError(Exception):
    """Input the report cannot work with; the message names the path and what was expected."""


@dataclass(eq=False)  # runs compare by identity
class Run:
    """One job of a sweep, as read from its run dir."""

    name: str
    """The job's subdir name (``"3"``), or the run dir's own name for a single run."""
    path: Path
    status: str
    """metrics.json's (completed, failed, interrupted), or missing (none) or unreadable."""
    overrides: list[str] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)
    """metrics.json as written by ``trainer.run`` (empty when missing or unreadable)."""
    error: str = ""
    """The error of a failed job, or why its metrics.json could not be read."""
    curves: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    """tag -> [(step, value)] from the event files; a tag that was not logged is absent."""
    loss: dict[str, Any] | None = None
    """The loss the job trained: metrics.json's ``loss`` (resolved), or else the ``loss`` node
    of ``.hydra/config.yaml`` where it holds no interpolation; None where neither tells."""
    note: str = ""
    """What the row's numbers are, where not plainly the job's: a later continuation's."""

    def value(self, key: str) -> float | None:
        """``metrics[key]`` as a float; None when absent, not a number, or not finite (NaN, or
        ±Inf: a loss of one's own diverging to −Inf was ranked best, a probe's finding)."""
        v = self.metrics.get(key)
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
            return None
        return float(v)

    @property
    def error_line(self) -> str:
        """The last non-empty line of the error (of a traceback, the one that says what)."""
        lines = [line.strip() for line in self.error.splitlines() if line.strip()]
        return lines[-1] if lines else ""


def is_run_dir(path: Path) -> bool:
    """A run dir holds what a job writes: metrics.json, tb/, Hydra's .hydra/ (written first),
    or the pointer of a job that continued in another folder (:data:`CONTINUED`)."""
    return ((path / "metrics.json").is_file() or (path / "tb").is_dir()
            or (path / ".hydra").is_dir() or (path / CONTINUED).is_file())  # fmt: skip


def _numbered(name: str) -> bool:
    """A job dir's number, as Hydra writes it (ASCII digits: str.isdigit also takes '²',
    which int() refuses)."""
    return name.isascii() and name.isdigit()


def _job_order(path: Path) -> tuple[int, int, str]:
    # numbered jobs by number (2 before 10), then any other job dirs by name (a nested one
    # by its path below the sweep dir)
    return (0, int(path.name), "") if _numbered(path.name) else (1, 0, str(path))


#: how far below a sweep dir a job's folder is looked for (a ``hydra.sweep.subdir`` with a
#: ``/``: ``lr${optimizer.lr}/seed${seed}``, or ``${hydra.job.override_dirname}`` over a value
#: such as ``monitor=val/loss``)
NESTED_DEPTH = 8


def _nested_jobs(root: Path, folder: Path, depth: int) -> list[Path]:
    """The run dirs below ``folder``'s subfolders that are neither numbered job dirs nor run
    dirs themselves (a job's folder a ``/`` in ``hydra.sweep.subdir`` nests: its jobs, only
    the sweep dir's direct subfolders looked at, were reported as never started, and the
    sweep that completed them as failed, a probe's)."""
    if depth <= 1:
        return []
    found: list[Path] = []
    for p in sorted(folder.iterdir()):
        if not p.is_dir() or p.name.startswith(".") or p.is_symlink() or p.name in _OF_A_RUN:
            continue
        if folder == root and is_run_dir(p):
            continue  # (a job's folder: what is below it is the job's)
        if folder != root and is_run_dir(p):
            found.append(p)
        else:  # (a numbered one too: ``${seed}/lr${optimizer.lr}`` nests below 0/, 1/; its
            # jobs were listed as missing, a review's)
            found += _nested_jobs(root, p, depth - 1)
    return found


#: folders a run keeps inside its own (never a job's folder of a sweep: a job's set-aside
#: ``previous/1`` was listed as a job, a review's)
_OF_A_RUN = ("previous", "abandoned", "tb", "checkpoints")


def sweeps_own_job(folder: Path) -> bool:
    """Whether the run in a sweep's own folder is that sweep's job (``hydra.sweep.subdir=.``,
    or an empty ``${hydra.job.override_dirname}``: it was left out, a review's): Hydra wrote
    its ``.hydra/hydra.yaml`` in a multirun, or its ``metrics.json`` records the sweep's id."""
    try:
        text = (folder / ".hydra" / "hydra.yaml").read_text()
        if re.search(r"^  mode: MULTIRUN$", text, re.MULTILINE):
            return True
    except (OSError, UnicodeDecodeError):
        pass
    try:
        recorded = json.loads((folder / "metrics.json").read_text()).get("sweep_id")
    except (OSError, UnicodeDecodeError, ValueError, AttributeError):
        return False
    return isinstance(recorded, str) and recorded == current_sweep_id(folder)


def find_run_dirs(root: Path) -> list[Path]:
    """``[root]`` for a run dir; for a sweep dir its job dirs, numerically ordered.

    Job dirs are the numbered subdirs (even empty ones: a job killed before writing anything is
    reported as missing), any other subdir that is a run dir (a custom ``hydra.sweep.subdir``)
    and the run dirs further down, :data:`NESTED_DEPTH` levels at most, below subdirs that are
    neither (a subdir with a ``/``).

    Raises:
        ReportError: ``root`` does not exist, is not a directory, or holds no run dirs.
    """
    if not root.exists():
        raise ReportError(f"{root}: no such directory")
    if not root.is_dir():
        raise ReportError(f"{root}: not a directory; give a sweep dir or a run dir")
    sweep = (root / "multirun.yaml").is_file() or (root / SWEEP_FILE).is_file()
    if is_run_dir(root) and (not sweep or sweeps_own_job(root)):
        return [root]
    if is_run_dir(root):  # (a single run's outputs in a sweep's folder: the sweep's jobs were
        # left out for it, unsaid, a probe's; the trainer refuses such a run now)
        print(f"warning: {root}: a single run's outputs in the sweep's folder itself "
              "(metrics.json, tb/ or .hydra/ beside multirun.yaml) are not a job of the sweep: "
              "left out", file=sys.stderr)  # fmt: skip
    nested = _nested_jobs(root, root, NESTED_DEPTH)
    jobs = [
        p
        for p in root.iterdir()
        if p.is_dir() and not p.name.startswith(".") and (is_run_dir(p) or (
            _numbered(p.name) and not any(n.is_relative_to(p) for n in nested)))
    ]  # fmt: skip
    jobs += nested
    if not jobs and (root / "multirun.yaml").is_file():  # (a sweep whose jobs have not
        return []  # started yet, SLURM's pending: listed as not started, a probe's)
    if not jobs:
        raise ReportError(
            f"{root}: no run dirs here; expected a run dir (metrics.json, tb/ or .hydra/) or a "
            "sweep dir with numbered job dirs 0/ 1/ ..."
        )
    return sorted(jobs, key=_job_order)


def read_overrides(run_dir: Path) -> list[str]:
    """The job's Hydra overrides; [] when the run was not launched through Hydra."""
    path = run_dir / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return []
    try:
        overrides = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        print(f"warning: {path}: cannot read it ({type(e).__name__}); no overrides shown",
              file=sys.stderr)  # fmt: skip
        return []
    if not isinstance(overrides, list):
        return [] if overrides is None else [str(overrides)]
    return [str(o) for o in overrides]


def read_loss(run_dir: Path) -> dict[str, Any] | None:
    """The ``loss`` node of the job's ``.hydra/config.yaml``; None when there is no readable
    one, or it holds an interpolation (Hydra writes ``${oc.env:SMOOTH}`` as it is: two jobs
    of different values read alike, a review's finding)."""
    path = run_dir / ".hydra" / "config.yaml"
    if not path.is_file():
        return None
    try:
        config = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None  # (read_overrides warns about an unreadable .hydra/)
    loss = config.get("loss") if isinstance(config, dict) else None
    if not isinstance(loss, dict) or "${" in json.dumps(loss, default=str):
        return None
    return loss


def _name_below(root: Path, run_dir: Path) -> str:
    """A job's name: its folder's, or its path below the sweep dir (a nested one)."""
    return run_dir.name if run_dir.parent == root or run_dir == root else (
        run_dir.relative_to(root).as_posix())  # fmt: skip


def load_run(run_dir: Path, name: str | None = None, sweep_dir: Path | None = None) -> Run:
    """The run's status, final metrics and overrides (no curves: see :func:`read_curves`).
    A job that resumed a checkpoint of another run dir continued there (``trainer.resume``
    of a sweep): its own folder holds :data:`CONTINUED`, naming that dir, where its curves
    are (``run.path``), and its own copy of the metrics it wrote there when it ended; without
    that copy (running, or killed) it is missing. ``sweep_dir``: the sweep's folder, for its
    id (default: the run dir's parent)."""
    run = Run(name=name or run_dir.name, path=run_dir, status="missing",
              error="no metrics.json yet: running, or killed before it wrote one")  # fmt: skip
    run.overrides = read_overrides(run_dir)
    run.loss = read_loss(run_dir)
    path = run_dir / "metrics.json"
    pointer = run_dir / CONTINUED
    if pointer.is_file():
        try:
            home = run_dir / json.loads(pointer.read_text())["run_dir"]  # (absolute: as is)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
            run.status, run.error = "unreadable", f"{CONTINUED}: {type(e).__name__}: {e}"
            return run
        if not path.is_file():
            run.error = (  # (its own words, not the plain folder's)
                f"it continued in {home}, which no longer exists" if not home.is_dir()
                else f"it continued in {home} and wrote no result (running, or killed)"
            )  # fmt: skip
            return run
        if home.is_dir():  # (its curves; its result is its own copy)
            run.path = home
    if not path.is_file():
        return run
    run.error = ""
    try:
        metrics = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        run.status, run.error = "unreadable", f"metrics.json: {type(e).__name__}: {e}"
        return run
    if not isinstance(metrics, dict) or not isinstance(metrics.get("status"), str):
        got = type(metrics).__name__ if not isinstance(metrics, dict) else "no status string"
        run.status = "unreadable"
        run.error = f"metrics.json: expected an object with a 'status' string, got {got}"
        return run
    job_dir = metrics.get("job_dir")
    elsewhere = isinstance(job_dir, str) and _other_dir(job_dir, run_dir)
    ran = metrics.get("overrides")
    if (
        isinstance(ran, list)
        and not elsewhere
        and (run_dir / ".hydra" / "overrides.yaml").is_file()
        and _job([str(o) for o in ran]) != _job(run.overrides)
    ):  # Hydra's .hydra/ is a later run's, metrics.json an earlier one's: the later run was
        # refused before it took the folder over (which leaves it as it was), or killed
        # before it wrote
        recorded = metrics.get("sweep_id")
        if isinstance(recorded, str) and recorded == current_sweep_id(
            sweep_dir if sweep_dir is not None else run_dir.parent
        ):
            # the result is the sweep's job's, a later run by hand refused there (it was
            # hidden, the job listed as not started, a review's)
            later = " ".join(run.overrides)  # (which job: a sweep's refused in it is
            # listed as not started, its train.log in this folder, a probe's)
            run.overrides = [str(o) for o in ran]
            run.note = (f"its .hydra/ is a later run's ({later}), which wrote no result "
                        "(refused, or killed; its train.log is this folder's)")  # fmt: skip
        else:  # the earlier result was reported as this job's, completed and best (a probe's)
            run.error = (
                f"its metrics.json is an earlier run's in this folder "
                f"({' '.join(map(str, ran))}): this job wrote none (refused before it "
                "started, which leaves a used folder as it was, or killed); its train.log "
                "says why"
            )
            return run
    if elsewhere:  # (a later job continued this run in its own folder: the run's latest)
        run.note = (
            f"continued by {job_dir} (its result, to step {metrics.get('step', '?')}: "
            "the run's latest)"
        )
    run.metrics, run.status = metrics, metrics["status"]
    run.error = str(metrics.get("error") or "")
    if run.status == "interrupted" and isinstance(metrics.get("signal"), str) and not run.note:
        # (its row said nothing of why it stopped, a probe's)
        run.note = f"stopped by {metrics['signal']} at step {metrics.get('step', '?')}"
    if isinstance(metrics.get("loss"), dict):  # (resolved, as it ran)
        run.loss = metrics["loss"]
    return run


#: a file a sweep's start writes into its folder (trainer.sweep.SweepSummary): the sweep's id,
#: which each of its jobs records in its ``metrics.json`` (``sweep_id``)
SWEEP_FILE = ".sweep.json"


def current_sweep_id(sweep_dir: Path) -> str | None:
    """The id of the last sweep started in ``sweep_dir`` (:data:`SWEEP_FILE`); None where
    none was recorded (a sweep started before 2026-12-07, or not a sweep dir)."""
    try:
        value = json.loads((sweep_dir / SWEEP_FILE).read_text())["sweep_id"]
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError):
        return None
    return value if isinstance(value, str) else None


def _other_dir(path: str, run_dir: Path) -> bool:
    """Whether ``path`` names another folder than ``run_dir``."""
    try:
        return Path(path).resolve() != run_dir.resolve()
    except OSError:
        return True


def read_curves(run_dir: Path, tags: Sequence[str]) -> dict[str, list[tuple[int, float]]]:
    """``tag -> [(step, value)]`` for those ``tags`` found in the run's event files."""
    from trainer.logger import event_dir

    tb = event_dir(run_dir)
    if not tb.is_dir():
        return {}
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    # every scalar kept; the others (histograms of an instrumented run) are parsed anyway, so
    # keep one of each instead of the default hundreds in memory
    guidance = {"scalars": 0, "histograms": 1, "compressedHistograms": 1, "tensors": 1,
                "images": 1, "audio": 1}  # fmt: skip
    acc = EventAccumulator(str(tb), size_guidance=guidance)
    try:
        acc.Reload()
    except Exception as e:  # a truncated file is handled by the reader; anything else is not fatal
        print(f"warning: {tb}: cannot read the event files ({type(e).__name__}: {e})",
              file=sys.stderr)  # fmt: skip
        return {}
    present = set(acc.Tags()["scalars"])
    return {t: [(e.step, e.value) for e in acc.Scalars(t)] for t in tags if t in present}


def collect_runs(root: str | Path, curves: bool = True) -> list[Run]:
    """Every job under ``root`` (a sweep dir or a run dir), in job order.

    Raises:
        ReportError: see :func:`find_run_dirs`.
    """
    # (absolute: ``report.py .`` in a job folder read ``Path('.').parent``, the job folder
    # again, for the sweep's id, and named the job ""; summary.csv's paths were relative to
    # where the report ran, leading nowhere from elsewhere: a probe's)
    root = Path(os.path.abspath(root))  # (lexically: ``..`` as the shell reads it, a review's)
    runs = [load_run(run_dir, _name_below(root, run_dir), root if run_dir != root else None)
            for run_dir in find_run_dirs(root)]  # fmt: skip
    earlier, of_jobs = _earlier_sweeps(root, runs)
    if of_jobs:
        print(f"warning: {root}: {_folders_hold(of_jobs)} an earlier sweep's run of the job "
              f"(its metrics.json records another sweep's id than {SWEEP_FILE}'s), which this "
              "sweep has not run: listed as not started, noted", file=sys.stderr)  # fmt: skip
        runs = [_not_run(r) if any(r is o for o in of_jobs) else r for r in runs]
    if earlier:
        print(f"warning: {root}: {_folders_hold(earlier)} "
              "runs that are not this sweep's jobs (an earlier sweep's, or runs of their "
              "own), left out (a folder is this sweep's where its metrics.json records the "
              f"sweep's id, {SWEEP_FILE}, or it is the job its number names in "
              "multirun.yaml)", file=sys.stderr)  # fmt: skip
        runs = [r for r in runs if all(r is not e for e in earlier)]
    if curves:
        for run in runs:  # (a continued job's: where it continued)
            if run.status != NOT_STARTED:
                run.curves = run_curves(run, CURVE_TAGS)
    return runs


def run_curves(run: Run, tags: Sequence[str]) -> dict[str, list[tuple[int, float]]]:
    """:func:`read_curves` of a job, said where a completed job's end before its last step
    (which it logs): tensorboard's reader stops at a damaged record as at the end of a file,
    saying so at DEBUG level only, and a flipped byte showed 9 of 20 points as a run that
    stopped at step 18 of 40 (a probe's)."""
    curves = read_curves(run.path, tags)
    step = run.metrics.get("step")
    end = max((s for points in curves.values() for s, _ in points), default=None)
    if run.status == "completed" and isinstance(step, int) and end is not None and end < step:
        from trainer.logger import event_dir

        print(f"warning: {event_dir(run.path)}: its event files end at step {end}, its "
              f"metrics.json at step {step}: a damaged or cut event file (its curves are "
              "shown as far as they could be read)", file=sys.stderr)  # fmt: skip
    return curves


def _folders_hold(runs: Sequence[Run]) -> str:
    """``job folder 2 holds`` / ``job folders 0, 1 hold``."""
    many = len(runs) > 1
    names = ", ".join(r.name for r in runs)
    return f"job folder{'s' if many else ''} {names} hold{'' if many else 's'}"


def _not_run(run: Run) -> Run:
    """The row of a job whose folder holds an earlier sweep's run of it: not started, the
    earlier run's status, step and monitored metric in its note (a better result there is
    not hidden), none of its numbers in the columns."""
    said = [f"step {run.metrics['step']}"] if "step" in run.metrics else []
    monitor = run.metrics.get("monitor")
    if isinstance(monitor, str) and monitor in run.metrics:
        said.append(f"{monitor} {format_number(run.metrics[monitor])}")
    detail = f" ({', '.join(said)})" if said else ""
    return Run(run.name, run.path, NOT_STARTED, run.overrides,
               note=f"not run by this sweep: its folder holds an earlier sweep's {run.status} "
                    f"run{detail}")  # fmt: skip


def _job(overrides: Sequence[str]) -> tuple[str, ...]:
    """A job's identity: its overrides but ``trainer.resume`` (a sweep run again with
    ``resume=auto`` runs the same jobs), in any order, each value as Hydra parses it (the
    sweeper writes ``False`` where a command line typed ``false``: a review's)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    kept = []
    for o in overrides:
        if o.startswith("trainer.resume="):
            continue
        try:
            (parsed,) = parser.parse_overrides([o])
            kept.append(f"{parsed.get_key_element()}={parsed.value()!r}")
        except Exception:  # noqa: BLE001 (one Hydra would not parse: as written)
            kept.append(o)
    return tuple(sorted(kept))


def _earlier_sweeps(root: Path, runs: Sequence[Run]) -> tuple[list[Run], list[Run]]:
    """The job folders of a reused sweep dir that hold an earlier sweep's runs. They were
    counted as this sweep's: its best taken from them, a fully successful sweep said to have
    failed for their failures (a probe's). A folder is this sweep's where its
    ``metrics.json`` records this sweep's id (:data:`SWEEP_FILE`: its jobs, and a job of it
    continued by hand in its folder), or else where it is one of the jobs the sweep plans
    (``multirun.yaml``, the basic sweeper's split): folders named by job number, the job of
    that number (:func:`_job`: a ``resume=auto`` re-run not yet at a job keeps it; an
    earlier sweep's folder of another point, whose overrides are a later job's, is not: a
    review's, counted twice), other folders by their overrides. Where the plan lists no jobs
    (an Optuna sweep), a folder recording another sweep's id is an earlier one's. A folder
    with no overrides (killed before Hydra wrote them) is kept.

    Returns the folders that are not this sweep's jobs, and those that are the folders of
    its jobs but record another sweep's id (known): an earlier sweep's run of the job, which
    this sweep has not run (yet, or at all: refused before it took the folder)."""
    current = current_sweep_id(root)
    path = root / "multirun.yaml"
    if is_run_dir(root) or not (path.is_file() or current is not None):
        return [], []
    jobs = hydra = None
    if path.is_file():
        from omegaconf import OmegaConf

        from trainer.sweep import planned_job_overrides, subdir_as_written

        try:
            hydra = OmegaConf.select(OmegaConf.load(path), "hydra")
            jobs = planned_job_overrides(hydra)
        except Exception:  # noqa: BLE001 (not_started says so)
            jobs = None
    numbered = jobs is not None and subdir_as_written(hydra) == "${hydra.job.num}"
    planned = None if jobs is None else {_job(o) for o in jobs}
    earlier: list[Run] = []
    of_jobs: list[Run] = []
    # (folders not named by number: how many of each job's points have no folder of this
    # sweep's, which an earlier sweep's run of that job may stand for; one whose job has a
    # folder of this sweep's is an earlier one's, left out: a successful sweep listed its
    # jobs twice and failed, a review's)
    free = Counter(_job(o) for o in jobs or ())
    for r in runs:
        recorded = r.metrics.get("sweep_id")
        if r.overrides and (recorded == current or not isinstance(recorded, str)):
            free[_job(r.overrides)] -= 1
    for r in runs:
        recorded = r.metrics.get("sweep_id")
        if current is not None and recorded == current:
            continue
        # (another sweep's id; not where a later run continued this folder's run from a
        # folder of its own, which names this one: the sweep ran the job, and the report
        # shows the continuation's result, noted; it was listed as an earlier sweep's run
        # never started, a probe's)
        another = (current is not None and isinstance(recorded, str)
                   and not _continued_here(r, current))  # fmt: skip
        if not r.overrides:
            continue
        if jobs is None:  # (no plan: its record alone)
            if isinstance(recorded, str) and current is not None:
                earlier.append(r)
            continue
        assert planned is not None
        if numbered:
            ours = _numbered(r.name) and int(r.name) < len(jobs) and (
                _job(r.overrides) == _job(jobs[int(r.name)]))  # fmt: skip
        else:
            ours = _job(r.overrides) in planned
        if ours and not numbered and another:
            ours = free[_job(r.overrides)] > 0
            free[_job(r.overrides)] -= 1
        if not ours:
            earlier.append(r)
        elif another:  # the job's folder, holding another sweep's run of it: a job this
            # sweep has not run (that run was reported as the job's, completed and best, a
            # probe's; a sweep that resumes continues it only where its config is unchanged,
            # and one that starts afresh sets it aside)
            of_jobs.append(r)
    return earlier, of_jobs


def _continued_here(run: Run, sweep_id: str) -> bool:
    """Whether ``run`` is a job of the sweep ``sweep_id`` whose result is a later run's that
    continued it from a folder of its own: its ``metrics.json`` records that folder
    (``job_dir``), whose :data:`CONTINUED` names ``run``'s, and the sweep that started the
    run (``run_sweep_id``: an earlier sweep's run in a reused sweep dir, continued, is not
    this sweep's job)."""
    job_dir = run.metrics.get("job_dir")
    if run.metrics.get("run_sweep_id") != sweep_id:
        return False
    if not isinstance(job_dir, str) or not _other_dir(job_dir, run.path):
        return False
    try:
        home = json.loads((Path(job_dir) / CONTINUED).read_text())["run_dir"]
        return Path(job_dir, home).resolve() == run.path.resolve()
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError):
        return False


#: a planned job of an interrupted sweep that has no folder (:func:`not_started`)
NOT_STARTED = "not started"


def not_started(root: Path, runs: Sequence[Run]) -> tuple[list[Run], int]:
    """The jobs the multirun at ``root`` was to run (its ``multirun.yaml``) that have no
    folder: an interrupted sweep never started them. Until 2026-12-06 they were nowhere in
    the report, which read as a smaller sweep (a walkthrough's). As rows, status ``not
    started``, with their overrides and the number Hydra gives the job, where the basic
    sweeper's own split of the sweep names them: each planned job that no folder's
    overrides match (a folder of another sweep in a reused dir matches none) and whose
    number names no folder without overrides (a job killed before Hydra wrote them); else, as a
    count, the planned jobs beyond the folders (an Optuna sweep's trials, a ``glob``).
    ``([], 0)`` for a run dir, or a sweep whose jobs all have a folder."""
    path = root / "multirun.yaml"
    if not path.is_file() or is_run_dir(root):
        return [], 0
    from omegaconf import OmegaConf

    from trainer.sweep import planned_job_overrides, planned_jobs, subdir_as_written

    try:
        hydra = OmegaConf.select(OmegaConf.load(path), "hydra")
        planned = planned_jobs(hydra)
        jobs = planned_job_overrides(hydra)
    except Exception as e:  # noqa: BLE001 (a report is still made: without them, said so)
        print(f"warning: {path}: cannot read the sweep's plan ({type(e).__name__}); jobs it "
              "never started are not counted", file=sys.stderr)  # fmt: skip
        return [], 0
    if jobs is None:
        return [], max(0, (planned or 0) - len(runs))
    numbered = subdir_as_written(hydra) == "${hydra.job.num}"
    if numbered:  # folders named by job number: a job is started where its folder is kept
        # (:func:`_earlier_sweeps` left out the others; a folder matched by its overrides to
        # one job and by its number to another hid a job never run, a review's)
        names = {r.name for r in runs}
        rows = [(n, o) for n, o in enumerate(jobs) if str(n) not in names]
        return [Run(str(n), root / str(n), NOT_STARTED, list(o)) for n, o in rows], 0
    started: dict[tuple[str, ...], int] = {}
    for r in runs:  # (a job's identity: trainer.resume aside, _job)
        if r.overrides:
            started[_job(r.overrides)] = started.get(_job(r.overrides), 0) + 1
    unmatched = []
    for number, overrides in enumerate(jobs):
        if started.get(_job(overrides), 0) > 0:
            started[_job(overrides)] -= 1
        else:
            unmatched.append((number, overrides))
    # folders without Hydra's overrides (a job killed before it wrote them): which job they
    # are is not known where folders are not named by number, so the jobs not started are
    # counted only (a review: with subdir=${seed}, a folder `1` was taken for job 1)
    unplaced = len([r for r in runs if not r.overrides])
    rows = unmatched
    if unplaced > 0:
        return [], max(0, len(rows) - unplaced)
    return [Run(str(n), root / str(n), NOT_STARTED, list(o)) for n, o in rows], 0


def resolve_mode(metric: str, mode: str) -> str:
    """``max`` or ``min``; ``auto``: the trainer's own metrics' direction
    (:data:`DIRECTIONS`), else max for a name with a word of :data:`HIGHER_IS_BETTER` (an
    accuracy, an F1 score), else min."""
    if mode == "auto":
        if metric in DIRECTIONS:
            return DIRECTIONS[metric]
        words = set(re.split(r"[^a-z0-9]+", metric.rsplit("/", 1)[-1].lower()))
        return "max" if words & HIGHER_IS_BETTER else "min"
    if mode not in ("max", "min"):
        raise ValueError(f"mode: got {mode!r}; use auto, max or min")
    return mode


def rank_runs(runs: Sequence[Run], metric: str, mode: str) -> list[Run]:
    """Completed runs with a value for ``metric``, best first; then the rest in job order."""
    ranked = [r for r in runs if r.status == "completed" and r.value(metric) is not None]
    sign = -1.0 if resolve_mode(metric, mode) == "max" else 1.0
    ranked.sort(key=lambda r: sign * r.value(metric))  # type: ignore[operator]  # None: above
    kept = {id(r) for r in ranked}
    return ranked + [r for r in runs if id(r) not in kept]


def best_run(ranked: Sequence[Run], metric: str) -> Run | None:
    """The first of :func:`rank_runs`'s list, if it has a value for ``metric`` at all."""
    if ranked and ranked[0].status == "completed" and ranked[0].value(metric) is not None:
        return ranked[0]
    return None


def columns_for(metric: str, runs: Sequence[Run] = ()) -> tuple[str, ...]:
    """:data:`METRICS`, the ranking metric, and the other numbers the jobs' metrics.json
    hold (val/mse of a regression, val/ppl and val/token_acc of a sequence model); a metric
    of :data:`METRICS` no job holds (val/acc of a regression or sequence sweep, an empty
    column of dashes) is left out."""
    extra = sorted({
        k for r in runs for k, v in r.metrics.items()
        if k not in NOT_METRICS and isinstance(v, int | float) and not isinstance(v, bool)
    } - {*METRICS, metric})  # fmt: skip
    held = [m for m in METRICS if m == metric or not runs or any(m in r.metrics for r in runs)]
    return (*held, *([] if metric in METRICS else [metric]), *extra)


def curve_tags(metric: str) -> tuple[str, str]:
    """The panels of curves.png: train/loss and the ranking metric (val/loss when it is
    train/loss itself or not a logged curve, e.g. ``step``)."""
    return ("train/loss", metric if metric.startswith("val/") else "val/loss")


def monitor_of(runs: Sequence[Run]) -> str:
    """The metric the completed jobs monitored (``monitor`` in their metrics.json: val/acc
    for classification, val/mse for regression, val/ppl for a sequence model, or the one the
    sweep set); val/acc for jobs of an older layout without it.

    Raises:
        ReportError: the jobs monitored different metrics.
    """
    named = {
        str(r.metrics["monitor"]) for r in runs
        if r.status == "completed" and isinstance(r.metrics.get("monitor"), str)
    }  # fmt: skip
    if len(named) > 1:
        raise ReportError(
            f"the jobs monitored different metrics ({', '.join(sorted(named))}); choose one "
            "with --metric"
        )
    return named.pop() if named else "val/acc"


#: a task's own validation metric, in metrics.json: which task a job trained
TASK_METRICS = {"val/acc": "classification", "val/mse": "regression", "val/ppl": "sequence"}


def check_comparable(runs: Sequence[Run], metric: str) -> None:
    """Refuse to rank a loss across jobs of different tasks: a classification's val/loss
    (cross-entropy), a regression's (squared error) and a sequence model's (per-token
    cross-entropy) are different quantities, and a sweep over tasks ranked a regression
    best by its smaller number (a probe's finding). A job's task is read off its task
    metric; metrics one task alone has are ranked among those jobs, as they are.

    Raises:
        ReportError: the completed jobs are of more than one task and ``metric`` is a loss.
    """
    if metric not in ("val/loss", "train/loss"):
        return
    tasks: dict[str, list[str]] = {}
    for r in runs:  # (a job's task: the task metrics it has, together; none: a loss of one's
        if r.status == "completed":  # own without a task, only val/loss)
            task = "+".join(t for k, t in TASK_METRICS.items() if k in r.metrics) or "no task"
            tasks.setdefault(task, []).append(r.name)
    if len(tasks) > 1:
        named = "; ".join(f"{t}: {_jobs(jobs)}" for t, jobs in sorted(tasks.items()))
        raise ReportError(
            f"--metric {metric}: the jobs are of different tasks ({named}), whose {metric} "
            "are different losses: report each task's jobs on their own"
        )
    check_same_loss(runs, metric)


#: the trainer's key in the ``loss`` node: how backward combines the losses, not what they are
NOT_THE_LOSS = frozenset({"mode"})
#: keys of a built-in loss that its ``val/loss`` does not depend on: validation reports the
#: plain cross-entropy (no label smoothing), a sequence model's per valid token whatever
#: ``average`` is
NOT_IN_VAL_LOSS = {
    "trainer.losses.CrossEntropy": frozenset({"label_smoothing"}),
    "trainer.losses.TokenCrossEntropy": frozenset({"label_smoothing", "average"}),
}


def _flat(node: dict[str, Any], prefix: str = "loss.") -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in node.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        elif isinstance(v, str):
            out[f"{prefix}{k}"] = v
        else:  # (1 and 1.0 alike; dicts in lists by key)
            out[f"{prefix}{k}"] = json.dumps(_floats(v), default=str, sort_keys=True)
    return out


def _floats(v: Any) -> Any:
    if isinstance(v, int) and not isinstance(v, bool):
        return float(v)
    if isinstance(v, list | tuple):
        return [_floats(x) for x in v]
    if isinstance(v, dict):
        return {k: _floats(x) for k, x in v.items()}
    return v


def _with_defaults(loss: dict[str, Any]) -> dict[str, Any]:
    """``loss`` with the keys it leaves out at its class's defaults (``delta: 1.0`` written
    out and left out are the same loss), where the class can be imported; else as it is."""
    from hydra.utils import get_object

    try:
        signature = inspect.signature(get_object(str(loss.get("_target_"))))
    except Exception:  # noqa: BLE001 (not importable here: compared as written)
        return loss
    defaults = {
        name: p.default for name, p in signature.parameters.items()
        if p.default is not inspect.Parameter.empty
        and isinstance(p.default, int | float | str | bool | type(None))
    }  # fmt: skip
    return {**defaults, **loss}


def _jobs(names: list[str]) -> str:
    return f"job {names[0]}" if len(names) == 1 else f"jobs {', '.join(names)}"


def check_same_loss(runs: Sequence[Run], metric: str) -> None:
    """Refuse to rank ``val/loss`` or ``train/loss`` across jobs of one task that trained
    different losses (read from each job's ``.hydra/config.yaml``): a sweep over
    ``loss.label_smoothing`` ranked the unsmoothed job best by its ``train/loss``, a smaller
    number of another quantity; a Huber ``delta`` of one's own changes ``val/loss`` too. Keys
    a metric does not depend on are not compared (``loss.mode``; for ``val/loss`` the
    built-in losses' smoothing and token average, :data:`NOT_IN_VAL_LOSS`). Jobs without a
    readable config are not compared.

    Raises:
        ReportError: the completed jobs' losses differ in a key ``metric`` depends on.
    """
    if metric not in ("val/loss", "train/loss"):
        return
    losses: dict[str, dict[str, str]] = {}
    for r in runs:
        if r.status == "completed" and r.loss is not None:
            target = str(r.loss.get("_target_"))
            drop = NOT_THE_LOSS | (NOT_IN_VAL_LOSS.get(target, frozenset())
                                   if metric == "val/loss" else frozenset())  # fmt: skip
            node = _with_defaults(r.loss)
            losses[r.name] = _flat({k: v for k, v in node.items() if k not in drop})
    if len({json.dumps(v, sort_keys=True) for v in losses.values()}) < 2:
        return
    keys = sorted({k for v in losses.values() for k in v})
    differ = [k for k in keys if len({v.get(k) for v in losses.values()}) > 1]
    groups: dict[str, list[str]] = {}
    for name, v in losses.items():
        label = ", ".join(f"{k}={v[k]}" if k in v else f"{k} unset" for k in differ)
        groups.setdefault(label, []).append(name)
    named = "; ".join(f"{label}: {_jobs(jobs)}" for label, jobs in groups.items())
    raise ReportError(
        f"--metric {metric}: the jobs trained different losses ({named}), whose {metric} "
        "are different quantities: rank by the task's metric (val/acc, val/mse, val/ppl) or "
        "report each loss's jobs on their own"
    )


def format_number(v: Any) -> str:
    """4 significant digits; whole numbers from 1000 up without exponent; ``-`` for none."""
    if v is None:
        return "-"
    if isinstance(v, bool) or not isinstance(v, int | float):
        return str(v)
    if isinstance(v, int):
        return str(v)
    if math.isfinite(v) and abs(v) >= 1000:
        return f"{v:.0f}"
    return f"{v:.4g}"


def render_table(ranked: Sequence[Run], metric: str, mode: str, unnamed: int = 0) -> str:
    """The ranked runs as an aligned text table, ``*`` on the best, and a closing line
    (``unnamed``: planned jobs never started that have no row, :func:`not_started`)."""
    best = best_run(ranked, metric)
    cols = columns_for(metric, ranked)
    noted = any(r.note for r in ranked)
    header = ["", "job", "status", *cols, "overrides", "error / note" if noted else "error"]
    rows = [header]
    for r in ranked:
        numbers = [format_number(r.metrics.get(c)) for c in cols]
        mark = "*" if r is best else ""
        rows.append([mark, r.name, r.status, *numbers, " ".join(r.overrides),
                     r.error_line or r.note])  # fmt: skip
    # drop the error column when no job has one
    if not any(row[-1] for row in rows[1:]):
        rows = [row[:-1] for row in rows]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    numeric = range(3, 3 + len(cols))
    lines = []
    for row in rows:
        cells = [
            cell.rjust(w) if i in numeric else cell.ljust(w)
            for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        ]
        lines.append("  ".join(cells).rstrip())
    direction = "highest" if resolve_mode(metric, mode) == "max" else "lowest"
    if best is not None:
        shown = format_number(best.value(metric))
        summary = f"best: job {best.name} ({metric} {shown}, {direction})"
        tied = [r.name for r in ranked[1:] if r.status == "completed"
                and r.value(metric) == best.value(metric)]  # fmt: skip
        if tied:  # (the first in job order is marked; the others are as good)
            summary += f", tied with job{'s' if len(tied) > 1 else ''} {', '.join(tied)}"
    else:
        summary = f"best: none (no completed job has a value for {metric})"
    counts: dict[str, int] = {}
    for r in ranked:
        counts[r.status] = counts.get(r.status, 0) + 1
    if unnamed:
        counts[NOT_STARTED] = counts.get(NOT_STARTED, 0) + unnamed
    tally = ", ".join(f"{n} {s}" for s, n in counts.items())
    total = len(ranked) + unnamed
    jobs = f"{total} job{'' if total == 1 else 's'}"
    return "\n".join([*lines, "", f"{jobs} ({tally}); {summary}"])


def write_csv(ranked: Sequence[Run], metric: str, path: Path) -> None:
    """The table's rows at full precision (``repr`` of the floats), with the full error text."""
    best = best_run(ranked, metric)
    cols = columns_for(metric, ranked)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["best", "job", "status", *cols, "overrides", "error", "path", "note"])
        for r in ranked:
            numbers = ["" if r.metrics.get(c) is None else r.metrics[c] for c in cols]
            # (no folder, but where it holds an earlier sweep's run: noted)
            where = "" if r.status == NOT_STARTED and not r.note else str(r.path)
            w.writerow(["*" if r is best else "", r.name, r.status, *numbers,
                        " ".join(r.overrides), r.error, where, r.note])  # fmt: skip


def curve_labels(runs: Sequence[Run]) -> tuple[list[str], list[str]]:
    """Legend labels (job name + the overrides that tell it apart) and the overrides all share.

    A sweep's jobs usually share most overrides (``trainer.device=cpu ...``); in the legend
    they would push the ones that differ past the truncation, so they are named once instead.
    """
    shared = set.intersection(*(set(r.overrides) for r in runs)) if len(runs) > 1 else set()
    common = [o for o in runs[0].overrides if o in shared] if runs else []
    labels = []
    for r in runs:
        text = " ".join([r.name, *(o for o in r.overrides if o not in shared)])
        labels.append(text if len(text) <= MAX_LABEL else text[: MAX_LABEL - 1] + "…")
    return labels, common


def y_limits(runs: Sequence[Run], tag: str) -> tuple[float, float] | None:
    """The y-range of a panel: the completed jobs' values, widened by the others' at most one
    span each way, so a diverged job (loss 1e30 at its last step) does not flatten the rest."""

    def finite(rs: Sequence[Run]) -> list[float]:
        return [v for r in rs for _, v in r.curves.get(tag, []) if math.isfinite(v)]

    every = finite(runs)
    kept = finite([r for r in runs if r.status == "completed"]) or every
    if not kept:
        return None
    lo, hi = min(kept), max(kept)
    span = max(hi - lo, 0.1 * abs(hi), 1e-6)
    lo, hi = max(min(every), lo - span), min(max(every), hi + span)
    pad = 0.05 * max(hi - lo, 0.1 * abs(hi), 1e-6)
    return lo - pad, hi + pad


def empty_panel_note(runs: Sequence[Run], tag: str) -> str:
    """What a panel with no finite value to draw says: nothing logged, or only NaN/Inf."""
    if any(r.curves.get(tag) for r in runs):
        return f"{tag}: no finite value (NaN or Inf)"
    return f"no {tag} logged"


def plot_curves(ranked: Sequence[Run], metric: str, path: Path) -> None:
    """Write ``path`` (PNG): a panel per tag of :func:`curve_tags` (the runs' ``curves``
    read for them), a line per job, one legend."""
    # matplotlib is imported here: ~1 s that --help and the tests of the table don't need; the
    # Agg canvas is used directly, so no pyplot and no global backend switch
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    best = best_run(ranked, metric)
    tags = curve_tags(metric)
    plotted = [r for r in ranked if any(r.curves.get(tag) for tag in tags)]
    labels, common = curve_labels(plotted)
    colors = _colors(len(plotted))
    legend_h = 0.22 * math.ceil(len(plotted) / 2) + 0.2 if plotted else 0.0  # inches, 2 columns
    fig = Figure(figsize=(12, 4.5 + legend_h))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(tags))
    handles = []
    for r, label, color in zip(plotted, labels, colors, strict=True):
        style = {"color": color, "linewidth": 2.2 if r is best else 1.2}
        for ax, tag in zip(axes, tags, strict=True):
            points = r.curves.get(tag)
            if points:
                steps, values = zip(*points, strict=True)
                ax.plot(steps, values, marker="." if len(points) < 30 else None, **style)
        mark = "* " if r is best else ""
        status = "" if r.status == "completed" else f" ({r.status})"
        handles.append(Line2D([], [], label=mark + label + status, **style))
    for ax, tag in zip(axes, tags, strict=True):
        ax.set_title(tag)
        ax.set_xlabel("step")
        ax.set_ylabel(tag)
        ax.grid(alpha=0.3)
        limits = y_limits(plotted, tag)
        if limits is None:
            ax.text(0.5, 0.5, empty_panel_note(plotted, tag), ha="center", va="center",
                    transform=ax.transAxes, color="gray")  # fmt: skip
        else:
            ax.set_ylim(*limits)
    if common:
        shown = " ".join(common)
        shown = shown if len(shown) <= 2 * MAX_LABEL else shown[: 2 * MAX_LABEL - 1] + "…"
        # (as written: matplotlib reads text between two $ as math, and an override holding
        # them stopped the report or showed ${oc.env:X} garbled, a probe's)
        fig.suptitle(f"all jobs: {shown}", fontsize="small", parse_math=False)
    if handles:
        legend = fig.legend(handles=handles, loc="lower center", ncol=2, fontsize="small",
                            frameon=False)  # fmt: skip
        for text in legend.get_texts():
            text.set_parse_math(False)
    fig.tight_layout(rect=(0, legend_h / (4.5 + legend_h), 1, 1))  # the bottom strip: legend
    fig.savefig(path, dpi=100)


def _colors(n: int) -> list[Any]:
    from matplotlib import colormaps

    if n <= 10:
        return [colormaps["tab10"](i) for i in range(n)]
    if n <= 20:
        return [colormaps["tab20"](i) for i in range(n)]
    return [colormaps["viridis"](i / (n - 1)) for i in range(n)]


def parse_args(argv: Sequence[str] | None) -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    parser = argparse.ArgumentParser(
        prog="scripts/report.py",
        description="Rank the jobs of a sweep (or one run) by a final metric; write "
        "summary.csv and curves.png into the dir.",
    )
    parser.add_argument("dir", type=Path, help="a Hydra multirun dir (0/ 1/ ...) or one run dir")
    parser.add_argument(
        "--metric", default=None,
        help="metrics.json key to rank by (default: the metric the jobs monitored, their "
        "metrics.json's 'monitor': val/acc, val/mse, val/ppl, or the one the sweep set)",
    )  # fmt: skip
    parser.add_argument(
        "--mode", choices=("auto", "max", "min"), default="auto",
        help="whether the highest or lowest is best; auto: the trainer's metrics' own (max "
        "for val/acc and val/token_acc, min for losses, val/mse, val/ppl), else max for a name "
        "with acc, f1, auc, precision, recall, score, iou or map in it, else min",
    )  # fmt: skip
    return parser, parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """The CLI; returns 0, or exits with status 2 and a message on bad input (argparse-style)."""
    parser, args = parse_args(argv)
    try:
        runs = collect_runs(args.dir, curves=False)
        if args.metric is None:
            args.metric = monitor_of(runs)
        check_comparable(runs, args.metric)
    except ReportError as e:
        parser.error(str(e))
    completed = [r for r in runs if r.status == "completed"]
    if completed and all(args.metric not in r.metrics for r in completed):
        known = sorted(
            {
                k
                for r in completed
                for k, v in r.metrics.items()
                if isinstance(v, int | float) and not isinstance(v, bool) and k not in NOT_METRICS
            }
        )  # (NaN too)
        parser.error(
            f"--metric: no completed job's metrics.json has {args.metric!r}; "
            f"choose one of {', '.join(known)}"
        )
    if args.mode == "auto" and args.metric not in DIRECTIONS:  # (after the check above: a
        # metric no job has got this note before its error, a probe's finding)
        print(f"note: {args.metric!r} is not one of the trainer's own metrics: the "
              f"{'highest' if resolve_mode(args.metric, 'auto') == 'max' else 'lowest'} is "
              "taken as best (--mode max or min to say)", file=sys.stderr)  # fmt: skip
    for r in runs:
        if r.status != NOT_STARTED:  # (a folder of an earlier sweep's run: not this job's)
            r.curves = run_curves(r, curve_tags(args.metric))
    root: Path = args.dir
    rows, unnamed = not_started(root, runs)
    ranked = rank_runs([*runs, *rows], args.metric, args.mode)
    print(render_table(ranked, args.metric, args.mode, unnamed))
    try:
        write_csv(ranked, args.metric, root / "summary.csv")
        plot_curves([r for r in ranked if r not in rows], args.metric, root / "curves.png")
    except OSError as e:
        parser.exit(1, f"{parser.prog}: error: cannot write into {root}: {e}\n")
    print(f"wrote {root / 'summary.csv'} and {root / 'curves.png'}")
    return 0


def cli() -> None:
    """``python scripts/report.py``: :func:`main` with the exit status it returns."""
    try:
        sys.exit(main())
    except BrokenPipeError:  # stdout closed early (``| head``): not an error of the report
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)
