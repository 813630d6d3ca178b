"""Stop signals around a failing run (run.py ``_DeferredSignals``, checkpoint.py
``StopOnSignals``: a review's findings, 2026-12-07). The README: "a stop signal arriving while
a failure is recorded (from the failing fit's ``on_exception``, through the events flushed, to
``metrics.json`` written; one the stop handler took during the failure too) is held until the
record is on disk, then raised again"; and "The previous handlers come back when ``fit`` ends
or fails". Every run here is in a forked child: a signal that is raised again may kill it."""

from __future__ import annotations

import importlib
import json
import logging
import multiprocessing
import os
import signal
import sys
import types

from conftest import make_cfg

from trainer.callbacks import Callback

OVERRIDES = ("trainer.device=cpu", "logging.progress=false", "model.hidden=[8]",
             "data.batch_size=64", "trainer.max_steps=4", "instrument=none")  # fmt: skip
STOPS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


class _Failing(Callback):
    """A run that fails where ``where`` says, with the signals it says."""

    def __init__(self, where: str) -> None:
        self.where = where

    def on_train_step_end(self, trainer, out) -> None:
        if out.step != 2:
            return
        if self.where == "stopped, then on_fit_end fails":
            os.kill(os.getpid(), signal.SIGTERM)  # a graceful stop at this step's rest point
        elif self.where != "SIGTERM during on_fit_end, which fails":
            raise RuntimeError("a bad step")

    def on_exception(self, trainer, error) -> None:
        if self.where == "second Ctrl-C during on_exception":  # (a slow on_exception of one's
            os.kill(os.getpid(), signal.SIGINT)  # own: the user presses Ctrl-C twice)
            os.kill(os.getpid(), signal.SIGINT)
        elif self.where == "SIGTERM during on_exception":
            os.kill(os.getpid(), signal.SIGTERM)

    def on_fit_end(self, trainer, metrics) -> None:
        if self.where == "SIGTERM during on_fit_end, which fails":  # (a final write, say)
            os.kill(os.getpid(), signal.SIGTERM)
            raise RuntimeError("a bad end")
        if self.where == "stopped, then on_fit_end fails":  # (a stopped run has no val/*)
            raise KeyError("val/acc")


def _child(run_dir: str, where: str) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # (a plain process's, a torchrun worker's)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGUSR1, signal.SIG_DFL)
    out = os.open(os.path.join(run_dir, "..", "stderr.txt"), os.O_WRONLY | os.O_CREAT)
    os.dup2(out, 2)  # what the process says (its stderr, its log)
    sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
    logging.getLogger().addHandler(logging.StreamHandler(sys.stderr))
    run_module = importlib.import_module("trainer.run")
    if where == "submitit's signal during the record":
        from submitit.core.job_environment import SignalHandler

        env = types.SimpleNamespace(global_rank=0, _requeue=lambda countdown: None)
        delayed = types.SimpleNamespace(_timeout_min=60, _timeout_countdown=2, function=object())
        paths = types.SimpleNamespace(submitted_pickle=os.path.join(run_dir, "..", "p"))
        submitit = SignalHandler(env, paths, delayed)
        signal.signal(signal.SIGUSR2, submitit.checkpoint_and_try_requeue)
        original = run_module._write_metrics

        def preempted_meanwhile(*args, **kwargs):  # SLURM's signal as the failure is recorded
            os.kill(os.getpid(), signal.SIGUSR2)
            return original(*args, **kwargs)

        run_module._write_metrics = preempted_meanwhile
    before = {s.name: repr(signal.getsignal(s)) for s in STOPS}
    try:
        run_module.run(make_cfg(*OVERRIDES), run_dir=run_dir, callbacks=[_Failing(where)])
    except BaseException as e:  # noqa: BLE001 (the run's error: exit 3; a signal: killed by it)
        after = {s.name: repr(signal.getsignal(s)) for s in STOPS}
        left = {k: after[k] for k in after if after[k] != before[k]}
        with open(os.path.join(run_dir, "..", "child.json"), "w") as f:
            json.dump({"error": f"{type(e).__name__}: {e}", "left": left}, f)
        os._exit(3)
    os._exit(0)


def _run_in_child(tmp_path, where: str) -> tuple[int | None, dict, str]:
    make_cfg(*OVERRIDES)  # (composed before forking)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    process = multiprocessing.get_context("fork").Process(target=_child, args=(str(run_dir), where))
    process.start()
    process.join(120)
    said = tmp_path / "child.json"
    stderr = tmp_path / "stderr.txt"
    return (process.exitcode, json.loads(said.read_text()) if said.exists() else {},
            stderr.read_text() if stderr.exists() else "")  # fmt: skip


