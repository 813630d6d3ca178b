"""Nothing lost: runs killed with SIGKILL resume bitwise; stop signals checkpoint and exit.

The runs are separate processes: children forked from the test process (they inherit its
imports, which saves the 4 s start-up of a fresh interpreter per run), each training on one
thread (GNU OpenMP's thread pool does not survive a fork, and one thread everywhere makes the
reference and the resumed runs comparable bit for bit). One test drives the real CLI too.
"""

from __future__ import annotations

import importlib
import json
import logging
import multiprocessing as mp
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch._dynamo  # noqa: F401  (imported once here, not in every child: torch.optim uses it)
from conftest import (
    ROOT,
    StopAt,
    compose_before_forking,
    final_params,
    make_cfg,
    read_scalars,
    train,
)

from trainer.checkpoint import load_checkpoint
from trainer.config import ConfigError
from trainer.loop import Callback

FORK = mp.get_context("fork")
# digits / MLP at batch 8: 180 steps per epoch; checkpoints every 25 steps land mid-epoch
COMMON = (
    "trainer.max_epochs=2", "data.batch_size=8", "trainer.checkpoint.every_n_steps=25",
    "trainer.checkpoint.keep_last=2", "logging.every_n_steps=3", "logging.progress=false",
)  # fmt: skip
MODES = {
    "scalar": (),
    # vector mode with class-balanced weights, an l2 regularizer, dropout (torch's RNG state
    # must survive the kill) and curvature measurements (so must their probe generator's)
    "vector": (
        "loss.mode=vector",
        "model.dropout=0.2",
        "weighting=class_balanced",
        "regularizer=[l2]",
        "instrument.curvature.every_n_steps=40",
        "instrument.curvature.power_iters=5",
        "instrument.curvature.tol=0",  # (5 products, unchecked: an estimate, compared exactly)
        "instrument.curvature.trace_probes=2",
        # norms on steps that do not log (every 5th; logs every 3rd): kept on the device, so
        # a checkpoint (every 25th) must write them first (step 25: a checkpoint, no log)
        "instrument.norms.every_n_steps=5",
    ),  # fmt: skip
}
STEPS_PER_EPOCH = 180


class _StartedMarker(Callback):
    """Touches a file once the run has taken ``after`` optimizer steps, then waits there for
    the parent's signal (so a slow parent cannot let the run finish first; bounded, so a lost
    signal fails the test instead of hanging it)."""

    def __init__(self, path: Path, after: int):
        self.path, self.after = path, after

    def on_train_step_end(self, trainer, out) -> None:
        if trainer.global_step == self.after:
            self.path.touch()
            deadline = time.monotonic() + 120
            while trainer.stop_signal is None and time.monotonic() < deadline:
                time.sleep(0.001)  # the signal handler runs in this (main) thread


def _child(overrides: tuple[str, ...], run_dir: str, marker: str | None) -> None:
    torch.set_num_threads(1)
    from trainer.run import run

    callbacks = [_StartedMarker(Path(marker), 5)] if marker else []
    run(make_cfg(*overrides), run_dir, callbacks=callbacks)


def start(overrides, run_dir: Path, marker: Path | None = None):
    compose_before_forking(*overrides)
    p = FORK.Process(target=_child, args=(tuple(overrides), str(run_dir), marker and str(marker)))
    p.start()
    return p


def finish(p, timeout: float = 120) -> int:
    p.join(timeout)
    if p.exitcode is None:
        p.kill()
        pytest.fail("the run did not finish")
    return p.exitcode


def steps_on_disk(ckpt_dir: Path) -> list[int]:
    return sorted(int(p.stem[5:]) for p in ckpt_dir.glob("step_*.pt"))


def same_params(a: Path, b: Path) -> bool:
    pa, pb = load_checkpoint(a)["model"], load_checkpoint(b)["model"]
    return pa.keys() == pb.keys() and all(torch.equal(pa[k], pb[k]) for k in pa)


@pytest.mark.parametrize("mode", list(MODES))
def test_killed_at_random_steps_and_resumed_ends_bitwise_equal(tmp_path, mode) -> None:
    extra = (*COMMON, *MODES[mode])
    ref = tmp_path / "ref"
    assert finish(start([*extra, "trainer.run_id=ref", f"trainer.checkpoint.search_dir={ref}"],
                        ref)) == 0  # fmt: skip
    runs = tmp_path / "runs"
    resumable = [*extra, "trainer.run_id=k", "trainer.resume=auto",
                 f"trainer.checkpoint.search_dir={runs}"]  # fmt: skip
    home = runs / "start0"  # where the first start writes, and every resume continues
    rng = random.Random(0)
    killed_after = []
    for attempt in range(3):  # three SIGKILLs, each a little after a fresh checkpoint
        seen = steps_on_disk(home / "checkpoints")
        p = start(resumable, runs / f"start{attempt}")
        deadline = time.monotonic() + 60
        while not [s for s in steps_on_disk(home / "checkpoints") if s > max(seen, default=0)]:
            assert p.is_alive(), "the run ended before it could be killed"
            assert time.monotonic() < deadline
            time.sleep(0.002)
        time.sleep(rng.uniform(0.0, 0.02))
        os.kill(p.pid, signal.SIGKILL)
        assert finish(p) == -signal.SIGKILL
        killed_after.append(max(steps_on_disk(home / "checkpoints")))
    assert any(s % STEPS_PER_EPOCH for s in killed_after)  # mid-epoch
    assert killed_after == sorted(set(killed_after))  # each resume got further
    assert finish(start(resumable, runs / "final")) == 0
    # the same parameters, bit for bit, as the run that was never interrupted
    assert same_params(home / "checkpoints" / "last.pt", ref / "checkpoints" / "last.pt")
    metrics = json.loads((home / "metrics.json").read_text())
    assert metrics["status"] == "completed" and metrics["step"] == 2 * STEPS_PER_EPOCH
    assert metrics == {**json.loads((ref / "metrics.json").read_text()), "run_id": "k",
                       "wall_s": metrics["wall_s"],
                       "checkpoint": str(home / "checkpoints" / "last.pt"),
                       "job_dir": str((runs / "final").resolve())}  # fmt: skip
    # TensorBoard: every step once (the killed starts' later events purged), the same values
    got, want = read_scalars(home), read_scalars(ref)
    assert got.keys() == want.keys()
    for tag in want:
        assert got[tag] == want[tag], tag
    # the resumed starts' own dirs got no events or checkpoints of their own
    for d in (runs / "start1", runs / "start2", runs / "final"):
        assert not (d / "tb").exists() and not (d / "checkpoints").exists()


def _reference(tmp_path: Path) -> Path:
    ref = tmp_path / "ref"
    assert finish(start([*COMMON, "trainer.run_id=ref", f"trainer.checkpoint.search_dir={ref}"],
                        ref)) == 0  # fmt: skip
    return ref


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGUSR1],
                         ids=lambda s: s.name)  # fmt: skip
def test_a_stop_signal_finishes_the_step_checkpoints_and_exits(tmp_path, sig) -> None:
    run_dir, marker = tmp_path / "run", tmp_path / "started"
    every = ["trainer.checkpoint.every_n_steps=0"]  # the only step checkpoint: the signal's
    p = start([*COMMON, *every, "trainer.run_id=s", f"trainer.checkpoint.search_dir={tmp_path}"],
              run_dir, marker)  # fmt: skip
    deadline = time.monotonic() + 120
    while not marker.exists():
        assert p.is_alive() and time.monotonic() < deadline
        time.sleep(0.002)
    os.kill(p.pid, sig)
    assert finish(p) == 128 + sig  # 143 for SIGTERM, 130 SIGINT, 138 SIGUSR1
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["status"] == "interrupted" and metrics["signal"] == sig.name
    step = metrics["step"]
    assert 5 <= step < 2 * STEPS_PER_EPOCH
    ckpt = load_checkpoint(metrics["checkpoint"])
    assert ckpt["step"] == step and steps_on_disk(run_dir / "checkpoints") == [step]
    assert not (run_dir / "checkpoints" / "last.pt").exists()  # the run is not finished
    if sig == signal.SIGTERM:  # and it continues as if never stopped
        resumed = [*COMMON, *every, "trainer.run_id=s", "trainer.resume=auto",
                   f"trainer.checkpoint.search_dir={tmp_path}"]  # fmt: skip
        assert finish(start(resumed, tmp_path / "again")) == 0
        ref = _reference(tmp_path)
        assert same_params(run_dir / "checkpoints" / "last.pt", ref / "checkpoints" / "last.pt")
        assert read_scalars(run_dir) == read_scalars(ref)


class _SignalAt(Callback):
    """Sends its own process ``sig`` at the end of step ``at``."""

    def __init__(self, sig: int, at: int) -> None:
        self.sig, self.at = sig, at

    def on_train_step_end(self, trainer, out) -> None:
        if out.step == self.at:
            os.kill(os.getpid(), self.sig)


@pytest.mark.parametrize("first", [None, signal.SIGTERM], ids=["usr2", "sigterm-first"])
def test_submitits_signal_stops_the_run_checkpointed_then_submitit_requeues(
    tmp_path, caplog, first
) -> None:
    """Under Hydra's submitit launcher, SLURM sends SIGUSR2 before the time limit (and after
    SIGTERM at a preemption), and submitit's handler requeues the job and exits: it ran in
    the middle of a step, so the run was recorded failed (``SystemExit: -1``) with its steps
    since the last periodic checkpoint lost (and the job requeued to start afresh). The run
    stops at its next rest point, checkpointed, recorded interrupted, and then hands the job
    to submitit's own handler (here a real ``submitit`` SignalHandler with a stand-in
    environment), which requeues it; a resume continues it bit for bit."""
    import types

    from conftest import read_scalars, train
    from submitit.core.job_environment import SignalHandler

    requeued: list[int] = []
    env = types.SimpleNamespace(global_rank=0, _requeue=requeued.append)
    delayed = types.SimpleNamespace(_timeout_min=60, _timeout_countdown=2, function=object())
    submitit = SignalHandler(env, types.SimpleNamespace(submitted_pickle=tmp_path / "p"), delayed)
    previous = signal.signal(signal.SIGUSR2, submitit.checkpoint_and_try_requeue)
    common = ["trainer.max_steps=8", "trainer.checkpoint.every_n_steps=0", "trainer.run_id=q",
              f"trainer.checkpoint.search_dir={tmp_path}", "optimizer=sgd"]  # fmt: skip
    signals = [_SignalAt(first, 3)] if first else []
    try:
        with caplog.at_level("WARNING"), pytest.raises(SystemExit) as ended:
            train(tmp_path / "run", *common,
                  callbacks=[*signals, _SignalAt(signal.SIGUSR2, 3)])  # fmt: skip
        assert ended.value.code == -1 and requeued == [2]  # (submitit's exit, its requeue)
        assert signal.getsignal(signal.SIGUSR2) == submitit.checkpoint_and_try_requeue
        metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
        name = (first or signal.SIGUSR2).name
        assert (metrics["status"], metrics["signal"], metrics["step"]) == ("interrupted", name, 3)
        assert load_checkpoint(metrics["checkpoint"])["step"] == 3
        assert "without trainer.resume=auto the requeued job starts the run afresh" in caplog.text
        assert (
            "then submitit requeues the job"
            if first is None
            else "SIGUSR2: once the run is checkpointed, submitit requeues"
        ) in caplog.text
        assert "Caught signal SIGUSR2" in caplog.text  # (submitit's handler, of its signal)
        train(tmp_path / "again", *common, "trainer.resume=auto")
    finally:
        signal.signal(signal.SIGUSR2, previous)
    ref = tmp_path / "ref"
    train(ref, *common[:-3], "trainer.run_id=ref", f"trainer.checkpoint.search_dir={ref}",
          "optimizer=sgd")  # fmt: skip
    assert same_params(
        tmp_path / "run" / "checkpoints" / "last.pt", ref / "checkpoints" / "last.pt"
    )
    assert read_scalars(tmp_path / "run") == read_scalars(ref)
    # no submitit: SIGUSR2 is not the trainer's (its default, or one's own, handles it)
    assert signal.getsignal(signal.SIGUSR2) == previous


