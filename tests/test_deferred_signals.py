"""The deferral of stop signals while a failure is recorded (run.py _DeferredSignals; a
review's findings, 2026-12-07). The README: "a stop signal arriving while a failure is
recorded ... is held until the record is on disk, then raised again". The deferral started
in ``trainer.run`` once ``fit`` had raised; the failing ``fit`` had by then put the trainer's
stop handlers back (``on_exception``) and flushed its events and closed its loaders (``fit``'s
``finally``) with the process's own handlers: a SIGTERM there (torchrun's, the moment another
rank fails) still killed the run before its record; and one arriving during the
``on_exception`` hooks, before the stop handlers were put back, was taken as a stop request
of a run that is failing, and lost."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal

from conftest import make_cfg

from trainer.callbacks import Callback

OVERRIDES = ("trainer.device=cpu", "logging.progress=false", "model.hidden=[8]",
             "data.batch_size=64", "trainer.max_steps=4", "instrument=none")  # fmt: skip


class FailsAtStep2(Callback):
    """A run that fails at step 2 (a bad batch, a bug of one's own)."""

    failing = False

    def on_train_step_end(self, trainer, out) -> None:
        if out.step == 2:
            FailsAtStep2.failing = True
            raise RuntimeError("a bad step")


class TerminatedInOnException(FailsAtStep2):
    """The same, SIGTERM arriving while the failure's on_exception hooks run."""

    def on_exception(self, trainer, error) -> None:
        os.kill(os.getpid(), signal.SIGTERM)


def _child(run_dir: str, where: str) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # (a torchrun worker's)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    from trainer.logger import TensorBoardLogger
    from trainer.run import run

    callback: Callback = FailsAtStep2()
    if where == "events flush":
        flush, sent = TensorBoardLogger.flush, []

        def terminated_meanwhile(self):  # SIGTERM as the failed run's events are flushed
            if FailsAtStep2.failing and not sent:
                sent.append(1)
                os.kill(os.getpid(), signal.SIGTERM)
            return flush(self)

        TensorBoardLogger.flush = terminated_meanwhile
    else:
        callback = TerminatedInOnException()
    try:
        run(make_cfg(*OVERRIDES), run_dir=run_dir, callbacks=[callback])
    except BaseException:  # noqa: BLE001 (the run's error: exit 3; SIGTERM: killed by it)
        os._exit(3)
    os._exit(0)


def _run_in_child(tmp_path, where: str) -> int | None:
    make_cfg(*OVERRIDES)  # (composed before forking)
    process = multiprocessing.get_context("fork").Process(
        target=_child, args=(str(tmp_path), where)
    )
    process.start()
    process.join(120)
    return process.exitcode


def test_sigterm_while_the_failed_fit_flushes_its_events_waits_for_the_record(tmp_path) -> None:
    code = _run_in_child(tmp_path, "events flush")
    assert (tmp_path / "metrics.json").exists(), (
        f"the run exited {code} without metrics.json: the SIGTERM that came as the failed "
        f"fit flushed its events killed it; left: {sorted(p.name for p in tmp_path.iterdir())}"
    )
    assert json.loads((tmp_path / "metrics.json").read_text())["status"] == "failed"
    assert code == -signal.SIGTERM  # (raised again once recorded: torchrun's exit)


def test_sigterm_during_a_failing_fits_on_exception_is_raised_again(tmp_path) -> None:
    code = _run_in_child(tmp_path, "on_exception")
    assert json.loads((tmp_path / "metrics.json").read_text())["status"] == "failed"
    assert code == -signal.SIGTERM, (
        f"the run exited {code}: the SIGTERM that came during the failure's on_exception "
        "hooks was taken by the failing run's stop handler and never raised again (a sweep "
        "goes on to its next job)"
    )