def test_a_second_ctrl_c_during_the_failures_on_exception_leaves_no_stop_handler(
    tmp_path,
) -> None:
    """A second Ctrl-C while a failing fit's ``on_exception`` hooks run raises
    KeyboardInterrupt out of the hook loop (``except Exception`` there) before
    ``StopOnSignals.on_exception``: its handlers stay on SIGTERM / SIGINT / SIGUSR1 after
    ``run()`` has raised (``_DeferredSignals`` even takes them as "the handlers that were in
    place" and puts them back), so a later SIGTERM only sets a dead trainer's flag."""
    code, said, _ = _run_in_child(tmp_path, "second Ctrl-C during on_exception")
    assert code == 3, (code, said)  # (run() raised; nothing killed the process)
    assert said["left"] == {}, (
        f"after run() raised, these signals still have the failed run's stop handler: "
        f"{said['left']}"
    )


def test_submitits_signal_arriving_while_the_failure_is_recorded_waits_for_the_record(
    tmp_path,
) -> None:
    """In a submitit job submitit's signal (SIGUSR2) is one of the run's stop signals; the
    failing fit's ``on_exception`` puts submitit's handler back and ``_DeferredSignals`` holds
    SIGTERM / SIGINT / SIGUSR1 only: SLURM's SIGUSR2 during the record runs submitit's
    handler there, which requeues the job and exits before ``metrics.json`` is written."""
    code, said, _ = _run_in_child(tmp_path, "submitit's signal during the record")
    run_dir = tmp_path / "run"
    assert (run_dir / "metrics.json").exists(), (
        f"the run ended ({code}, {said.get('error')}) without metrics.json: submitit's "
        f"signal, arriving as the failure was recorded, ran submitit's handler there; left: "
        f"{sorted(p.name for p in run_dir.iterdir())}"
    )
    assert json.loads((run_dir / "metrics.json").read_text())["status"] == "failed"


def test_a_stop_signal_taken_while_a_failing_on_fit_end_runs_is_raised_again(tmp_path) -> None:
    """The stop handler's signals are handed on (raised again after the record) only from
    ``StopOnSignals.on_exception``; a fit failing in ``on_fit_end`` (the final checkpoint's
    write, a callback's) gives ``StopOnSignals`` its ``on_fit_end`` instead, which puts the
    handlers back and drops what they took: a SIGTERM taken while the failing on_fit_end ran
    is lost, and the run raises its error as if none had come (a sweep goes on to its next
    job), where the same SIGTERM during a failing step is raised again."""
    code, said, _ = _run_in_child(tmp_path, "SIGTERM during on_fit_end, which fails")
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["status"] == "failed" and "a bad end" in metrics["error"]
    assert code == -signal.SIGTERM, (
        f"the run exited {code} ({said.get('error')}): the SIGTERM the stop handler took while "
        "the failing on_fit_end ran was never raised again"
    )


def test_a_graceful_stops_signal_is_not_forgotten_when_its_on_fit_end_fails(tmp_path) -> None:
    """SIGTERM stops the run at a rest point (checkpointed); a callback's ``on_fit_end`` then
    fails (a stopped run has no final validation: its ``val/*`` is missing). The run is
    recorded failed and raises the callback's error: the SIGTERM is forgotten (in a sweep the
    job is "failed, the sweep goes on"), where a stopped run ends the process with it, and
    where a failure a moment earlier (in ``fit``, before ``on_fit_end``) raises it again."""
    code, said, _ = _run_in_child(tmp_path, "stopped, then on_fit_end fails")
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["status"] == "failed", metrics
    assert code == -signal.SIGTERM, (
        f"the run exited {code} ({said.get('error')}): the SIGTERM that stopped it was "
        "forgotten once its on_fit_end failed"
    )


def test_a_failure_killed_by_its_held_sigterm_says_what_failed(tmp_path) -> None:
    """A held SIGTERM raised again after the record kills the process before anyone prints
    the run's error (``run()`` does not log it; its caller, or the sweep's ``_run_job``,
    would): all the process says is "SIGTERM came while the failure was recorded: raised
    again now" (rank 0's under torchrun), the failure's cause and traceback are nowhere but
    metrics.json's one line."""
    code, _, stderr = _run_in_child(tmp_path, "SIGTERM during on_exception")
    assert code == -signal.SIGTERM
    assert "raised again now" in stderr
    assert "a bad step" in stderr, (
        f"the process was killed by the held SIGTERM having said only:\n{stderr}"
    )