@pytest.mark.parametrize("rank", [0, 1])
def test_a_job_submitit_does_not_requeue_ends_interrupted(tmp_path, caplog, monkeypatch, rank):
    """At a time limit past ``max_num_timeout`` submitit's handler does not requeue: it raises
    its ``UncompletedJobError`` on the first task (and returns on the others). That error was
    the job's failure, and another task's exit 140 (an ``Interrupted``) left no result, which
    Hydra's launcher failed the sweep for (a probe, with 2 tasks of submitit's local
    executor). The run is interrupted, checkpointed, as any stopped run; in a sweep the job
    returns no value and the task ends without a status of its own."""
    import types

    from conftest import train
    from submitit.core.job_environment import SignalHandler

    from trainer import sweep
    from trainer.run import Interrupted

    env = types.SimpleNamespace(global_rank=rank, _requeue=lambda c: pytest.fail("requeued"))
    delayed = types.SimpleNamespace(_timeout_min=0, _timeout_countdown=0, function=object())
    submitit = SignalHandler(env, types.SimpleNamespace(submitted_pickle=tmp_path / "p"), delayed)
    previous = signal.signal(signal.SIGUSR2, submitit.checkpoint_and_try_requeue)
    common = ["trainer.max_steps=8", "trainer.checkpoint.every_n_steps=0", "optimizer=sgd"]
    try:
        with caplog.at_level("WARNING"), pytest.raises(Interrupted) as ended:
            train(tmp_path / "run", *common, callbacks=[_SignalAt(signal.SIGUSR2, 3)])
        assert ended.value.code == 128 + signal.SIGUSR2
        if rank == 0:
            assert "submitit did not requeue the job (Job not requeued because: timed-out " in (
                caplog.text
            )
        metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
        assert (metrics["status"], metrics["step"]) == ("interrupted", 3)
        # a sweep's job: no value, no exit of its own (outside a sweep: the exit, as ever)
        monkeypatch.setattr(sweep, "in_multirun", lambda: True)

        def run(cfg):
            raise ended.value

        assert sweep._run_job(None, run, lambda: None) is None
        assert "interrupted, checkpointed (its metrics.json says so)" in caplog.text
        monkeypatch.setattr(sweep, "in_multirun", lambda: False)
        with pytest.raises(Interrupted):
            sweep._run_job(None, run, lambda: None)
    finally:
        signal.signal(signal.SIGUSR2, previous)


def _submitits_handler(tmp_path, sig, requeued):
    """A real ``submitit`` SignalHandler (a stand-in environment, the first task, requeues
    left) installed on ``sig``; returns it and the handler it replaced."""
    import types

    from submitit.core.job_environment import SignalHandler

    env = types.SimpleNamespace(global_rank=0, _requeue=requeued.append)
    delayed = types.SimpleNamespace(_timeout_min=60, _timeout_countdown=2, function=object())
    submitit = SignalHandler(env, types.SimpleNamespace(submitted_pickle=tmp_path / "p"), delayed)
    return submitit, signal.signal(sig, submitit.checkpoint_and_try_requeue)


def test_a_sigterm_alone_under_submitit_ends_the_job_without_a_requeue(tmp_path, caplog) -> None:
    """Under submitit, a stop signal that is not submitit's (``scancel``'s SIGTERM, no
    SIGUSR2 after it) stops the run checkpointed and exits as ever: the job is not handed to
    submitit, which would requeue a cancelled job, and its line says "then exit". A run with
    trainer.resume=auto is not warned that a requeue starts it afresh. (A mutation round's:
    any stop signal taken for submitit's, the line's "then" read from submitit's presence,
    the hand-over of a run stopped without submitit's signal, and the warning without its
    ``not tc.resume``, each went unseen.)"""
    pytest.importorskip("submitit")
    from trainer.run import Interrupted

    requeued: list[int] = []
    submitit, previous = _submitits_handler(tmp_path, signal.SIGUSR2, requeued)
    try:
        with caplog.at_level("WARNING"), pytest.raises(Interrupted) as ended:
            train(tmp_path / "run", "trainer.max_steps=8", "trainer.checkpoint.every_n_steps=0",
                  "trainer.run_id=t", f"trainer.checkpoint.search_dir={tmp_path}",
                  "trainer.resume=auto", "optimizer=sgd",
                  callbacks=[_SignalAt(signal.SIGTERM, 3)])  # fmt: skip
        assert ended.value.code == 128 + signal.SIGTERM and requeued == []
        assert signal.getsignal(signal.SIGUSR2) == submitit.checkpoint_and_try_requeue
    finally:
        signal.signal(signal.SIGUSR2, previous)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert (metrics["status"], metrics["signal"], metrics["step"]) == ("interrupted", "SIGTERM", 3)
    assert "SIGTERM: finishing the current step, then a checkpoint, then exit" in caplog.text
    assert "submitit" not in caplog.text, caplog.text


def test_submitits_signal_of_its_environment_is_one_of_the_stop_signals(
    tmp_path, caplog, monkeypatch
) -> None:
    """``SUBMITIT_PREEMPT_SIGNAL`` names submitit's signal; where it is one the run stops on
    anyway (USR1), its handler is installed once: installed twice, the handler it replaced
    was read as the trainer's own, and the trainer's stayed on the signal after ``fit``
    (submitit's lost). The job is handed to submitit with the signal it got. (A mutation
    round's: both went unseen.)"""
    pytest.importorskip("submitit")
    monkeypatch.setenv("SUBMITIT_PREEMPT_SIGNAL", "USR1")
    requeued: list[int] = []
    submitit, previous = _submitits_handler(tmp_path, signal.SIGUSR1, requeued)
    try:
        with caplog.at_level("WARNING"), pytest.raises(SystemExit) as ended:
            train(tmp_path / "run", "trainer.max_steps=8", "trainer.checkpoint.every_n_steps=0",
                  "optimizer=sgd", callbacks=[_SignalAt(signal.SIGUSR1, 3)])  # fmt: skip
        assert ended.value.code == -1 and requeued == [2]  # (submitit's exit, its requeue)
        assert signal.getsignal(signal.SIGUSR1) == submitit.checkpoint_and_try_requeue
    finally:
        signal.signal(signal.SIGUSR1, previous)
    assert "SIGUSR1: finishing the current step, then a checkpoint, then submitit requeues" in (
        caplog.text
    )
    assert "Caught signal SIGUSR1" in caplog.text  # (submitit's handler, of that signal)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert (metrics["status"], metrics["step"]) == ("interrupted", 3)


def test_a_handler_of_ones_own_of_sigusr2_is_not_submitits(tmp_path, caplog) -> None:
    """A handler of SIGUSR2 that is not submitit's (a function of one's own) leaves the run
    as outside submitit: no warning of a requeue, SIGUSR2 not taken over by the trainer
    while it runs. (A mutation round's: any callable handler taken for submitit's went
    unseen.)"""
    from trainer.checkpoint import submitit_requeue

    seen: list[int] = []

    class Handlers:
        def usr2(self, signum, frame) -> None:
            seen.append(signum)

    class During(Callback):
        def on_train_step_end(self, trainer, out) -> None:
            self.handler = signal.getsignal(signal.SIGUSR2)

    own = Handlers().usr2
    during = During()
    previous = signal.signal(signal.SIGUSR2, own)
    try:
        assert submitit_requeue() is None
        with caplog.at_level("WARNING"):
            train(tmp_path, "trainer.max_steps=2", callbacks=[during])
        assert during.handler == own and signal.getsignal(signal.SIGUSR2) == own
    finally:
        signal.signal(signal.SIGUSR2, previous)
    assert "submitit" not in caplog.text, caplog.text


def test_a_sweeps_job_stopped_without_submitit_still_exits(monkeypatch) -> None:
    """In a sweep, only a job handed to submitit returns no value: one stopped by a signal
    outside submitit (Ctrl-C, SIGTERM) exits with its status, which stops the sweep, as
    ever. (A mutation round's: the sweep went on to its next jobs after a Ctrl-C, unseen.)"""
    from trainer import sweep
    from trainer.run import Interrupted

    monkeypatch.setattr(sweep, "in_multirun", lambda: True)

    def run(cfg):
        raise Interrupted(128 + signal.SIGINT)

    with pytest.raises(Interrupted) as ended:
        sweep._run_job(None, run, lambda: None)
    assert ended.value.code == 128 + signal.SIGINT


class _CtrlCTwice(Callback):
    """Ctrl-C at step 5, and again while the checkpoint it triggers is being written."""

    def on_train_step_end(self, trainer, out) -> None:
        if trainer.global_step == 5:
            import trainer.checkpoint as ck

            save = ck.save_checkpoint

            def save_with_ctrl_c(path, state):
                os.kill(os.getpid(), signal.SIGINT)  # delivered during the write
                time.sleep(0.05)
                return save(path, state)

            ck.save_checkpoint = save_with_ctrl_c
            os.kill(os.getpid(), signal.SIGINT)


def _child_ctrl_c(run_dir: str) -> None:
    torch.set_num_threads(1)
    from trainer.run import run

    run(make_cfg(*COMMON, "trainer.checkpoint.every_n_steps=0"), run_dir, callbacks=[_CtrlCTwice()])


def test_a_second_ctrl_c_during_the_save_does_not_corrupt_it(tmp_path) -> None:
    compose_before_forking(*COMMON, "trainer.checkpoint.every_n_steps=0")
    p = FORK.Process(target=_child_ctrl_c, args=(str(tmp_path),))
    p.start()
    assert finish(p) == 128 + signal.SIGINT
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["status"] == "interrupted" and metrics["step"] == 5
    assert load_checkpoint(metrics["checkpoint"])["step"] == 5  # complete and loadable
    assert not list((tmp_path / "checkpoints").glob("*.tmp"))


