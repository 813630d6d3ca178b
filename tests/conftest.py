"""Shared fixtures: compose the real config tree with Hydra's compose API, shrunk for speed."""

from __future__ import annotations

import contextlib
import copy
import functools
import multiprocessing.process
import os
import signal
import subprocess
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra._internal.config_loader_impl import ConfigLoaderImpl
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override
from omegaconf import DictConfig

import trainer  # noqa: F401  (registers the config schemas)
from trainer.callbacks import Callback
from trainer.logger import event_dir

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"

# CPU, no bar: what every test run starts from
BASE = ["trainer.device=cpu", "logging.progress=false"]
#: the config groups (``optimizer``, ``hydra/launcher``, ...): an override of one chooses
GROUPS = {p.relative_to(CONFIGS).as_posix() for p in CONFIGS.rglob("*") if p.is_dir()}


def make_cfg(*overrides: str) -> DictConfig:
    """The composed run config, as ``scripts/train.py`` would see it with these overrides (a
    fresh copy each call: composing the same overrides again gives an equal config).

    Hydra takes about 0.13 s per composition, 770 of them were 40 % of the suite's time, and
    most tests differ from another only in values (``optimizer.lr=0.1``). Hydra composes in two
    stages: the defaults list from the group choices, wherever they stand on the command line,
    then each value override applied in order to the merged config
    (``ConfigLoaderImpl._apply_overrides_to_config``). So the plain ``a.b=v`` / ``+a.b=v`` /
    ``~a.b`` overrides after which only group choices come are applied by that same function
    of Hydra's, in their order, and the others composed (and cached): the same config, the
    same errors (tests/test_config.py checks both ways agree). A value is never moved past
    another value (``seed=3``, ``+x=...``, ``~x``), which may read it or fail before it."""
    parsed = OverridesParser.create().parse_overrides(list(overrides))
    applied = [False] * len(parsed)
    for i in reversed(range(len(parsed))):
        if _value_only(parsed[i]):
            applied[i] = True
        elif parsed[i].key_or_group not in GROUPS:  # a value composed: so are those before
            break
    composed = tuple(o for o, a in zip(overrides, applied, strict=True) if not a)
    cfg = copy.deepcopy(_composed(composed))
    ConfigLoaderImpl._apply_overrides_to_config(
        [o for o, a in zip(parsed, applied, strict=True) if a], cfg
    )
    return cfg


def compose_before_forking(*overrides: str) -> None:
    """Compose these overrides' config into :func:`make_cfg`'s cache here, before forking a
    child that calls ``make_cfg(*overrides)``: the child copies it from the cache it was forked
    with instead of composing it again (0.2-0.7 s a child, as long as the rest of its run). A
    config that fails to compose is left to the child, which fails on it as it would have."""
    with contextlib.suppress(Exception):
        make_cfg(*overrides)


def compose_whole(*overrides: str) -> DictConfig:
    """Every override through Hydra's compose, uncached: what :func:`make_cfg` must equal."""
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose("train", overrides=[*BASE, *overrides])


@functools.cache
def _composed(overrides: tuple[str, ...]) -> DictConfig:
    return compose_whole(*overrides)


def _value_only(override: Override) -> bool:
    """An override that can only set a value: a key with a dot and neither ``/`` nor ``@`` is
    never a config group; a sweep (``a=1,2``), which composing refuses, is composed."""
    key = override.key_or_group
    return (
        override.package is None
        and not override.is_sweep_override()
        and "." in key
        and "/" not in key
        and not key.startswith("hydra.")
    )


#: the most pytest-xdist workers ``-n auto`` (pyproject's addopts) starts: each imports torch
#: and collects the suite (~10 s of a core, ~1 GiB), so a many-core machine's count of them
#: would cost more memory than it saves time
MAX_WORKERS = 8


def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    """``-n auto``: a worker per core this process may use (all of them where the system
    does not say), at most :data:`MAX_WORKERS`."""
    affinity = getattr(os, "sched_getaffinity", None)  # (Linux's)
    cores = len(affinity(0)) if affinity else os.cpu_count() or 1
    return max(1, min(cores, MAX_WORKERS))


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests that wait for a background CLI job (:func:`in_background`) run last, in their
    order: the jobs, started with the session, then run alongside the in-process tests instead
    of being waited for. Under pytest-xdist they run first (their jobs in their own bodies):
    the longest tests first, the short in-process ones then even out the workers' ends."""
    items.sort(
        key=lambda item: (
            hasattr(getattr(item, "function", None), "_background_job") != _XDIST_WORKER
        )
    )


@pytest.fixture(autouse=True)
def _one_thread(request):
    """One intra-op thread for a test, or ``n`` for one marked ``threads(n)``.

    The other xdist worker (or, in one process, the suite's CLI jobs, :func:`in_background`)
    and forked runs keep the second of CI's two cores busy: two threads here contended with
    them for it (the whole suite took 254 s on two
    threads, 214 s on one, back to back). One thread and two round differently (a review saw
    the same 50-step run end with other weights), so the tests of the bitwise guarantees
    (scalar and uniform vector mode; instruments, curvature and per-sample measuring on and
    off; the deferred guard and step mode; foreach and the loop) are marked ``threads(2)``:
    they hold with torch's parallel kernels too."""
    mark = request.node.get_closest_marker("threads")
    n = (mark.args or [mark.kwargs.get("n")])[0] if mark else 1
    if not (isinstance(n, int) and n >= 1):
        raise pytest.UsageError(f"threads(n) takes a number of threads n >= 1, got {mark}")
    threads = torch.get_num_threads()
    torch.set_num_threads(n)
    yield
    torch.set_num_threads(threads)


