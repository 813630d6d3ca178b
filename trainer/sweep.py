"""Sweeps that survive their failures: a failed job is recorded and the sweep goes on.

In a multirun, :func:`run_job` catches a job's exception (after :func:`trainer.run` has written
``metrics.json`` with ``status: failed`` and the error), logs it and returns None, so the other
jobs run and keep their outputs, and the Optuna sweeper records the trial as failed and goes on
(a NaN returned stops the whole Optuna sweep: hydra-optuna-sweeper 1.3 with optuna 2.10 tells
the study the NaN again with the failed state, which optuna refuses). A completed job whose
monitored metric is NaN (nothing was counted, or the model diverged) returns None too: a
failed trial, not a value.
:class:`SweepSummary` (a Hydra callback, ``hydra.callbacks`` in ``configs/train.yaml``) then
reads every job's ``metrics.json`` when the sweep ends, says how many jobs failed and why (and
which completed without a monitored value), and exits with status 1 if any failed. A single run
still raises as usual (one of the trainer's own refusals, :func:`own_refusal`, as one line
without the traceback, unless ``HYDRA_FULL_ERROR=1``), and returns its metric, NaN included.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import json
import logging
import math
import os
import site
import sys
import sysconfig
import uuid
import warnings
from collections import Counter
from pathlib import Path
from types import FrameType
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, ListConfig, OmegaConf

from trainer.report import (
    SWEEP_FILE,
    ReportError,
    Run,
    collect_runs,
    current_sweep_id,
    not_started,
)

log = logging.getLogger(__name__)


def in_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def check_direction(monitor: str) -> None:
    """In a multirun whose sweeper optimizes (Optuna's ``hydra.sweeper.direction``), refuse a
    direction opposite to the monitored metric's: with ``direction: maximize`` (the digits
    preset's) and ``monitor=val/loss`` or a regression's val/mse, the sweep took the worst
    trial as its best. A metric of one's own (no known direction) is warned of where the
    direction disagrees with the sweep report's guess by its name (``val/f1`` highest)."""
    from hydra.core.hydra_config import HydraConfig

    from trainer.config import ConfigError
    from trainer.report import DIRECTIONS, resolve_mode

    if not in_multirun():
        return
    direction = HydraConfig.get().sweeper.get("direction")
    direction = getattr(direction, "name", direction)  # (Optuna's default: an enum member)
    wanted = {"max": "maximize", "min": "minimize"}.get(DIRECTIONS.get(monitor, ""))
    if not isinstance(direction, str):  # (a list: several objectives; none: no optimizer)
        return
    if wanted is None:  # a metric of one's own: its direction is a guess by name, said
        guess = resolve_mode(monitor, "auto")
        if direction.lower() != f"{guess}imize":
            best = "highest" if guess == "max" else "lowest"
            log.warning(
                "hydra.sweeper.direction=%s, but the sweep report ranks %s (monitor) %s first "
                "by its name; if it is best when %s, set hydra.sweeper.direction=%simize",
                direction, monitor, best, best, guess,
            )  # fmt: skip
        return
    if direction.lower() != wanted:
        raise ConfigError(
            f"hydra.sweeper.direction={direction}, but the run reports {monitor} (monitor), "
            f"which is best when {'highest' if wanted == 'maximize' else 'lowest'}: the sweep "
            f"would take its worst trial for its best; set hydra.sweeper.direction={wanted} "
            "(or another monitor)"
        )


def planned_jobs(hydra: Any) -> int | None:
    """How many jobs a multirun was to run: the product of the basic sweeper's sweeps (its
    command line's and ``hydra.sweeper.params``), an Optuna sweeper's ``n_trials``; None
    where not known (another sweeper, a ``glob`` of config choices)."""
    target = str(OmegaConf.select(hydra, "sweeper._target_") or "")
    if "optuna" in target.lower():
        trials = OmegaConf.select(hydra, "sweeper.n_trials")
        return int(trials) if isinstance(trials, int) else None
    overrides = _basic_sweep(hydra)
    if overrides is None:
        return None
    sizes: dict[str, int] = {}
    for override in overrides:
        key = override.get_key_element()  # (the basic sweeper's key: +, ~, @package)
        sizes[key] = (len(list(override.sweep_string_iterator()))
                      if override.is_sweep_override() else 1)  # fmt: skip
    return math.prod(sizes.values())


def planned_job_overrides(hydra: Any) -> list[list[str]] | None:
    """Each job's overrides, in job number order, as the basic sweeper splits its sweep
    (Hydra's own ``BasicSweeper.split_arguments``: what each job's ``.hydra/overrides.yaml``
    holds); None where not known (another sweeper, a ``glob``)."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper

    overrides = _basic_sweep(hydra)
    if overrides is None:
        return None
    try:
        (jobs,) = BasicSweeper.split_arguments(overrides, None)
    except Exception:  # noqa: BLE001 (a range or interval sweep: the basic sweeper refuses it)
        return None
    return [list(job) for job in jobs]


def subdir_as_written(hydra: Any) -> Any:
    """``hydra.sweep.subdir`` as written (``${hydra.job.num}``, not a job's value)."""
    sweep = _as_written(OmegaConf.select(hydra, "sweep"))
    return sweep.get("subdir") if isinstance(sweep, dict) else None


def _basic_sweep(hydra: Any) -> list[Any] | None:
    """The basic sweeper's overrides, parsed (Hydra's ``Override``s); None for another
    sweeper or where they do not parse here (a ``glob`` needs the config loader)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    target = str(OmegaConf.select(hydra, "sweeper._target_") or "")
    if not target.endswith("BasicSweeper"):
        return None
    try:
        # as written: an override `seed=${hydra:job.num}` cannot be resolved at the sweep's
        # level (it failed the summary's start hook, and an interrupted sweep ended with no
        # summary: a probe's finding)
        params = _each_resolved(OmegaConf.select(hydra, "sweeper.params"))
        tasks = _as_written(OmegaConf.select(hydra, "overrides.task")) or []
        # by key, as the basic sweeper merges them: its params first, the command line over
        # them (a later value of the same key wins): a pinned `b=9` over params' `b: 5,6,7`
        # is 1 job
        given = [f"{k}={v}" for k, v in dict(params).items()] + [*map(str, tasks)]
        overrides = OverridesParser.create().parse_overrides(given)
        for override in overrides:
            if override.is_sweep_override():
                list(override.sweep_string_iterator())  # (a glob raises here, not later)
    except Exception:  # noqa: BLE001 (a glob needs the config loader: not counted)
        return None
    return list(overrides)


def _each_resolved(params: Any) -> dict[str, Any]:
    """The sweeper's params, each value resolved where it can be (``lr: ${lrs}``, a list of
    the config's), else as written (a job's own ``${hydra:job.num}``)."""
    if not isinstance(params, DictConfig):
        return dict(params or {})
    out: dict[str, Any] = {}
    for key in params:
        try:
            out[str(key)] = params[key]
        except Exception:  # noqa: BLE001 (not resolvable at the sweep's level)
            out[str(key)] = _as_written(params)[key]
    return out


def task_overrides() -> list[str]:
    """The Hydra job's command-line overrides as written (``hydra.overrides.task``): a
    ``${...}`` in one left unresolved (read resolved, one naming a missing key stopped a
    single run with a traceback before anything was recorded, and metrics.json recorded the
    values for the overrides, a probe's)."""
    from hydra.core.hydra_config import HydraConfig

    return [str(o) for o in _as_written(HydraConfig.get().overrides.task)]


def _as_written(node: Any) -> Any:
    """A config node as plain containers, its ``${...}`` left unresolved."""
    if isinstance(node, DictConfig | ListConfig):
        return OmegaConf.to_container(node, resolve=False)
    return node


def own_refusal(error: BaseException) -> bool:
    """Whether ``error`` is one of the trainer's own refusals, whose message says what is
    wrong (a config value, a file, a resume, a component refused while it is built, a
    non-finite step): raised by the trainer's code (its innermost frame), a ``ValueError``, a
    missing file, a folder for a file, or an exception class of its own. An error raised in
    one's own code or in torch's keeps its traceback, which is where its cause is."""
    frame = _raised_in(error)
    if frame is None or str(frame.f_globals.get("__name__", "")).split(".")[0] != "trainer":
        return False
    own_class = type(error).__module__.split(".")[0] == "trainer"
    if not (own_class or isinstance(error, ValueError | FileNotFoundError | IsADirectoryError)):
        return False
    if getattr(error, "whole_story", False):  # (a refusal whose message says it all, though
        return True  # its cause passed through one's own code: components.build's)
    # a refusal that wraps an error raised in, or through, one's own code (an import of one's
    # module that failed there, or in a library it called: reviews') keeps the traceback
    # that leads there
    cause, seen = error.__cause__, {id(error)}
    while cause is not None and id(cause) not in seen:  # (a chain may loop)
        seen.add(id(cause))
        tb = cause.__traceback__
        while tb is not None:
            if _ones_own(tb.tb_frame):
                return False
            tb = tb.tb_next
        cause = cause.__cause__
    return True


def _raised_in(error: BaseException) -> FrameType | None:
    """The innermost frame of ``error``'s traceback (where it was raised), if any."""
    tb = error.__traceback__
    if tb is None:
        return None
    while tb.tb_next is not None:
        tb = tb.tb_next
    return tb.tb_frame


def _ones_own(frame: FrameType) -> bool:
    """A frame of one's own code: neither the trainer's nor of a file under Python's own
    folders (the standard library, installed packages: torch's, Hydra's, importlib's)."""
    if str(frame.f_globals.get("__name__", "")).split(".")[0] == "trainer":
        return False
    if frame.f_code.co_filename.startswith("<"):  # (importlib's frozen modules, exec'd code)
        return False
    path = os.path.realpath(frame.f_code.co_filename)
    return not any(path.startswith(root + os.sep) for root in _python_folders())


@functools.cache
def _python_folders() -> tuple[str, ...]:
    """The standard library's folders and those of installed packages (site-packages,
    dist-packages: not ``sys.prefix`` itself, under which one's own code may live: /usr)."""
    paths = sysconfig.get_paths()
    folders = [paths[k] for k in ("stdlib", "platstdlib", "purelib", "platlib") if k in paths]
    folders += [*site.getsitepackages(), site.getusersitepackages()]
    return tuple({os.path.realpath(f) for f in folders})


def _with_notes(error: BaseException) -> str:
    """``str(error)`` and its notes (which callback's hook it came from: ``(in
    MyCallback.on_rest_point)``), as ``metrics.json`` records it."""
    return f"{error}" + "".join(f" {n}" for n in getattr(error, "__notes__", ()))


def job_sweep_id(run_dir: Path) -> str | None:
    """The id of the sweep this job is of (:data:`trainer.report.SWEEP_FILE`): a sweep's
    job, its sweep dir's; a single run in a sweep's job folder ``run_dir`` (a job continued
    by hand), the id that folder's result records; else None. The sweep dir as written is
    relative to where the sweep started (``hydra.runtime.cwd``: with ``hydra.job.chdir=true``
    every job found none, a review's)."""
    from hydra.core.hydra_config import HydraConfig

    if not in_multirun():  # (the id its folder's last result records: a fresh folder in a
        # sweep dir, or an earlier sweep's job continued, is not the current sweep's, a
        # review's)
        try:
            recorded = json.loads((Path(run_dir) / "metrics.json").read_text()).get("sweep_id")
        except (OSError, UnicodeDecodeError, ValueError, AttributeError):
            # no result there yet: a job of the sweep dir's last sweep killed before it wrote
            # one, finished by hand (it was left out, listed as not started, a review's)
            folder = Path(run_dir).absolute()
            numbered = folder.name.isascii() and folder.name.isdigit()
            return current_sweep_id(folder.parent) if numbered else None
        return recorded if isinstance(recorded, str) else None
    hc = HydraConfig.get()
    try:
        cwd = str(hc.runtime.cwd)
    except Exception:  # noqa: BLE001 (a config composed by hand has none: where it runs)
        cwd = os.getcwd()
    return current_sweep_id(Path(cwd) / hc.sweep.dir)


def _into_log_files(text: str, error: BaseException | None = None) -> None:
    """A single run's failure, which the console shows (Hydra prints the traceback, or the
    trainer its ``Error:`` line), written into the run's log file too (Hydra's job log,
    ``train.log``): the run's folder said nothing of why it failed (a probe's)."""
    exc_info = (type(error), error, error.__traceback__) if error is not None else None
    record = log.makeRecord(log.name, logging.ERROR, __file__, 0, text, (), exc_info)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler) and record.levelno >= handler.level:
            with contextlib.suppress(Exception):  # (a full disk: the console has said it)
                handler.handle(record)


def _job_label() -> str:
    """``job <n>: `` in a multirun (as the job's other lines begin), else nothing."""
    from trainer.run import _sweep_progress

    try:
        return str(_sweep_progress().get("label", ""))
    except Exception:  # noqa: BLE001 (no Hydra config: a job run by hand)
        return ""


def run_job(cfg: DictConfig) -> float | None:
    """Train (``trainer.run``) and return the monitored metric (``monitor``: val/acc for
    classification, val/mse for regression); in a multirun a failure, or a NaN metric,
    returns None (a failed trial for the Optuna sweeper, which a NaN would stop).

    Python warnings during the job (torch's, a library's, a model's own ``warnings.warn``)
    are logged (``py.warnings``, one line, labelled as the job's lines are): they went to
    stderr alone, not into the run's ``train.log``, and on a terminal into the bar (a
    probe's). Python's filters are as they are (once per place and process by default: a
    sequential sweep's later job does not repeat an earlier one's). Left alone where something
    else shows warnings already (a recorder: ``pytest.warns``, ``catch_warnings(record=True)``;
    ``logging.captureWarnings`` of one's own; Python's context-aware warnings, whose recorders
    this cannot see). Data-parallel, a rank other than the first labels its lines (they
    share the run's log)."""
    from trainer.distributed import teardown
    from trainer.run import run

    before = warnings.showwarning
    if _warnings_shown_plainly():  # (a module global: a launcher running jobs as threads
        # labels them as the first; the shipped ones run each job in a process of its own)
        warnings.showwarning = functools.partial(_log_warning, _job_label())
    try:
        with _rank_labelled():
            return _run_job(cfg, run, teardown)
    finally:
        warnings.showwarning = before


def _warnings_shown_plainly() -> bool:
    """Whether Python shows warnings its own way now: not recorded (``catch_warnings(
    record=True)`` replaces the function behind ``showwarning``), not replaced, and not in
    context-aware mode (Python 3.14: its recorders live in a context variable)."""
    if getattr(sys.flags, "context_aware_warnings", False):
        return False
    impl = getattr(warnings, "_showwarnmsg_impl", None)
    return (
        warnings.showwarning is getattr(warnings, "_showwarning_orig", None)
        and getattr(impl, "__name__", "") == "_showwarnmsg_impl"
    )


def _log_warning(
    label: str,
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: Any = None,
    line: str | None = None,
) -> None:
    """``warnings.showwarning`` during a job: the warning as Python words it, on one line
    (its source line left out), logged."""
    text = warnings.formatwarning(message, category, filename, lineno, line="").rstrip("\n")
    logging.getLogger("py.warnings").warning("%s%s", label, text)


class _RankLabel(logging.Filter):
    """``rank <r>: `` before each of a rank's lines (other than the first's), once a record."""

    def __init__(self, rank: int) -> None:
        super().__init__()
        self.prefix = f"rank {rank}: "

    def filter(self, record: logging.LogRecord) -> bool:
        if not getattr(record, "_rank_labelled", False):
            record.msg = f"{self.prefix}{record.msg}"
            record._rank_labelled = True
        return True


@contextlib.contextmanager
def _rank_labelled() -> Any:
    """Data-parallel (the world :func:`trainer.distributed.from_env` finds: torchrun's, or a
    SLURM job's tasks), a rank other than the first labels its log lines: every rank writes
    into the run's one ``train.log`` (a rank's warnings and its ``Error:`` line were told from
    the first's by nothing, a review's)."""
    from trainer.distributed import from_env

    try:
        world = from_env()
        rank, size = world.rank, world.size
    except Exception:  # noqa: BLE001 (a malformed environment: the run says so itself)
        rank, size = 0, 1
    if size <= 1 or rank == 0:
        yield
        return
    label, handlers = _RankLabel(rank), list(logging.getLogger().handlers)
    for handler in handlers:
        handler.addFilter(label)
    try:
        yield
    finally:
        for handler in handlers:
            handler.removeFilter(label)


#: the jobs this process ran whose failure their folder could not record (it holds another
#: run's outputs), by their overrides (:func:`trainer.report._job`): the summary counts them
#: as failed, with their error, where the report finds no result of theirs (a launcher that
#: runs jobs in other processes leaves this empty: they are then counted as not started)
_failed_here: dict[tuple[str, ...], tuple[int, str]] = {}


def _job_of(cfg: DictConfig) -> tuple[str, ...]:

    from trainer.report import _job

    return _job(task_overrides())


def _run_job(cfg: DictConfig, run: Any, teardown: Any) -> float | None:
    try:
        result = run(cfg)
        if not in_multirun():  # (a sweep's jobs may share the process: left to its exit)
            teardown()
    except SystemExit as e:
        if getattr(e, "requeue", None) is None or not in_multirun():
            raise
        # a submitit job stopped at its time limit or preemption, handed to submitit, which
        # did not requeue it (or does from another task): the task ends without an exit
        # status of its own, as submitit's other tasks do (one exiting 140 left no result,
        # and Hydra's launcher failed the sweep collecting it, a probe's)
        log.warning(
            "%sinterrupted, checkpointed (its metrics.json says so): a requeued job, or "
            "trainer.resume=auto, continues it",
            _job_label() or "job ",
        )
        return None
    except Exception as e:
        if not in_multirun():
            if own_refusal(e) and os.environ.get("HYDRA_FULL_ERROR") != "1":
                # the message names the key, the file or the step and what is wrong; Hydra's
                # traceback of the trainer's own frames printed before it only buried it
                print(f"Error: {_with_notes(e)}\n(HYDRA_FULL_ERROR=1 shows the traceback)",
                      file=sys.stderr)  # fmt: skip
                _into_log_files(f"Error: {_with_notes(e)}")
                sys.exit(1)
            _into_log_files("failed, with the traceback below", e)
            raise
        job = _job_label() or "job "  # (parallel jobs' lines interleave: whose, a probe's)
        # (a failure its folder could not record, which holds another run's outputs: where
        # it was, said; it is counted as failed by this process's summary, not as a job
        # never started, the report's word for a job with no result of its own, a probe's)
        kept = not any(n.startswith("(not recorded in ") for n in getattr(e, "__notes__", ()))
        where = "its metrics.json says why" if kept else "its folder could not record it"
        if not kept:
            from hydra.core.hydra_config import HydraConfig

            number = int(HydraConfig.get().job.num)
            _failed_here[_job_of(cfg)] = (number, f"{type(e).__name__}: {_with_notes(e)}")
        if own_refusal(e) and os.environ.get("HYDRA_FULL_ERROR") != "1":  # (its message is
            # all: a bad value's 40 lines of OmegaConf's frames buried it, a probe's)
            log.error("%sfailed, the sweep goes on (%s): %s: %s",
                      job, where, type(e).__name__, _with_notes(e))  # fmt: skip
        else:
            log.exception("%sfailed, the sweep goes on (%s): %s", job, where, e)  # fmt: skip
        return None
    value = result[result["monitor"]]
    if not math.isfinite(value) and in_multirun():  # (±Inf too: −Inf would win a minimizing
        # sweep, a diverged loss of one's own)
        log.warning("%s is %s (nothing was counted, or it diverged): this job gives the "
                    "sweep no value", result["monitor"], value)  # fmt: skip
        return None
    return value


class SweepSummary(Callback):
    """At the end of a multirun: one line on how many jobs failed, and exit 1 if any. A sweep
    that a sweeper's own error stops before its end (Optuna's "No trials are completed yet"
    when every trial failed) skips Hydra's end hook: the same lines then come at the exit."""

    _ended = True

    #: the jobs the sweep was to run, where known (:func:`planned_jobs`)
    _planned: int | None = None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._ended = False
        _failed_here.clear()  # (an earlier sweep's, in this process)
        atexit.register(self._at_exit, Path(config.hydra.sweep.dir))
        self._planned = planned_jobs(config.hydra)
        # the sweep's id, which its jobs record (the report tells an earlier sweep's job
        # folders in a reused dir by it); written before any job starts
        cwd = OmegaConf.select(config, "hydra.runtime.cwd", default=None) or os.getcwd()
        sweep_dir = Path(cwd) / config.hydra.sweep.dir  # (the jobs may chdir: absolute)
        from trainer.checkpoint import write_json

        try:
            sweep_dir.mkdir(parents=True, exist_ok=True)
            write_json(sweep_dir / SWEEP_FILE, {"sweep_id": uuid.uuid4().hex})  # (atomic)
        except OSError as e:  # (the sweep runs; the report falls back to the overrides)
            log.warning("sweep: could not write %s (%s)", sweep_dir / SWEEP_FILE, e)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        self._ended = True
        self._summarize(Path(config.hydra.sweep.dir), stopped=False)

    def _at_exit(self, sweep_dir: Path) -> None:
        if not self._ended:  # (the process exits with Hydra's status 1 already)
            self._ended = True
            self._summarize(sweep_dir, stopped=True)

    def _summarize(self, sweep_dir: Path, *, stopped: bool) -> None:
        if not sweep_dir.is_dir():
            return
        try:
            jobs = collect_runs(sweep_dir, curves=False)
        except ReportError:  # no job got as far as its run dir
            return
        failed = [r for r in jobs if r.status != "completed"]
        # jobs an interrupted sweep never started have no folder: counted, not left out (the
        # sweep read as a smaller one, its best taken from 2 of 3 points: a probe's finding),
        # as the report counts them (the plan's jobs no folder matches: a reused dir's stale
        # jobs do not hide this sweep's, a review's); where multirun.yaml tells nothing, by
        # count (folders are named by hydra.sweep.subdir, ${hydra.job.num} or one's own)
        rows, count = not_started(sweep_dir, jobs)
        from trainer.report import _job

        # (failed in this process, unrecorded in a folder of another run: a job's row, the
        # plan's, or of the count where the plan lists none, Optuna's; listed as not started,
        # or missing, though its log line said it failed, a review's)
        said = dict(_failed_here)
        for r in failed:  # (its folder's, missing: an earlier sweep's result there)
            if r.status == "missing" and _job(r.overrides) in said:
                r.status, r.error = "failed", said.pop(_job(r.overrides))[1]
        refused = [r for r in rows if _job(r.overrides) in said]
        for r in refused:
            r.status, r.error = "failed", said.pop(_job(r.overrides))[1]
            r.note = "its folder holds another run's outputs, which it left as they were"
        if count:  # (no plan of jobs: those of the count this process saw refused)
            for key, (number, error) in sorted(said.items(), key=lambda kv: kv[1][0])[:count]:
                refused.append(Run(str(number), sweep_dir, "failed", list(key), error=error,
                                   note="its folder holds another run's outputs, which it "
                                   "left as they were"))  # fmt: skip
                count -= 1
        failed += refused
        rows = [r for r in rows if all(r is not f for f in refused)]
        unstarted = len(rows) + count
        if not (sweep_dir / "multirun.yaml").is_file():
            unstarted = max(0, (self._planned or 0) - len(jobs))
        unvalued = [r.name for r in jobs if r.status == "completed"
                    and r.value(str(r.metrics.get("monitor"))) is None]  # fmt: skip
        if unvalued:
            log.warning("%s %s completed without a value of the monitored metric (NaN or "
                        "missing)", "job" if len(unvalued) == 1 else "jobs",
                        ", ".join(unvalued))  # fmt: skip
        ended = "stopped before its end by the error above" if stopped else "finished"
        if not failed and not unstarted:
            (log.error if stopped else log.info)(
                "sweep %s: %s completed (%s)", ended,
                "its 1 job" if len(jobs) == 1 else f"all {len(jobs)} jobs", sweep_dir,
            )  # fmt: skip
            return
        for r in failed:
            last = next((ln for ln in reversed(r.error.splitlines()) if ln.strip()), "")
            if not last and r.status == "missing":
                last = "no metrics.json (it ended before writing one)"
            elif not last and r.status == "interrupted":
                last = (
                    f"stopped by {r.metrics.get('signal', 'a signal')} at step "
                    f"{r.metrics.get('step', '?')} (trainer.resume=auto continues it)"
                )
            elif not last and r.note:  # (not started: its folder holds an earlier sweep's run)
                last = r.note
            log.error("job %s %s: %s", r.name, r.status, last)
        statuses = Counter(r.status for r in failed)
        if unstarted:  # (and the jobs whose folder holds an earlier sweep's run, in failed)
            statuses["not started"] += unstarted
        what = (
            "failed"
            if set(statuses) == {"failed"}
            else "did not complete ("
            + ", ".join(f"{n} {status}" for status, n in sorted(statuses.items()))
            + ")"
        )  # (a job stopped by a signal is interrupted, and resumable, not failed)
        where = (
            f"the others' outputs are in {sweep_dir} (python scripts/report.py {sweep_dir})"
            if jobs or refused
            else "no job ran: Hydra checks every point before the first job, and the error "
            "above stopped it (a value of another type than its key's, an unknown choice, "
            "...); fix it and run the sweep again"
            if stopped
            else f"no job ran; its plan is in {sweep_dir}"
        )  # (it said the others' outputs were there, of a sweep that ran none, a probe's)
        message = (
            f"sweep {ended}: {len(failed) + unstarted} of {len(jobs) + len(refused) + unstarted}"
            f" jobs {what}; {where}"
        )
        log.error(message)
        if not stopped:  # (status 1; the message is logged above: SystemExit(message)
            raise SystemExit(1)  # printed it a second time)