def test_sigterm_through_the_real_cli_exits_143_with_a_checkpoint(tmp_path) -> None:
    run_dir = tmp_path / "run"
    args = [sys.executable, str(ROOT / "scripts" / "train.py"), "trainer.device=cpu",
            *COMMON, "trainer.max_epochs=20", "trainer.run_id=cli",
            f"trainer.checkpoint.search_dir={tmp_path}"]  # fmt: skip
    proc = subprocess.Popen(
        [*args, f"hydra.run.dir={run_dir}"], cwd=ROOT,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while not steps_on_disk(run_dir / "checkpoints"):  # training is under way
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 143, out[-2000:]
    assert "SIGTERM: finishing the current step" in out
    stopped = json.loads((run_dir / "metrics.json").read_text())
    assert stopped["status"] == "interrupted" and stopped["signal"] == "SIGTERM"
    assert load_checkpoint(stopped["checkpoint"])["step"] == stopped["step"]
    assert "continue with trainer.resume=auto" in out


def test_a_resume_may_add_and_drop_instruments(tmp_path, caplog) -> None:
    """Resumed with histograms added (they keep no state), per-sample norms added (they do:
    their noise-scale averages start fresh, with a warning naming them) and the non-finite
    guard dropped (its saved counts are ignored): the run continues to its end."""
    from conftest import train

    train(tmp_path / "a", "trainer.max_steps=4", "instrument.histograms.every_n_steps=0")
    resume = f"trainer.resume={tmp_path / 'a' / 'checkpoints' / 'last.pt'}"
    with caplog.at_level("WARNING", logger="trainer.loop"):
        metrics = train(tmp_path / "b", "trainer.max_steps=8", resume,
                        "instrument.histograms.every_n_steps=2",
                        "instrument.per_sample.every_n_steps=2",
                        "instrument.nonfinite.policy=off")  # fmt: skip
    assert metrics["step"] == 8
    warned = [r.getMessage() for r in caplog.records if "holds no state" in r.getMessage()]
    assert warned == ["the checkpoint holds no state for callback PerSampleNorms: it starts fresh"]
    # the guard's state, left in the checkpoint by the instrument turned off: as intended,
    # not a callback of one's own whose state was lost
    assert not [r for r in caplog.records if "is not taken by any" in r.getMessage()]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from trainer.logger import event_dir

    # the resumed run writes into the run it continues
    acc = EventAccumulator(str(event_dir(tmp_path / "a")), size_guidance={"histograms": 0})
    acc.Reload()
    assert [e.step for e in acc.Histograms("grad_hist/net.1.weight")] == [6, 8]


def test_resuming_with_changed_hyperparameters_is_refused_naming_them(tmp_path) -> None:
    """Under a named run_id a resumed run kept the checkpoint's learning rate (its optimizer
    state) whatever the command line said, and its records named the old one; a multirun with
    a fixed run_id resumed job 0's checkpoint in every job and reported its result for each
    (a probe's findings). Changing how long it trains, logging and instruments is allowed."""
    from conftest import train

    base = ["trainer.run_id=named", "trainer.resume=auto",
            f"trainer.checkpoint.search_dir={tmp_path}", "optimizer=sgd"]  # fmt: skip
    train(tmp_path / "a", *base, "trainer.max_steps=3", "optimizer.lr=0.01")
    with pytest.raises(ConfigError, match=r"this run changes optimizer.lr: 0.01 -> 0.1"):
        train(tmp_path / "b", *base, "trainer.max_steps=6", "optimizer.lr=0.1")
    metrics = train(tmp_path / "c", *base, "trainer.max_steps=6", "optimizer.lr=0.01",
                    "logging.every_n_steps=2", "instrument=none")  # fmt: skip
    assert metrics["step"] == 6 and metrics["status"] == "completed"


def test_a_resumed_runs_wall_time_counts_its_earlier_processes(tmp_path) -> None:
    """metrics.json's wall_s covered the last process only (a resumed completed run: 0.07 s for
    a 0.7 s run, a probe's finding); each checkpoint keeps the run's wall time so far, and the
    resumed run adds its own."""
    from conftest import train

    base = ["trainer.run_id=timed", "trainer.resume=auto",
            f"trainer.checkpoint.search_dir={tmp_path}"]  # fmt: skip
    first = train(tmp_path / "a", *base, "trainer.max_steps=3")
    saved = load_checkpoint(tmp_path / "a" / "checkpoints" / "last.pt")["wall_s"]
    assert 0 < saved <= first["wall_s"]
    second = train(tmp_path / "b", *base, "trainer.max_steps=6")
    assert second["wall_s"] > saved
    assert load_checkpoint(tmp_path / "a" / "checkpoints" / "last.pt")["wall_s"] > saved


def test_a_cosine_run_resumed_to_train_longer_is_refused_shorter_follows_its_schedule(
    tmp_path, caplog
) -> None:
    """CosineAnnealingLR keeps T_max in its state: a run resumed to train longer (an allowed
    change) got the checkpoint's T_max back, and past it the learning rate climbed again (a
    probe: 0 at step 47, 9.99e-4 at step 92, where the 4-epoch run has 2.9e-7). Refused, naming
    T_max; resumed to stop earlier, the learning rate is the longer run's, with a warning."""
    from conftest import train

    base = ["trainer.run_id=cos", "trainer.resume=auto", "scheduler=cosine", "optimizer=sgd",
            f"trainer.checkpoint.search_dir={tmp_path}", "logging.every_n_steps=1"]  # fmt: skip
    train(tmp_path / "a", *base, "trainer.max_steps=6", "trainer.checkpoint.every_n_steps=3")
    with pytest.raises(ConfigError, match=r"over its run's 6 steps \(T_max\); this run would "
                       r"train to step 8"):  # fmt: skip
        train(tmp_path / "b", *base, "trainer.max_steps=8")
    assert load_checkpoint(tmp_path / "a" / "checkpoints" / "last.pt")["step"] == 6
    # shorter: a copy resumed from step 3 to stop at 5 has the 6-step run's learning rates
    _resumed_shorter_follows(tmp_path, base[2:], caplog, "before it reaches eta_min")


def _resumed_shorter_follows(tmp_path, base, caplog, said: str) -> None:
    """A copy of ``a`` (6 steps, a checkpoint at 3) resumed from step 3 to stop at 5: the
    warning ``said``, and the 6-step run's learning rates at steps 4 and 5."""
    import shutil

    from conftest import train

    shutil.copytree(tmp_path / "a", tmp_path / "c")
    resume = f"trainer.resume={tmp_path / 'c' / 'checkpoints' / 'step_000000003.pt'}"
    with caplog.at_level("WARNING", logger="trainer.run"):
        train(tmp_path / "c", *base, "trainer.max_steps=5", resume)
    assert any(said in r.getMessage() for r in caplog.records)
    whole, short = (
        dict(read_scalars(tmp_path / "a")["lr"]),
        dict(read_scalars(tmp_path / "c")["lr"]),
    )
    assert [short[s] for s in (4, 5)] == [whole[s] for s in (4, 5)] and whole[5] > 0


def warm_cosine(optimizer, T_max: int, warmup: int = 2):  # noqa: N803 (torch's name)
    """A factory taking the run's length: linear warm-up, then cosine to 0 at T_max."""
    from torch.optim.lr_scheduler import CosineAnnealingLR, LinearLR, SequentialLR

    parts = [
        LinearLR(optimizer, 0.1, total_iters=warmup),
        CosineAnnealingLR(optimizer, T_max - warmup),
    ]
    return SequentialLR(optimizer, parts, milestones=[warmup])


def linear_decay(optimizer, T_max: int):  # noqa: N803
    """A factory whose LambdaLR closes over T_max (which no scheduler state keeps)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / T_max)


@pytest.mark.parametrize("factory", ["warm_cosine", "linear_decay"])
def test_a_factory_given_the_runs_length_is_checked_and_rebuilt_on_resume(
    tmp_path, caplog, factory
) -> None:
    """A scheduler factory taking T_max returns a SequentialLR or a LambdaLR, with no T_max to
    read back: a run resumed to train longer went past the schedule's end unchecked (a probe:
    the learning rate 0 at step 21, back up to 1e-3 at step 38), and a LambdaLR's closure was
    rebuilt with the new length (another schedule). The length is checkpointed: longer is
    refused, shorter is built with the checkpoint's and follows its learning rates."""
    from conftest import train

    base = ["trainer.run_id=fac", "trainer.resume=auto", "~scheduler", "optimizer=sgd",
            f"+scheduler._target_={__name__}.{factory}", "+scheduler._partial_=true",
            f"trainer.checkpoint.search_dir={tmp_path}", "logging.every_n_steps=1"]  # fmt: skip
    train(tmp_path / "a", *base, "trainer.max_steps=6", "trainer.checkpoint.every_n_steps=3")
    with pytest.raises(ConfigError, match=r"over its run's 6 steps \(T_max\); this run would "
                       r"train to step 8"):  # fmt: skip
        train(tmp_path / "b", *base, "trainer.max_steps=8")
    _resumed_shorter_follows(tmp_path, base[2:], caplog, "follows the checkpoint's")


def test_a_trainers_state_without_a_scheduler_is_refused_by_one_with_one(tmp_path):
    """``Trainer.load_state_dict`` (a trainer built in Python: no run identity checked
    before it) refuses a state written without a scheduler where its run has one, saying
    so (the schedule restarted from its first step at the checkpoint's step, unsaid)."""
    from trainer.run import build_trainer

    cosine = build_trainer(make_cfg("instrument=none", "scheduler=cosine"), tmp_path / "c",
                           with_logger=False)  # fmt: skip
    plain = build_trainer(make_cfg("instrument=none"), tmp_path / "p", with_logger=False)
    with pytest.raises(ValueError, match="written without a scheduler and this run is "
                                         "configured with one"):  # fmt: skip
        cosine.load_state_dict(plain.state_dict())
    # the other way: the scheduler's initial_lr in the optimizer's groups was read as another
    # optimizer's key ("written by another optimizer"), the wrong reason (a mutation round's)
    with pytest.raises(ValueError, match="written with a scheduler and this run is "
                                         "configured without one"):  # fmt: skip
        plain.load_state_dict(cosine.state_dict())


def test_a_checkpoint_from_before_schedule_lengths_resumes_twice(tmp_path) -> None:
    """A checkpoint without ``schedule_length`` (written before 2026-12-05): its resume
    recorded this run's length while the scheduler kept the checkpoint's, and a second resume
    at the first run's length was refused (a review). The scheduler's own length goes on."""
    import shutil

    from conftest import train

    from trainer.checkpoint import save_checkpoint

    base = ["scheduler=cosine", "optimizer=sgd", "logging.every_n_steps=1", "instrument=none"]
    train(tmp_path / "a", *base, "trainer.max_steps=6", "trainer.checkpoint.every_n_steps=3")
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    third = tmp_path / "b" / "checkpoints" / "step_000000003.pt"
    state = load_checkpoint(third)
    assert state.pop("schedule_length") == {"T_max": 6}
    save_checkpoint(third, state)
    train(tmp_path / "b", *base, "trainer.max_steps=5", f"trainer.resume={third}")
    last = tmp_path / "b" / "checkpoints" / "last.pt"
    assert load_checkpoint(last)["schedule_length"] == {"T_max": 6}
    train(tmp_path / "b", *base, "trainer.max_steps=6", f"trainer.resume={last}")
    a, b = (load_checkpoint(tmp_path / d / "checkpoints" / "last.pt")["model"] for d in "ab")
    assert all(torch.equal(a[k], b[k]) for k in a)


class _SigtermInLastValidation(Callback):
    def on_validation_end(self, trainer, metrics) -> None:
        if trainer.finished():
            os.kill(os.getpid(), signal.SIGTERM)  # (the handler of StopOnSignals takes it)


def test_a_signal_after_the_last_step_lets_the_run_complete(tmp_path, caplog) -> None:
    """SIGTERM during the last validation stopped the run as interrupted (exit 143, no
    last.pt) with all its training done, to be resumed for nothing (a probe); it completes."""
    from conftest import train

    with caplog.at_level("WARNING", logger="trainer.loop"):
        metrics = train(tmp_path, "trainer.max_steps=4", callbacks=[_SigtermInLastValidation()])
    assert metrics["status"] == "completed" and metrics["step"] == 4
    assert json.loads((tmp_path / "metrics.json").read_text())["status"] == "completed"
    assert load_checkpoint(tmp_path / "checkpoints" / "last.pt")["step"] == 4
    assert any("SIGTERM after the last step" in r.getMessage() for r in caplog.records)


class _FailsAtStep3(Callback):
    def on_train_step_end(self, trainer, out) -> None:
        if out.step == 3:
            raise RuntimeError("a crash at step 3")


def _end_status(run_dir: Path) -> int:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import metadata

    from trainer.logger import event_dir

    acc = EventAccumulator(str(event_dir(run_dir)))
    acc.Reload()
    content = acc.PluginTagToContent(metadata.PLUGIN_NAME)[metadata.SESSION_END_INFO_TAG]
    return metadata.parse_session_end_info_plugin_data(content).status