def in_background(job: Callable[..., Any]) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Run ``job(path, **params)`` for this test in a background thread from the session's
    start; the test receives its return value through the ``background`` fixture.

    For tests of the real CLI: ``job`` starts subprocesses (``scripts/train.py``, sweeps) and
    writes only under ``path`` (a fresh folder; ``params``: the test's parametrization). A
    subprocess spends most of its time importing torch on one core; the in-process tests meanwhile
    use the other, so the suite's wall time is not their sum. Jobs run one at a time, in the
    tests' order. The job must not touch this process's global state (Hydra's, torch's threads):
    whatever needs it stays in the test body. Nothing here depends on timing: a test waits for
    its own job's result. Under pytest-xdist (pyproject's ``-n auto``) the other worker uses
    the other core: a worker runs the job in the test's own body, and these tests run first.
    """

    def mark(test: Callable[..., Any]) -> Callable[..., Any]:
        test._background_job = job  # type: ignore[attr-defined]
        return test

    return mark


#: held by the background job thread while it runs Python code (released while it waits for
#: a subprocess): every multiprocessing start (a test's forked run, a rank, a DataLoader
#: worker) takes it first, so no child is forked while that thread holds a lock the child
#: would then wait on forever (a module being imported, torch.save's first call: a forked
#: run hung, once, under load)
_FORK_GUARD = threading.Lock()
_JOB_THREAD = "cli-job"
_holding = threading.local()  # .guard: this thread holds _FORK_GUARD (the job thread)


_start = multiprocessing.process.BaseProcess.start


@functools.wraps(_start)
def _start_guarded(self) -> None:
    """``Process.start`` on the main thread (a forked run, a rank, a DataLoader worker) while
    the background job thread is waiting for a subprocess or idle. Other threads' starts (a
    job's own, a ``multiprocessing.Pool``'s handler thread, which the job waits on: a review
    saw that deadlock) are not held."""
    if threading.current_thread() is not threading.main_thread():
        _start(self)
        return
    with _FORK_GUARD:
        _start(self)


multiprocessing.process.BaseProcess.start = _start_guarded  # type: ignore[method-assign]


def _fresh_guard() -> None:
    """In a forked child: a guard of its own (it was forked while its parent held this one,
    and would wait on it forever to start a DataLoader worker)."""
    global _FORK_GUARD, _holding
    _FORK_GUARD, _holding = threading.Lock(), threading.local()


os.register_at_fork(after_in_child=_fresh_guard)


def _waiting(method: Callable[..., Any]) -> Callable[..., Any]:
    """``subprocess.Popen`` ``method`` that, called on the job thread, releases the guard
    while it waits."""

    @functools.wraps(method)
    def wait(self, *args, **kwargs):
        if not getattr(_holding, "guard", False):  # (another thread, or a nested wait)
            return method(self, *args, **kwargs)
        _holding.guard = False
        _FORK_GUARD.release()
        try:
            return method(self, *args, **kwargs)
        finally:
            _FORK_GUARD.acquire()
            _holding.guard = True

    return wait


subprocess.Popen.communicate = _waiting(subprocess.Popen.communicate)  # type: ignore[method-assign]
subprocess.Popen.wait = _waiting(subprocess.Popen.wait)  # type: ignore[method-assign]


def _guarded(job: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    with _FORK_GUARD:
        _holding.guard = True
        try:
            return job(*args, **kwargs)
        finally:
            _holding.guard = False


#: this process is a pytest-xdist worker: the other worker uses the other core, so a test's
#: CLI job runs in its own body (each worker collects every test, and a job started for a
#: test another worker runs would be run twice)
_XDIST_WORKER = "PYTEST_XDIST_WORKER" in os.environ


@pytest.fixture(scope="session", autouse=True)
def _background_jobs(request, tmp_path_factory):
    if _XDIST_WORKER:
        yield {}
        return
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=_JOB_THREAD)
    futures: dict[str, Future] = {}
    for item in request.session.items:  # the selected tests only, in their order
        job = getattr(getattr(item, "function", None), "_background_job", None)
        if job is not None:
            params = dict(item.callspec.params) if hasattr(item, "callspec") else {}
            path = tmp_path_factory.mktemp("job")
            futures[item.nodeid] = pool.submit(_guarded, job, path, **params)
    yield futures
    pool.shutdown(wait=True, cancel_futures=True)


@pytest.fixture
def background(request, _background_jobs, tmp_path_factory):
    """The return value of this test's :func:`in_background` job (waits for it)."""
    if _XDIST_WORKER:
        item = request.node
        params = dict(item.callspec.params) if hasattr(item, "callspec") else {}
        return item.function._background_job(tmp_path_factory.mktemp("job"), **params)
    return _background_jobs[request.node.nodeid].result()


requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


class StopAt(Callback):
    """A stop signal (as the handler sets it) at the end of step ``at``."""

    def __init__(self, at: int) -> None:
        self.at = at

    def on_train_step_end(self, trainer, out) -> None:  # noqa: F811 (the hook's own name)
        if out.step == self.at:
            trainer.stop_signal = signal.SIGTERM


def train(run_dir: Path, *overrides: str, callbacks=()) -> dict:
    """Run the trainer in-process into ``run_dir`` and return its final metrics."""
    from trainer.run import run

    return run(make_cfg(*overrides), run_dir=run_dir, callbacks=callbacks)


def final_params(run_dir: Path) -> dict[str, torch.Tensor]:
    from trainer.checkpoint import load_checkpoint

    return load_checkpoint(run_dir / "checkpoints" / "last.pt")["model"]


def read_scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar in the run's event files, read back with tensorboard's own reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(event_dir(run_dir)), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