def test_a_failed_run_resumed_to_completion_shows_success_in_hparams(tmp_path) -> None:
    """TensorBoard keeps the first record of a tag: the failed process's STATUS_FAILURE stayed
    in HPARAMS after the run was resumed and completed (a probe). The resumed run takes the
    earlier end status out of its event files (every other record kept) before writing its own."""
    from conftest import train
    from tensorboard.plugins.hparams import api_pb2

    base = ["trainer.run_id=f", "trainer.checkpoint.every_n_steps=2", "logging.every_n_steps=1",
            f"trainer.checkpoint.search_dir={tmp_path}", "trainer.max_steps=5"]  # fmt: skip
    with pytest.raises(RuntimeError, match="a crash at step 3"):
        train(tmp_path / "a", *base, callbacks=[_FailsAtStep3()])
    assert _end_status(tmp_path / "a") == api_pb2.STATUS_FAILURE
    before = read_scalars(tmp_path / "a")
    metrics = train(tmp_path / "b", *base, "trainer.resume=auto")
    assert metrics["status"] == "completed"
    assert _end_status(tmp_path / "a") == api_pb2.STATUS_SUCCESS
    after = read_scalars(tmp_path / "a")  # the earlier process's records are all there
    assert {t: [p for p in v if p[0] <= 2] for t, v in before.items()} == {
        t: [p for p in after[t] if p[0] <= 2] for t in before
    }
    assert [s for s, _ in after["train/loss"]] == [1, 2, 3, 4, 5]


class _FailsAtStep8(Callback):
    def on_train_step_end(self, trainer, out) -> None:
        if out.step == 8:
            raise RuntimeError("a crash at step 8")


def _raw_steps(directory: Path) -> dict[str, list[int]]:
    """Each scalar tag's steps in the order TensorBoard reads them: the event files by name,
    their records in order (no purge applied: what a data server that ignores it shows)."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    steps: dict[str, list[int]] = {}
    for path in sorted(directory.glob("events.out.tfevents.*")):
        for event in EventFileLoader(str(path)).Load():
            for v in event.summary.value:
                if not v.tag.startswith("_hparams_/"):
                    steps.setdefault(v.tag, []).append(event.step)
    return steps


def test_a_resume_takes_the_failed_attempts_events_past_its_checkpoint_out(tmp_path) -> None:
    """A run checkpointed at step 5 that failed at step 8, resumed (logging every 4 steps
    now): the failed attempt's steps 6-8 stayed in its event file beside the resumed one's
    (TensorBoard's default data server ignores the session start's purge: steps 6 and 7 of
    the failed attempt, 8 twice, a probe's). They are taken out: each tag's steps only go up,
    and the hparams records stay."""
    from conftest import train

    from trainer.logger import event_dir

    base = ["trainer.run_id=p", "trainer.checkpoint.every_n_steps=5",
            f"trainer.checkpoint.search_dir={tmp_path}", "trainer.max_steps=14"]  # fmt: skip
    with pytest.raises(RuntimeError, match="a crash at step 8"):
        train(tmp_path / "a", *base, "logging.every_n_steps=1", callbacks=[_FailsAtStep8()])
    assert _raw_steps(event_dir(tmp_path / "a"))["train/loss"] == list(range(1, 9))
    metrics = train(tmp_path / "b", *base, "logging.every_n_steps=4", "trainer.resume=auto")
    assert metrics["status"] == "completed"
    steps = _raw_steps(event_dir(tmp_path / "a"))
    assert steps["train/loss"] == [1, 2, 3, 4, 5, 8, 12, 14]
    assert all(s == sorted(set(s)) for s in steps.values()), steps
    assert _end_status(tmp_path / "a") == 1  # (api_pb2.STATUS_SUCCESS)


def test_restart_at_takes_the_later_events_out_of_every_file(tmp_path) -> None:
    """A fit called again trains from the rest point its failed attempt is taken back to:
    the events that attempt wrote at that step and later are taken out of the run's files
    (a session start alone left them to TensorBoard's default data server), and the new
    ones go to a new file, which starts with the session start (older TensorBoards)."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    from trainer.logger import TensorBoardLogger

    logger = TensorBoardLogger(tmp_path)
    for step in range(1, 6):
        logger.add_floats({"a": float(step)}, step)
    logger.restart_at(3)
    for step in (3, 4):
        logger.add_floats({"a": 10.0 * step}, step)
    logger.close()
    assert _raw_steps(tmp_path) == {"a": [1, 2, 3, 4]}
    files = sorted(tmp_path.glob("events.out.tfevents.*"))
    assert len(files) == 2
    first = list(EventFileLoader(str(files[1])).Load())
    assert first[0].file_version and first[1].session_log.status == 1 and first[1].step == 3
    values = [(e.step, float(v.tensor.float_val[0])) for f in files
              for e in EventFileLoader(str(f)).Load() for v in e.summary.value]  # fmt: skip
    assert values == [(1, 1.0), (2, 2.0), (3, 30.0), (4, 40.0)]


class _SecondCtrlC(Callback):
    """What a second Ctrl-C does before the first one's rest point: KeyboardInterrupt."""

    def on_train_step_end(self, trainer, out) -> None:
        if out.step == 3:
            raise KeyboardInterrupt


def test_a_run_stopped_by_a_second_ctrl_c_has_no_end_status_in_hparams(tmp_path) -> None:
    """A second Ctrl-C raises KeyboardInterrupt in the step: metrics.json says interrupted,
    and HPARAMS said the run failed (STATUS_FAILURE, a probe's). No end status, as any
    interrupted run (TensorBoard has none for it), until it is resumed."""
    from conftest import train
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import metadata

    from trainer.logger import event_dir

    with pytest.raises(KeyboardInterrupt):
        train(tmp_path, "trainer.max_steps=5", callbacks=[_SecondCtrlC()])
    assert json.loads((tmp_path / "metrics.json").read_text())["status"] == "interrupted"
    acc = EventAccumulator(str(event_dir(tmp_path)))
    acc.Reload()
    tags = acc.PluginTagToContent(metadata.PLUGIN_NAME)
    assert metadata.SESSION_START_INFO_TAG in tags
    assert metadata.SESSION_END_INFO_TAG not in tags


def test_dropping_the_end_status_keeps_every_other_byte_and_never_stops_a_resume(
    tmp_path, monkeypatch, caplog
) -> None:
    """The rewrite keeps the other records byte for byte and a partial last record (a killed
    writer's) after them; a failure of it (a review: a leftover temporary file blocked every
    later resume) is a warning, and the resume goes on."""
    from conftest import train
    from tensorboard.plugins.hparams import metadata

    from trainer.logger import event_dir

    hparams = importlib.import_module("trainer.hparams")

    base = ["trainer.run_id=g", "trainer.checkpoint.every_n_steps=2",
            f"trainer.checkpoint.search_dir={tmp_path}", "trainer.max_steps=3"]  # fmt: skip
    train(tmp_path / "a", *base)
    (path,) = event_dir(tmp_path / "a").glob("events.out.tfevents.*")
    data = path.read_bytes()
    path.write_bytes(data + b"\x05\x00\x00")  # a partial record at the end
    assert hparams.drop_end_status(path.parent) == [path]
    rewritten = path.read_bytes()
    assert metadata.SESSION_END_INFO_TAG.encode() not in rewritten
    assert rewritten.endswith(b"\x05\x00\x00") and len(rewritten) < len(data)
    frames, _ = hparams._frames(data)
    kept = [data[a:b] for a, b in frames if metadata.SESSION_END_INFO_TAG.encode() not in data[a:b]]
    assert rewritten == b"".join(kept) + b"\x05\x00\x00"
    assert not [p for p in path.parent.iterdir() if p != path]  # no temporary file left

    def broken(directory):
        raise OSError("read-only file system")

    monkeypatch.setattr(importlib.import_module("trainer.run"), "drop_end_status", broken)
    path.write_bytes(data)
    with caplog.at_level("WARNING", logger="trainer.run"):
        metrics = train(tmp_path / "b", *base[:-1], "trainer.max_steps=5", "trainer.resume=auto")
    assert metrics["status"] == "completed" and metrics["step"] == 5
    assert any("HPARAMS: the earlier end status" in r.getMessage() for r in caplog.records)


class _Validations(Callback):
    def __init__(self) -> None:
        self.steps: list[int] = []

    def on_validation_end(self, trainer, metrics) -> None:
        self.steps.append(trainer.global_step)


def test_a_finished_run_resumed_from_its_validated_last_step_does_not_validate_it_again(
    tmp_path,
) -> None:
    """A run resumed finished validates its last step only if that was not validated: the
    checkpoint keeps the step of its last validation. Read from the metrics (which a
    validation's checkpoint holds without a step), a completed run's periodic checkpoint at
    its last step was validated again on every resume: a second, third val/loss point at
    step 4, on_validation_end fired again (a review)."""
    from conftest import train

    common = ("trainer.max_steps=4", "trainer.checkpoint.every_n_steps=2", "data.batch_size=64")
    first = _Validations()
    train(tmp_path / "a", *common, callbacks=[first])
    assert first.steps == [4]
    step4 = tmp_path / "a" / "checkpoints" / "step_000000004.pt"
    for i in range(2):
        again = _Validations()
        train(tmp_path / f"r{i}", *common, f"trainer.resume={step4}", callbacks=[again])
        assert again.steps == []
        assert [s for s, _ in read_scalars(tmp_path / "a")["val/loss"]] == [4]


def test_an_older_checkpoint_without_validated_at_is_validated_where_it_was(tmp_path) -> None:
    """A checkpoint of an earlier version has no ``validated_at``: one written mid-epoch holds
    an earlier validation's metrics and was not validated at its own step (a first fallback
    took it as validated: a run resumed finished there skipped its last step's validation and
    returned the earlier metrics); one at an epoch's end or at its run's max_steps was."""
    from conftest import train

    from trainer.checkpoint import save_checkpoint

    common = ("data.batch_size=512", "trainer.checkpoint.every_n_steps=2",
              "trainer.checkpoint.keep_last=10")  # (3 steps an epoch)  # fmt: skip
    train(tmp_path / "a", *common, "trainer.max_steps=10")
    for step, validated in ((4, False), (6, True), (10, True)):
        state = load_checkpoint(tmp_path / "a" / "checkpoints" / f"step_{step:09d}.pt")
        assert state["validated_at"] == (step if validated else 3)
        del state["validated_at"]
        old = tmp_path / f"old{step}" / "step.pt"  # (outside a checkpoints/ folder)
        old.parent.mkdir()
        save_checkpoint(old, state)
        seen = _Validations()
        train(tmp_path / f"r{step}", *common, f"trainer.max_steps={step}",
              f"trainer.resume={old}", callbacks=[seen])  # fmt: skip
        assert seen.steps == ([] if validated else [step]), step


class _BestLoss(Callback):
    """Keeps the best validation loss as NumPy computes it (``min`` against a NumPy scalar),
    and a NumPy array of the losses seen: NumPy values in its state."""

    def __init__(self) -> None:
        import numpy as np

        self.best, self.seen, self.loaded = np.inf, np.zeros(0), None

    def on_validation_end(self, trainer, metrics) -> None:
        import numpy as np

        self.best = min(self.best, np.float64(metrics["val/loss"]))
        self.seen = np.append(self.seen, metrics["val/loss"])

    def state_dict(self):
        return {"best": self.best, "seen": self.seen}

    def load_state_dict(self, state) -> None:
        self.loaded = state


def test_a_callback_state_with_numpy_values_resumes(tmp_path, caplog) -> None:
    """A callback whose state held NumPy values wrote checkpoints that a safe load refuses:
    resume=auto skipped them as corrupt and started the run afresh (a probe's finding). They
    are checkpointed as Python numbers and tensors of the same values, with a warning."""
    from conftest import train

    first = _BestLoss()
    with caplog.at_level("WARNING"):
        train(tmp_path / "a", "trainer.max_epochs=2", "data.batch_size=256", callbacks=[first])
    assert "callback _BestLoss: its state_dict() holds NumPy values" in caplog.text
    resumed = _BestLoss()
    last = tmp_path / "a" / "checkpoints" / "last.pt"
    metrics = train(tmp_path / "b", "trainer.max_epochs=3", "data.batch_size=256",
                    f"trainer.resume={last}", callbacks=[resumed])  # fmt: skip
    assert metrics["step"] == 3 * 6  # (1,797 × 0.8 / 256: 6 steps per epoch)
    assert resumed.loaded["best"] == float(first.best) and type(resumed.loaded["best"]) is float
    assert resumed.loaded["seen"].tolist() == first.seen.tolist()


def test_a_callback_state_no_checkpoint_can_hold_is_refused_when_the_run_starts(tmp_path):
    """Any other value a safe load refuses (an object of one's own) is named, callback and
    cause, before the first step, not found at the resume."""
    from conftest import train

    class Thing:
        pass

    class Keeps(Callback):
        def state_dict(self):
            return {"thing": Thing()}

    with pytest.raises(ValueError, match=r"callback Keeps: its state_dict\(\) holds .*Thing"):
        train(tmp_path, "trainer.max_steps=2", callbacks=[Keeps()])
    assert json.loads((tmp_path / "metrics.json").read_text())["step"] == 0


@pytest.mark.skipif(
    np.dtype(np.longdouble).itemsize == 8, reason="long double is double on this platform"
)
def test_a_long_double_array_in_a_callback_state_is_named() -> None:
    """NumPy arrays are kept as tensors, but torch has no long double: it failed with torch's
    TypeError, naming no callback (a review's finding)."""
    from trainer.checkpoint import checkpointable

    for dtype in (np.longdouble, np.clongdouble):
        with pytest.raises(ValueError, match=r"callback MyCb: its state_dict\(\) holds what"):
            checkpointable({"best": np.ones(2, dtype=dtype)}, "MyCb")


class SplitsTheGroups(Callback):
    """After step 1, moves the first layer into a parameter group of its own (a slower lr for
    the body): the optimizer then has a group the config does not build."""

    def on_train_step_end(self, trainer, out) -> None:
        if out.step == 1:
            group = trainer.optimizer.param_groups[0]
            body, group["params"] = group["params"][:2], group["params"][2:]
            trainer.optimizer.add_param_group({"params": body, "lr": group["lr"] / 10})


def test_a_checkpoint_of_groups_split_during_its_run_is_refused_naming_the_way_out(
    tmp_path,
) -> None:
    """The checkpoint is loaded before any callback runs, so groups a callback made cannot be
    rebuilt first: torch refused with "a different number of parameter groups" and no way out
    (a probe's). Refused naming both runs' groups and what to do instead."""
    common = ("model.hidden=[16]", "trainer.max_steps=4")
    with pytest.raises(SystemExit):
        train(tmp_path / "a", *common, callbacks=[SplitsTheGroups(), StopAt(2)])
    refused = (r"does not fit this run: its optimizer has 2 parameter groups \(of \[2, 2\] "
               r"parameters\), this run's 1 \(of \[4\]\): groups added or merged during a run "
               r".*add_param_group.* optimizer factory")  # fmt: skip
    with pytest.raises(ValueError, match=refused):
        train(tmp_path / "a", *common, "trainer.resume=auto",
              f"trainer.checkpoint.search_dir={tmp_path / 'a'}")  # fmt: skip


def test_another_optimizers_state_without_a_config_is_refused_naming_it(tmp_path) -> None:
    """A checkpoint without its config (an older one, or written by hand) of an AdamW run,
    resumed with SGD: its groups replaced SGD's, and the first step failed with a bare
    KeyError 'momentum' (a probe's finding). Refused, naming the keys and the checkpoint."""
    from conftest import train

    train(tmp_path / "a", "trainer.max_steps=2", "optimizer=adamw")
    state = load_checkpoint(tmp_path / "a" / "checkpoints" / "last.pt")
    del state["config"]
    torch.save(state, tmp_path / "noconf.pt")
    with pytest.raises(ValueError, match=r"noconf.pt does not fit this run: its optimizer state "
                       r"has .*betas.* which this run's SGD does not"):  # fmt: skip
        train(tmp_path / "b", "trainer.max_steps=4", "optimizer=sgd",
              f"trainer.resume={tmp_path / 'noconf.pt'}")  # fmt: skip


def test_a_resume_on_another_number_of_processes_keeps_the_global_batch() -> None:
    """data.batch_size is a process's part of the global batch: 2 × 60 resumed on 1 × 120 is
    the same run. The same per-process size on another number of processes is another global
    batch (1 × 16 resumed on 2 × 16: 32), whose epoch position, counted in the old batches,
    skipped samples; it passed unnoticed (a probe's finding) and is refused now, naming both."""
    from trainer.checkpoint import resume_changes

    def cfg(b: int) -> dict:
        return {"data": {"batch_size": b}}

    assert resume_changes(cfg(60), cfg(120), 2, 1) == []
    assert resume_changes(cfg(16), cfg(8), 1, 2) == []
    assert resume_changes(cfg(16), cfg(16), 1, 2) == [
        "data.batch_size: 16 per process on 1 (global batch 16) -> 16 per process on 2 "
        "(global batch 32)"
    ]
    assert resume_changes(cfg(16), cfg(16), 2, 1) == [
        "data.batch_size: 16 per process on 2 (global batch 32) -> 16 per process on 1 "
        "(global batch 16)"
    ]
    assert resume_changes(cfg(16), cfg(8), 1, 1) == ["data.batch_size: 16 -> 8"]


def test_the_unused_parameters_switch_is_not_part_of_a_runs_identity() -> None:
    """trainer.find_unused_parameters changes how DDP works, not what it computes, and
    optimizer.foreach is left out while null (its default): a run
    failed for want of it and started again with it, or one started before the key existed,
    keeps its run id (resume=auto finds it) and may be resumed either way."""
    from omegaconf import OmegaConf

    from trainer.checkpoint import derive_run_id, resume_changes

    plain = OmegaConf.to_container(make_cfg(), resolve=True)
    told = OmegaConf.to_container(make_cfg("trainer.find_unused_parameters=true"), resolve=True)
    older = OmegaConf.to_container(make_cfg(), resolve=True)
    del older["trainer"]["find_unused_parameters"], older["optimizer"]["foreach"]
    assert derive_run_id(plain) == derive_run_id(told) == derive_run_id(older)
    assert resume_changes(plain, told) == resume_changes(older, plain) == []
    # foreach set is part of it (on CUDA it takes the run off the fused default)
    fore = OmegaConf.to_container(make_cfg("optimizer.foreach=true"), resolve=True)
    assert derive_run_id(fore) != derive_run_id(plain)
    assert resume_changes(plain, fore) == ["optimizer.foreach: (unset) -> True"]


def test_a_chars_run_saved_with_the_old_stride_default_keeps_its_identity() -> None:
    """data=chars's stride default went from 32 to null (half the block, 32 of the default
    64): a run started before saved 32, and its id changed (resume=auto started afresh, a
    resume by path was refused as a change of data.stride; a review's finding). The same
    stride is the same run; another one is another run."""
    from omegaconf import OmegaConf

    from trainer.checkpoint import derive_run_id, resume_changes

    def cfg(*keys: str) -> dict:
        return OmegaConf.to_container(make_cfg("data=chars", *keys), resolve=True)

    new, old = cfg(), cfg("data.stride=32")
    assert new["data"]["stride"] is None
    assert derive_run_id(old) == derive_run_id(new) and resume_changes(old, new) == []
    assert derive_run_id(cfg("data.stride=16")) != derive_run_id(new)
    assert resume_changes(cfg("data.stride=16"), new) == ["data.stride: 16 -> None"]
    # half of another block
    assert derive_run_id(cfg("data.block_size=32", "data.stride=16")) == derive_run_id(
        cfg("data.block_size=32")
    )
    # a block of 1: its default stride is 1 (at least 1, not 1 // 2 = 0)
    assert derive_run_id(cfg("data.block_size=1", "data.stride=1")) == derive_run_id(
        cfg("data.block_size=1")
    )


def test_checkpoints_are_set_aside_from_the_step_after_the_resumed_one_and_prune_keeps_its_own(
    tmp_path,
) -> None:
    """Resumed from step 2 of 5 (a checkpoint every step), steps 3-5 are the abandoned
    timeline's: all three set aside, so that resume=auto cannot continue the discarded run
    from step 3. And pruning never deletes the checkpoint just written, whatever its rank."""
    from trainer.checkpoint import prune, set_aside_later

    folder = tmp_path / "checkpoints"
    folder.mkdir()
    for step in range(1, 6):
        (folder / f"step_{step:09d}.pt").write_bytes(b"x")
    moved = set_aside_later(folder, 2)
    assert sorted(p.name for p in moved) == [f"step_{s:09d}.pt" for s in (3, 4, 5)]
    assert sorted(p.name for p in folder.glob("step_*.pt")) == [f"step_{s:09d}.pt" for s in (1, 2)]
    for step in (3, 4):
        (folder / f"step_{step:09d}.pt").write_bytes(b"x")
    kept = folder / "step_000000001.pt"
    (folder / "step_².pt").write_bytes(b"x")  # (no step: str.isdigit's, int() failed on it)
    prune(folder, 1, keep=kept)
    assert sorted(p.name for p in folder.glob("step_*.pt")) == [
        kept.name, "step_000000004.pt", "step_².pt"]  # fmt: skip


def test_a_sweeps_resumed_job_is_reported_where_it_continued(tmp_path, caplog) -> None:
    """A multirun resumed with ``trainer.resume`` continues each job in its checkpoint's run
    dir: the new job folders held only Hydra's files, and the sweep reported every job
    "missing" and exited 1 although all completed (a probe). The job's folder names where it
    went; the report and the sweep's summary follow it. A resume that changes the derived run
    id (a longer run) says so."""
    from conftest import train

    from trainer import report
    from trainer.sweep import SweepSummary

    train(tmp_path / "a", "trainer.max_steps=3")
    resume = f"trainer.resume={tmp_path / 'a' / 'checkpoints' / 'last.pt'}"
    job = tmp_path / "sweep" / "0"
    job.mkdir(parents=True)  # an earlier attempt in the job's folder, refused: its record
    (job / "metrics.json").write_text('{"status": "failed", "error": "ConfigError: x"}')
    (tmp_path / "a" / "train.log").write_text("the run's log (Hydra's, under the CLI)\n")
    started = json.loads((tmp_path / "a" / "metrics.json").read_text())  # (as a sweep's job
    # records it: the sweep whose job it was is kept, run_sweep_id, which its report reads)
    (tmp_path / "a" / "metrics.json").write_text(json.dumps({**started, "sweep_id": "s-a"}))
    with caplog.at_level("WARNING", logger="trainer.run"):
        train(job, "trainer.max_steps=6", resume)
    # the run dir's log says where what follows went (it ended at the break, a probe's)
    lines = (tmp_path / "a" / "train.log").read_text().splitlines()
    assert len(lines) == 2 and lines[1].endswith(
        f"continued from step 3 by the job in {job.resolve()}: its train.log holds what follows"
    ), lines
    assert "as run" in caplog.text and "trainer.resume=auto finds it as" in caplog.text
    # both metrics.json (the job's and the run dir's) name the job's own folder as job_dir,
    # the README's key: the folder whose result it is, not the run dir it continued in
    for folder in (job, tmp_path / "a"):
        written = json.loads((folder / "metrics.json").read_text())
        assert written["job_dir"] == str(job.resolve()), folder
        assert written["run_sweep_id"] == "s-a", folder
    pointer = json.loads((job / "continued.json").read_text())  # its pointer names both
    assert pointer == {"run_dir": str((tmp_path / "a").resolve()), "job_dir": str(job.resolve())}
    (run,) = report.collect_runs(tmp_path / "sweep")
    assert (run.name, run.status, run.metrics["step"]) == ("0", "completed", 6)
    assert run.path == (tmp_path / "a").resolve() and run.curves["train/loss"]
    caplog.clear()
    with caplog.at_level("INFO", logger="trainer.sweep"):
        SweepSummary()._summarize(tmp_path / "sweep", stopped=False)  # no SystemExit
    assert "its 1 job completed" in caplog.text
    # a second job continuing the same run: each row is its own job's result (the run dir's
    # metrics.json is the run's latest, the second's)
    train(tmp_path / "sweep" / "1", "trainer.max_steps=8", resume)
    first, second = report.collect_runs(tmp_path / "sweep")
    assert (first.metrics["step"], second.metrics["step"]) == (6, 8)
    # one that continued and was killed (its pointer, no result of its own): missing; one
    # whose run dir went away since
    for name, home in (("2", tmp_path / "a"), ("3", tmp_path / "gone")):
        (tmp_path / "sweep" / name).mkdir()
        (tmp_path / "sweep" / name / "continued.json").write_text(
            json.dumps({"run_dir": str(home), "job_dir": str(tmp_path / "sweep" / name)})
        )
    *_, killed, gone = report.collect_runs(tmp_path / "sweep")
    assert killed.status == "missing" and "wrote no result (running, or killed)" in killed.error
    assert gone.status == "missing" and "which no longer exists" in gone.error
    # the job's folder taken by a fresh run: the pointer is set aside with its outputs
    train(job, "trainer.max_steps=2")
    assert not (job / "continued.json").exists()
    assert report.collect_runs(tmp_path / "sweep")[0].metrics["step"] == 2
    assert report.collect_runs(tmp_path / "sweep")[0].path == job
    # a run continued in its own folder: a pointer an earlier attempt left there is stale
    # (the report would follow it to the other folder's result)
    (tmp_path / "a" / "continued.json").write_text(
        json.dumps({"run_dir": str(job), "job_dir": str(tmp_path / "a")})
    )
    train(tmp_path / "a", "trainer.max_steps=10", resume)
    assert not (tmp_path / "a" / "continued.json").exists()
    (own,) = report.collect_runs(tmp_path / "a")
    assert (own.path, own.metrics["step"]) == ((tmp_path / "a").resolve(), 10)


def test_a_sweep_with_an_interrupted_job_does_not_call_it_failed(tmp_path, caplog) -> None:
    """A job stopped by SIGTERM is interrupted (resumable), not failed: the summary said "1 of
    2 jobs failed" (a probe)."""
    import json

    from trainer.sweep import SweepSummary

    for name, status in (("0", "completed"), ("1", "interrupted")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.json").write_text(
            json.dumps({"status": status, "monitor": "val/acc", "val/acc": 0.5})
        )
    with caplog.at_level("INFO", logger="trainer.sweep"), pytest.raises(SystemExit):
        SweepSummary()._summarize(tmp_path, stopped=False)
    assert "1 of 2 jobs did not complete (1 interrupted)" in caplog.text


def test_a_sweeps_summary_names_each_kind_of_end_once(tmp_path, caplog) -> None:
    """A sweep whose jobs failed, were interrupted and completed without a monitored value:
    the summary says each job's end (the failure's last line), counts the kinds ("failed"
    alone only where every unfinished job failed), warns of the job without a value, and
    exits 1; the exit hook after the end hook says nothing a second time."""
    import json

    from omegaconf import OmegaConf

    from trainer.sweep import SweepSummary

    jobs = {
        "0": {"status": "failed", "error": "Traceback ...\nConfigError: optimizer.lr: got -1\n"},
        "1": {"status": "interrupted", "signal": "SIGTERM", "step": 4},
        "2": {"status": "completed", "monitor": "val/acc", "val/acc": float("nan")},
        "3": {"status": "completed", "monitor": "val/acc", "val/acc": 0.5},
    }
    for name, metrics in jobs.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.json").write_text(json.dumps(metrics))
    summary = SweepSummary()
    config = OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path)}}})
    summary.on_multirun_start(config)
    with caplog.at_level("INFO", logger="trainer.sweep"), pytest.raises(SystemExit) as exited:
        summary.on_multirun_end(config)
    assert exited.value.code == 1
    said = [r.getMessage() for r in caplog.records if r.name == "trainer.sweep"]
    assert "job 0 failed: ConfigError: optimizer.lr: got -1" in said, said
    assert any(m.startswith("job 1 interrupted: stopped by SIGTERM at step 4") for m in said)
    assert [m for m in said if "without a value of the monitored metric" in m] == [
        "job 2 completed without a value of the monitored metric (NaN or missing)"
    ]
    assert any("2 of 4 jobs did not complete (1 failed, 1 interrupted)" in m for m in said), said
    caplog.clear()
    with caplog.at_level("INFO", logger="trainer.sweep"):
        summary._at_exit(tmp_path)  # (what atexit calls at the process's end)
    assert caplog.records == []


def test_a_sweep_stopped_before_all_its_jobs_started_counts_them(tmp_path, caplog) -> None:
    """An interrupted sweep of 3 points whose third job never started: the summary counted
    the folders there, "1 of 2 jobs did not complete", a smaller sweep (a probe's finding).
    The jobs a sweep plans are counted from its overrides (the basic sweeper's choices,
    ranges and params; Optuna's n_trials)."""
    import json

    from omegaconf import OmegaConf

    from trainer.sweep import SweepSummary, planned_jobs

    hydra = OmegaConf.create({
        "sweeper": {"_target_": "hydra._internal.core_plugins.basic_sweeper.BasicSweeper",
                    "params": {"data.batch_size": "16,32"}},
        "overrides": {"task": ["optimizer.lr=0.01,0.02,0.03", "trainer.max_steps=5",
                               "seed=range(0,4)"]},
    })  # fmt: skip
    assert planned_jobs(hydra) == 3 * 4 * 2
    # merged by key as the basic sweeper does, the command line's value winning (a review:
    # a pinned key over params' sweep counted 3 jobs for 1, and the sweep exited 1)
    hydra.overrides.task = ["data.batch_size=64", "seed=1,2", "seed=3,4,5"]
    assert planned_jobs(hydra) == 3
    hydra.overrides.task = ["++seed=1,2", "seed=3,4"]  # (two keys to the sweeper: 4 jobs)
    assert planned_jobs(hydra) == 2 * 2 * 2
    optuna = {"_target_": "hydra_plugins.hydra_optuna_sweeper.optuna_sweeper.OptunaSweeper"}
    assert planned_jobs(OmegaConf.create({"sweeper": {**optuna, "n_trials": 7}})) == 7
    # a job's own interpolation, which the sweep's level cannot resolve (it failed the
    # summary's start hook, and an interrupted sweep ended without its summary: a probe)
    hydra.overrides.task = ["optimizer.lr=0.01,0.02", "seed=${hydra:job.num}"]
    assert planned_jobs(hydra) == 2 * 2
    # a params value interpolating a list of the config's: resolved (a review)
    hydra.lrs = "0.1,0.2,0.3"
    hydra.sweeper.params = {"optimizer.lr": "${lrs}"}
    hydra.overrides.task = ["seed=${hydra:job.num}"]
    assert planned_jobs(hydra) == 3
    hydra.sweeper.params = {"data.batch_size": "16,32"}
    hydra.overrides.task = ["optimizer.lr=0.01,0.02,0.03"]
    hydra.sweeper.params = None
    for name, status in (("0", "completed"), ("1", "interrupted")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.json").write_text(
            json.dumps({"status": status, "monitor": "val/acc", "val/acc": 0.5})
        )
    summary = SweepSummary()
    summary._planned = planned_jobs(hydra)
    with caplog.at_level("INFO", logger="trainer.sweep"):
        summary._summarize(tmp_path, stopped=True)
    assert "2 of 3 jobs did not complete (1 interrupted, 1 not started)" in caplog.text
    # folders named by hydra.sweep.subdir of one's own: counted, a completed sweep completed
    # (by number, every planned job was "not started" and the sweep exited 1: reviews)
    other = tmp_path / "named"
    for name in ("lr=0.01", "2", "3"):
        (other / name).mkdir(parents=True)
        (other / name / "metrics.json").write_text(
            json.dumps({"status": "completed", "monitor": "val/acc", "val/acc": 0.5})
        )
    caplog.clear()
    with caplog.at_level("INFO", logger="trainer.sweep"):
        summary._summarize(other, stopped=False)
    assert "all 3 jobs completed" in caplog.text


def test_a_value_naming_the_jobs_folder_is_kept_as_written_in_a_runs_identity(
    monkeypatch,
) -> None:
    """A callback writing ${hydra:runtime.output_dir}/hooks.jsonl: every start, in a folder of
    its own, was another run (resume=auto found none), and an explicit resume a changed config
    (a probe). Such a value is kept as written; one interpolating the job number (a seed)
    still tells runs apart."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.core.utils import setup_globals
    from omegaconf import OmegaConf

    from trainer.checkpoint import derive_run_id, resume_changes
    from trainer.run import identity_config

    setup_globals()  # (Hydra's resolvers, as a launched job has them)
    ids = []
    for folder, num in (("a", 0), ("b", 0), ("c", 1)):
        hydra = OmegaConf.create({"runtime": {"output_dir": f"/runs/{folder}"},
                                  "job": {"num": num}})  # fmt: skip
        monkeypatch.setattr(HydraConfig, "get", staticmethod(lambda h=hydra: h))
        cfg = OmegaConf.create({
            "seed": "${hydra:job.num}",
            "callbacks": {"log": {"_target_": "mypkg.Log",
                                  "path": "${hydra:runtime.output_dir}/hooks.jsonl"}},
        })  # fmt: skip
        identity = identity_config(cfg)
        assert identity["callbacks"]["log"]["path"] == "${hydra:runtime.output_dir}/hooks.jsonl"
        assert identity["seed"] == num
        ids.append((derive_run_id(identity), identity))
    assert ids[0][0] == ids[1][0] != ids[2][0]
    assert resume_changes(ids[0][1], ids[1][1]) == []
    assert resume_changes(ids[0][1], ids[2][1]) == ["seed: 0 -> 1"]


class Writes(Callback):
    """A callback of one's own given a path (where it would write)."""

    def __init__(self, path: str) -> None:
        self.path = path


@pytest.mark.parametrize("elsewhere", [False, True])
def test_a_run_from_before_folder_values_were_kept_as_written_resumes(
    tmp_path, monkeypatch, elsewhere
) -> None:
    """A run of a fixed hydra.run.dir whose callback writes under ${hydra:runtime.output_dir}
    was resumable when its identity held the value resolved (the same folder at every
    start); keeping it as written changed the run id and the saved config, and resume=auto
    started such a run afresh (a review). Its checkpoint is found under the old id and
    resumed, also where another folder holds a later checkpoint under the new id (the run
    folder's own first: the old id was looked for only where the new one was found nowhere,
    and that folder's run was resumed, this one's set aside, a review's)."""
    from conftest import train
    from hydra.core.hydra_config import HydraConfig
    from hydra.core.utils import setup_globals
    from omegaconf import OmegaConf

    from trainer.checkpoint import derive_run_id, save_checkpoint, write_run_marker

    setup_globals()
    run_dir = tmp_path / "fixed"
    hydra = OmegaConf.create({"runtime": {"output_dir": str(run_dir)}})
    monkeypatch.setattr(HydraConfig, "get", staticmethod(lambda: hydra))
    common = ["trainer.resume=auto", f"trainer.checkpoint.search_dir={tmp_path}",
              "instrument=none", f"+callbacks.w._target_={__name__}.Writes",
              "+callbacks.w.path=${hydra:runtime.output_dir}/hooks.txt"]  # fmt: skip
    train(run_dir, *common, "trainer.max_steps=2")
    # as a run before 2026-12-05 wrote it: the value resolved, and the id of that
    last = run_dir / "checkpoints" / "last.pt"
    state = load_checkpoint(last)
    assert state["config"]["callbacks"]["w"]["path"] == "${hydra:runtime.output_dir}/hooks.txt"
    state["config"]["callbacks"]["w"]["path"] = f"{run_dir}/hooks.txt"
    for path in (run_dir / "checkpoints").glob("step_*.pt"):
        path.unlink()
    save_checkpoint(run_dir / "checkpoints" / "step_000000002.pt", state)
    last.unlink()
    write_run_marker(run_dir / "checkpoints", derive_run_id(state["config"]), run_dir)
    if elsewhere:  # the same config (its new id) in another folder
        train(tmp_path / "other", *common[1:], "trainer.max_steps=2")
    metrics = train(run_dir, *common, "trainer.max_steps=2")
    assert metrics["run_id"] == derive_run_id(state["config"]) and metrics["step"] == 2
    assert not (run_dir / "previous").exists()  # (resumed: not a fresh start setting it aside)


class _Dies(Callback):
    def on_train_batch_start(self, trainer, batch) -> None:
        os._exit(3)


def _dies_at_first_batch(overrides: tuple[str, ...], run_dir: str) -> None:
    torch.set_num_threads(1)
    from trainer.run import run

    run(make_cfg(*overrides), run_dir, callbacks=[_Dies()])


def test_a_resume_that_trains_longer_shows_its_values_in_hparams(tmp_path) -> None:
    """A run resumed with a longer trainer.max_steps (a change a resume may make) showed the
    first process's max_steps in HPARAMS, TensorBoard keeping a tag's first record (a probe):
    the earlier experiment and session-start records give way to the resumed run's, once
    those are on disk (a crash right after the resume started lost both: a review). A resume
    that changes no value keeps them. Rewritten files keep their mode (mkstemp's 0600 hid a
    resumed run's earlier steps from a TensorBoard of another user)."""
    from conftest import train
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from tensorboard.plugins.hparams import metadata

    from trainer.logger import event_dir

    experiments = []

    def starts() -> list[str]:
        found = []
        experiments.clear()
        for path in sorted(event_dir(tmp_path / "a").glob("events.out.tfevents.*")):
            for event in EventFileLoader(str(path)).Load():
                for v in event.summary.value:
                    if v.tag == metadata.EXPERIMENT_TAG:
                        experiments.append(path)
                    if v.tag == metadata.SESSION_START_INFO_TAG:
                        info = metadata.parse_session_start_info_plugin_data(
                            v.metadata.plugin_data.content
                        )
                        found.append(info.hparams["trainer.max_steps"].number_value)
        return found

    base = ("trainer.run_id=h", "trainer.checkpoint.every_n_steps=2",
            f"trainer.checkpoint.search_dir={tmp_path}")  # fmt: skip
    train(tmp_path / "a", *base, "trainer.max_steps=2")
    (first,) = event_dir(tmp_path / "a").glob("events.out.tfevents.*")
    first.chmod(0o640)
    train(tmp_path / "b", *base, "trainer.max_steps=2", "trainer.resume=auto")  # (no change)
    assert starts() == [2.0]
    train(tmp_path / "b", *base, "trainer.max_steps=4", "trainer.resume=auto")
    assert starts() == [4.0]
    assert first.stat().st_mode & 0o777 == 0o640
    dies = (*base, "trainer.max_steps=6", "trainer.resume=auto")
    compose_before_forking(*dies)
    p = FORK.Process(target=_dies_at_first_batch, args=(dies, str(tmp_path / "c")))
    p.start()
    assert finish(p) == 3
    assert starts() == [6.0]
    train(tmp_path / "d", *base, "trainer.max_steps=8", "trainer.resume=auto")
    assert starts() == [8.0]
    # the old records' removal failing (or a crash before it): both stay, the first shows;
    # the next resume leaves its own alone (a review: a duplicate of the same values stayed)
    run_module = importlib.import_module("trainer.run")
    with pytest.MonkeyPatch.context() as mp_:
        mp_.setattr(run_module, "replace_start", _raises)
        train(tmp_path / "e", *base, "trainer.max_steps=10", "trainer.resume=auto")
    assert starts() == [8.0, 10.0]
    train(tmp_path / "f", *base, "trainer.max_steps=10", "trainer.resume=auto")
    assert starts() == [10.0] and len(experiments) == 1
    # earlier files with an experiment record and no session start: one of each after
    hparams = importlib.import_module("trainer.hparams")
    tag = metadata.SESSION_START_INFO_TAG
    hparams._rewrite(event_dir(tmp_path / "a"), (tag.encode(),),
                     lambda e: any(v.tag == tag for v in e.summary.value))  # fmt: skip
    assert starts() == [] and len(experiments) == 1
    train(tmp_path / "g", *base, "trainer.max_steps=10", "trainer.resume=auto")
    assert starts() == [10.0] and len(experiments) == 1


def _raises(*args, **kwargs):
    raise OSError("a crash here")


def test_checkpoints_get_the_mode_a_new_file_gets(tmp_path) -> None:
    """Written through a temporary file, checkpoints had its mode, 0600: a group's other
    users could not read them. They get what open() gives a new file under the umask."""
    from trainer.checkpoint import save_checkpoint

    mask = os.umask(0o027)
    try:
        path = save_checkpoint(tmp_path / "c.pt", {"x": torch.ones(2)})
        plain = tmp_path / "plain"
        plain.write_bytes(b"")
    finally:
        os.umask(mask)
    assert path.stat().st_mode & 0o777 == plain.stat().st_mode & 0o777 == 0o640


def test_a_finished_run_resumed_from_an_earlier_checkpoint_logs_each_step_once(tmp_path) -> None:
    """Resumed from its step-4 checkpoint, a run whose events reach step 8 purges what it
    logged after step 4 and logs steps 5-8 again, each step once and as before (exact resume);
    the later checkpoints are set aside under checkpoints/abandoned/. The kill-and-resume tests
    lose their events after the checkpoint with the process, so a purge from one step too late
    (a mutation) went unseen there: here step 5 would be logged twice."""
    from conftest import train

    common = ["trainer.max_steps=8", "logging.every_n_steps=1",
              "trainer.checkpoint.every_n_steps=2", "trainer.checkpoint.keep_last=10"]  # fmt: skip
    train(tmp_path / "run", *common)
    before = read_scalars(tmp_path / "run")
    start = tmp_path / "run" / "checkpoints" / "step_000000004.pt"
    train(tmp_path / "again", *common, f"trainer.resume={start}")
    after = read_scalars(tmp_path / "run")  # (a resumed run continues in its run dir)
    for tag in ("train/loss", "grad_norm/total", "lr"):
        assert [s for s, _ in after[tag]] == list(range(1, 9)), tag
        assert after[tag] == before[tag], tag
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints" / "abandoned").iterdir()) == [
        f"step_00000000{k}.pt" for k in (6, 8)
    ]


def test_a_resume_with_nothing_left_to_train_leaves_its_checkpoint_file_as_it_was(
    tmp_path,
) -> None:
    """Resumed from its final step's checkpoint with nothing left to train, a run's final
    checkpoint is the one it resumed from: that file is not written again (the same inode
    and modification time, the same bytes), only ``last.pt`` names it. Without the writer
    knowing it (a mutation the suite missed), the file was rewritten in place."""
    from conftest import train

    common = ["trainer.max_steps=3", "trainer.checkpoint.every_n_steps=1"]
    train(tmp_path / "run", *common)
    step3 = tmp_path / "run" / "checkpoints" / "step_000000003.pt"
    before, data = step3.stat(), step3.read_bytes()
    result = train(tmp_path / "again", *common, f"trainer.resume={step3}")
    assert result["step"] == 3 and result["status"] == "completed"
    after = step3.stat()
    same = ("st_ino", "st_mtime_ns", "st_size")
    assert [getattr(after, k) for k in same] == [getattr(before, k) for k in same]
    assert step3.read_bytes() == data
    assert (tmp_path / "run" / "checkpoints" / "last.pt").read_bytes() == data


def test_a_resume_sets_aside_every_checkpoint_after_its_step_as_written(tmp_path) -> None:
    """A run of 4 steps checkpointing each, resumed from step 2: the abandoned timeline's
    steps 3 and 4 are moved, byte for byte, into ``checkpoints/abandoned/``, and the resumed
    run writes its own step 3 and 4. Set aside from one step later (``step + 1``, a mutation
    the suite missed: the other resume tests checkpoint every 2 steps, where both agree), the
    old step 3 was overwritten by the new one and lost from the abandoned timeline."""
    from conftest import train

    common = ["trainer.max_steps=4", "trainer.checkpoint.every_n_steps=1",
              "trainer.checkpoint.keep_last=10"]  # fmt: skip
    train(tmp_path / "run", *common)
    ckpts = tmp_path / "run" / "checkpoints"
    old = {s: (ckpts / f"step_{s:09d}.pt").read_bytes() for s in (3, 4)}
    train(tmp_path / "again", *common, f"trainer.resume={ckpts / 'step_000000002.pt'}")
    abandoned = ckpts / "abandoned"
    assert sorted(p.name for p in abandoned.iterdir()) == [f"step_{s:09d}.pt" for s in (3, 4)]
    assert {s: (abandoned / f"step_{s:09d}.pt").read_bytes() for s in (3, 4)} == old
    assert sorted(p.name for p in ckpts.glob("step_*.pt")) == [
        f"step_{s:09d}.pt" for s in (1, 2, 3, 4)
    ]
    assert load_checkpoint(ckpts / "step_000000003.pt")["step"] == 3


class _SigtermTwice(Callback):
    """SIGTERM at step 2, then again once the first was handled (outside a checkpoint's
    write): what a scheduler's repeated SIGTERM or a process group signalled twice sends."""

    def on_train_step_end(self, trainer, out) -> None:
        if trainer.global_step == 2:
            os.kill(os.getpid(), signal.SIGTERM)
            deadline = time.monotonic() + 60  # (bounded: a lost signal fails the test)
            while trainer.stop_signal is None and time.monotonic() < deadline:
                time.sleep(0.001)  # the handler runs in this (main) thread
            os.kill(os.getpid(), signal.SIGTERM)
            for _ in range(3):
                time.sleep(0.001)  # (the second one's handler runs here)


def test_a_second_sigterm_outside_a_save_still_checkpoints_and_exits_143(tmp_path) -> None:
    """Only a second Ctrl-C stops at once: a second SIGTERM, before the run reached its
    checkpoint, lets it finish the step and checkpoint as the first asked (taken as a Ctrl-C,
    a mutation the suite missed, it stopped with a KeyboardInterrupt and no checkpoint). In
    process: the signal handlers are this test's while the run lasts."""
    from conftest import train

    from trainer.run import Interrupted

    with pytest.raises(BaseException) as info:  # noqa: PT011 (which one is the check)
        train(tmp_path, "trainer.max_steps=6", "trainer.checkpoint.every_n_steps=0",
              callbacks=[_SigtermTwice()])  # fmt: skip
    assert type(info.value) is Interrupted and info.value.code == 128 + signal.SIGTERM
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["status"] == "interrupted" and metrics["signal"] == "SIGTERM"
    assert metrics["step"] == 2 and load_checkpoint(metrics["checkpoint"])["step"] == 2


class _Raises(Callback):
    def on_train_step_end(self, trainer, out) -> None:
        raise RuntimeError("a callback's bug")


@pytest.mark.parametrize("fails", [False, True], ids=["completed", "failed"])
def test_the_signal_handlers_before_a_run_are_back_after_it(tmp_path, fails) -> None:
    """While ``fit`` runs, the stop signals are the trainer's; after it, completed or failed
    in a callback, each signal's handler is the one it had before (without the restore, a
    mutation the suite missed, a later Ctrl-C in the same process only asked a finished run
    to stop)."""
    from conftest import train

    seen: dict[int, object] = {}

    class Sees(Callback):
        def on_train_step_end(self, trainer, out) -> None:
            seen.update({s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)})

    def mine(signum, frame) -> None:
        raise AssertionError("not to be called")

    previous = signal.signal(signal.SIGTERM, mine)
    try:
        before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
        callbacks = [Sees(), _Raises()] if fails else [Sees()]
        if fails:
            with pytest.raises(RuntimeError, match="a callback's bug"):
                train(tmp_path, "trainer.max_steps=2", callbacks=callbacks)
        else:
            assert train(tmp_path, "trainer.max_steps=2", callbacks=callbacks)["step"] == 2
        after = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert seen and all(seen[s] is not before[s] for s in seen)  # (the trainer's, meanwhile)
    assert after == before and after[signal.SIGTERM] is mine


def test_a_resume_with_another_number_of_workers_continues_as_never_stopped(tmp_path) -> None:
    """``data.num_workers`` is how batches are loaded, not which: a resume may change it, and
    ends where the run never stopped would (with it refused as a changed hyperparameter, a
    mutation the suite missed, the resume failed). Held in memory, the split is batched without
    workers on either side: no worker process starts here."""
    from conftest import train

    common = ("trainer.max_steps=4", "trainer.checkpoint.every_n_steps=2")
    train(tmp_path / "a", *common, "data.num_workers=2")
    step2 = tmp_path / "a" / "checkpoints" / "step_000000002.pt"
    result = train(tmp_path / "b", *common, "data.num_workers=3", f"trainer.resume={step2}")
    assert result["step"] == 4 and result["status"] == "completed"
    train(tmp_path / "straight", *common, "data.num_workers=3")
    resumed = tmp_path / "a" / "checkpoints" / "last.pt"  # (a resumed run continues there)
    assert same_params(resumed, tmp_path / "straight" / "checkpoints" / "last.pt")


def _differences(a, b, path: str = "") -> list[str]:
    """Where two checkpoints' (nested) states differ: tensors bit for bit, the rest by ==."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = [f"{path}: keys {sorted(map(str, set(a) ^ set(b)))}"] if set(a) != set(b) else []
        return out + [d for k in a if k in b for d in _differences(a[k], b[k], f"{path}/{k}")]
    if isinstance(a, list | tuple) and isinstance(b, list | tuple) and len(a) == len(b):
        pairs = enumerate(zip(a, b, strict=True))
        return [d for i, (x, y) in pairs for d in _differences(x, y, f"{path}[{i}]")]
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        same = a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
        return [] if same else [f"{path}: tensors differ"]
    return [] if type(a) is type(b) and a == b else [f"{path}: {a!r} != {b!r}"]


@pytest.mark.parametrize(
    ("case", "overrides", "stop", "steps"),
    [
        # 4 batches per epoch: stopped at an epoch's last step, the loader's generator was a
        # draw behind the uninterrupted run's (its state from before the finished epoch)
        (
            "loader",
            (
                "data.train_subset=64",
                "data.batch_size=16",
                "data.loader=dataloader",
                "data.num_workers=0",
            ),
            4,
            8,
        ),
        # norms with agreement every 4 steps, stopped at step 12: the step of gradients no
        # longer kept was 11 in the uninterrupted run's checkpoint, -1 in the resumed one's
        (
            "norms",
            (
                "data.train_subset=64",
                "data.batch_size=16",
                "logging.every_n_steps=2",
                "instrument.norms.every_n_steps=4",
                "instrument.norms.agreement=true",
            ),
            12,
            14,
        ),
        # per-sample norms every 3 steps; 101 samples in batches of 8: the resumed process's
        # first micro-batch is an epoch's ragged one (5 samples), whose mixing check the
        # uninterrupted run never made (it checks a measured micro-batch's new inputs)
        (
            "per_sample",
            ("data.train_subset=101", "data.batch_size=8", "instrument.per_sample.every_n_steps=3"),
            12,
            24,
        ),
    ],
)
def test_a_stopped_and_resumed_run_ends_with_the_uninterrupted_runs_checkpoint(
    tmp_path, case, overrides, stop, steps
) -> None:
    """Not only the parameters and the logged numbers: every state in the last checkpoint
    (the loader's, each callback's) is the uninterrupted run's, bit for bit, but for the
    resume's own settings and the wall time. Each case differed before (a probe's)."""
    common = ("model.hidden=[16]", "logging.progress=false", f"trainer.max_steps={steps}",
              *overrides)  # fmt: skip
    train(tmp_path / "whole", *common)
    with pytest.raises(SystemExit):
        train(tmp_path / "a", *common, callbacks=[StopAt(stop)])
    train(tmp_path / "a", *common, "trainer.resume=auto",
          f"trainer.checkpoint.search_dir={tmp_path / 'a'}")  # fmt: skip
    whole, resumed = (load_checkpoint(tmp_path / d / "checkpoints" / "last.pt")
                      for d in ("whole", "a"))  # fmt: skip
    for state in (whole, resumed):
        del state["wall_s"], state["config"]["trainer"]["resume"]
        del state["config"]["trainer"]["checkpoint"]["search_dir"]
    assert _differences(whole, resumed) == []
    assert read_scalars(tmp_path / "whole") == read_scalars(tmp_path / "a")


def test_drop_events_from_reads_each_records_step_off_its_bytes(tmp_path) -> None:
    """drop_events_from reads each record's step off its bytes, a varint: steps of one byte
    and of several (128 on: 2 bytes; 16384 on: 3; 2⁴⁰: 6), step 0 (which protobuf leaves out
    of the record: absent, 0) and a negative one (ten bytes, two's complement) compared as
    the steps they are, the file's version record (no step: read as 0) kept from any step,
    0 and below too; an HPARAMS record past the
    step (an end status) kept, the other records kept byte for byte and a partial last one
    (a killed writer's) after them. A file with nothing at or past the step, or the one
    ``skip`` names, is left as it is and not counted as changed."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    from trainer.hparams import _frames, drop_events_from, end_summary
    from trainer.logger import TensorBoardLogger

    steps = [-1, 0, 1, 127, 128, 129, 255, 256, 16383, 16384, 20000, 2**40]
    logger = TensorBoardLogger(tmp_path)
    for s in steps:
        logger.add_floats({"a": float(s)}, s)
    logger.add_summary(end_summary(True), 2**40)
    logger.close()
    (path,) = tmp_path.glob("events.out.tfevents.*")
    data = path.read_bytes() + b"\x05\x00\x00"  # (a partial record at the end)
    frames, _ = _frames(data)
    assert len(frames) == 1 + len(steps) + 1  # (the version record, the steps', the status)
    for cut in (-1, 0, 1, 128, 129, 256, 16384, 20001, 2**40):  # (the version record kept
        # from 0 and below too, though no caller drops from before step 1)
        path.write_bytes(data)
        assert drop_events_from(tmp_path, cut) == [path], cut
        rewritten = path.read_bytes()
        kept = [s for s in steps if s < cut]
        # byte for byte: the version record, the steps before the cut, the end status
        a, b = frames[0][0], frames[len(kept)][1]
        (c, d) = frames[-1]
        assert rewritten == data[a:b] + data[c:d] + b"\x05\x00\x00"
        events = list(EventFileLoader(str(path)).Load())
        assert events[0].file_version.startswith("brain.Event:")
        assert [e.step for e in events[1:-1]] == kept, cut
        assert [v.tensor.float_val[0] for e in events[1:-1] for v in e.summary.value] == kept
        assert events[-1].summary.value[0].tag.startswith("_hparams_/")
    path.write_bytes(data)
    assert drop_events_from(tmp_path, 2**40 + 1) == []  # (nothing past it: left as it is)
    assert drop_events_from(tmp_path, 1, skip=path) == []
    assert path.read_bytes() == data


@pytest.mark.parametrize("rewritten", [False, True])
def test_a_resume_refuses_a_per_sample_weights_file_rewritten_since(tmp_path, rewritten):
    """The checkpoint kept only ``weighting.path``: a file rewritten at the same path (its
    weights reversed) resumed silently and trained on other weights (a probe's). The weights'
    digest is kept now: other weights are refused, naming the file, before any step; the same
    ones resume to the uninterrupted run's parameters, bit for bit."""
    path = tmp_path / "w.pt"
    w = torch.rand(64, generator=torch.Generator().manual_seed(1)) + 0.1
    torch.save(w, path)
    common = ["data=synthetic", "data.num_train=64", "data.num_val=32", "data.batch_size=16",
              "trainer.max_steps=6", "model.hidden=[8]", "logging.progress=false",
              "loss.mode=vector", "weighting=per_sample", f"weighting.path={path}"]  # fmt: skip
    train(tmp_path / "whole", *common)
    with pytest.raises(SystemExit):
        train(tmp_path / "a", *common, callbacks=[StopAt(2)])
    if rewritten:
        torch.save(w.flip(0), path)
    resume = ["trainer.resume=auto", f"trainer.checkpoint.search_dir={tmp_path / 'a'}"]
    if rewritten:
        said = f"does not fit this run: weighting.path: {path} holds other weights than"
        with pytest.raises(ValueError, match=said):
            train(tmp_path / "a", *common, *resume)
        return
    train(tmp_path / "a", *common, *resume)
    for (name, a), b in zip(final_params(tmp_path / "whole").items(),
                            final_params(tmp_path / "a").values(), strict=True):  # fmt: skip
        assert torch.equal(a, b), name


def test_a_weights_file_saved_off_a_graph_is_read(tmp_path):
    """A .pt weights file holding a tensor that requires grad (saved off a graph): the digest's
    ``.numpy()`` raised torch's "Can't call numpy() on Tensor that requires grad" at setup,
    naming neither the file nor the weighting (a review's); before the digest, a WeightError
    at the first step ("computed from parameters?"). Its values are read."""
    path = tmp_path / "w.pt"
    torch.save(torch.rand(64, generator=torch.Generator().manual_seed(1)).requires_grad_(), path)
    common = ["data=synthetic", "data.num_train=64", "data.num_val=32", "data.batch_size=16",
              "trainer.max_steps=2", "model.hidden=[8]", "logging.progress=false",
              "loss.mode=vector", "weighting=per_sample", f"weighting.path={path}"]  # fmt: skip
    assert train(tmp_path / "run", *common)["status"] == "completed"


class NumpyState(torch.optim.SGD):
    """SGD keeping a NumPy scalar (a running scale) in each parameter's state."""

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    st = self.state[p]
                    st["scale"] = np.float64(st.get("scale", 1.0)) * np.float64(0.99)
        return super().step()


def numpy_lr_groups(params, lr: float = 0.01) -> torch.optim.Optimizer:
    """A factory computing a group's lr with NumPy (``np.sqrt``): a NumPy scalar in the
    param groups."""
    params = list(params)
    return torch.optim.SGD([{"params": params[:2], "lr": np.sqrt(lr)},
                            {"params": params[2:], "lr": lr}])  # fmt: skip


class FirstStep(Callback):
    def __init__(self) -> None:
        self.first: int | None = None

    def on_train_step_end(self, trainer, out) -> None:
        if self.first is None:
            self.first = out.step


@pytest.mark.parametrize("where", ["NumpyState", "numpy_lr_groups"])
def test_an_optimizer_whose_state_holds_numpy_values_resumes(tmp_path, caplog, where) -> None:
    """NumPy values in an optimizer's state (or a group's lr computed with NumPy): each
    checkpoint was written, then refused by the safe load, which ``resume=auto`` took for
    corrupt, training the run again from step 1, ``completed`` (a probe's). Converted when
    written, as a callback's state is, and said: the resume continues at step 4, ending with
    the uninterrupted run's parameters, bit for bit."""
    own = ["~optimizer", f"+optimizer._target_={__name__}.{where}", "+optimizer._partial_=true",
           "+optimizer.lr=0.01", "logging.progress=false", "trainer.run_id=np"]  # fmt: skip
    train(tmp_path / "whole", *own, "trainer.max_steps=6")
    resume = ["trainer.resume=auto", f"trainer.checkpoint.search_dir={tmp_path / 'a'}"]
    with caplog.at_level(logging.WARNING):
        train(tmp_path / "a", *own, *resume, "trainer.max_steps=3")
    assert (
        f"optimizer {where if where == 'NumpyState' else 'SGD'}: its state_dict() holds "
        "NumPy values" in caplog.text
    )
    seen = FirstStep()
    train(tmp_path / "a", *own, *resume, "trainer.max_steps=6", callbacks=[seen])
    assert seen.first == 4
    for (name, a), b in zip(final_params(tmp_path / "whole").items(),
                            final_params(tmp_path / "a").values(), strict=True):  # fmt: skip
        assert torch.equal(a, b), name
