"""``run(cfg) -> dict``: build everything from a composed config, train, write the run's files.

Called by ``scripts/train.py`` (through ``@hydra.main``) and directly by the tests. A run writes
into its run dir: ``tb/`` (TensorBoard events), ``checkpoints/last.pt`` (model, optimizer,
scheduler, scaler, step, epoch, config), ``metrics.json`` (final metrics and status); Hydra adds
``.hydra/`` and the log file.
"""

from __future__ import annotations

import contextlib
import errno
import inspect
import itertools
import json
import logging
import os
import random
import re
import shlex
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from hydra.utils import get_object, instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf
from torch import nn

from trainer import distributed
from trainer.checkpoint import (
    RUN_OUTPUTS,
    STOP_SIGNALS,
    CheckpointWriter,
    PeriodicCheckpoints,
    StopOnSignals,
    continuable,
    derive_run_id,
    find_checkpoints,
    keep_run_number,
    marked_id,
    next_run_number,
    rank_rng_state,
    resume_changes,
    run_number,
    select_resume,
    set_aside_later,
    set_aside_previous,
    set_rng_state,
    step_of,
    step_path,
    submitit_requeue,
    write_json,
    write_run_marker,
)
from trainer.components import build
from trainer.config import ConfigError, ContractError, TrainConfig, check_stepping, validate
from trainer.data.base import DataModule
from trainer.hparams import (
    drop_end_status,
    drop_events_from,
    end_summary,
    hydra_hparams,
    overrides_text,
    replace_start,
    run_name,
    start_state,
    start_summaries,
)
from trainer.instrument import build_callbacks
from trainer.logger import ProgressOptions, TensorBoardLogger, event_dir, shown
from trainer.loop import (
    Callback,
    Trainer,
    check_callback,
    check_plateau,
    dtype_refusal,
    planned_steps,
)
from trainer.losses import Loss, as_loss
from trainer.regularizers import InputGradPenalty
from trainer.report import CONTINUED
from trainer.sweep import check_direction, in_multirun, task_overrides
from trainer.weighting import Weighting, prepare

log = logging.getLogger(__name__)


def resolve_device(spec: str) -> torch.device:
    """``auto`` -> CUDA when present, else CPU; a device that is not there is a ConfigError."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(spec)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(
                f"trainer.device: got {spec!r} but CUDA is not available on this machine; "
                "use trainer.device=auto or cpu"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(
                f"trainer.device: got {spec!r} but only {torch.cuda.device_count()} CUDA "
                "device(s) exist"
            )
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"trainer.device: got {spec!r} but MPS is not available")
    return device


def seed_everything(seed: int, deterministic: bool) -> None:
    """Seed Python, NumPy and torch (all devices); optionally force deterministic kernels."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        # cuBLAS needs this workspace setting for deterministic matmuls (see README); it takes
        # effect only if set before the process first uses cuBLAS
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.benchmark = False
    # set both ways (the jobs of a sweep share one process), but only on a change: the call
    # imports torch._inductor and torch._dynamo, 2 s of start-up on a small CPU. True is
    # strict: a process in warn-only mode (a notebook's) ran nondeterministic kernels warned
    # of only (a review's finding); run() puts the process's own mode back after
    enabled = torch.are_deterministic_algorithms_enabled()
    if enabled != deterministic or (
        deterministic and torch.is_deterministic_algorithms_warn_only_enabled()
    ):
        torch.use_deterministic_algorithms(deterministic)


#: a scheduler's keyword for its length, set to the run's total optimizer steps where its
#: constructor takes it and the config leaves it out (``CosineAnnealingLR``'s ``T_max``,
#: ``OneCycleLR``'s ``total_steps`` unless ``epochs`` is given): one of the config's own is kept
_LENGTH_KEYS = {"T_max": (), "total_steps": ("epochs", "steps_per_epoch")}


def run_length_keys(cfg: DictConfig) -> list[str]:
    """The keys of :data:`_LENGTH_KEYS` the trainer sets for the scheduler ``cfg`` builds."""
    if cfg.get("_target_") is None:
        return []
    try:
        parameters = inspect.signature(get_object(cfg._target_)).parameters
    except (TypeError, ValueError):  # (no signature to read: the config is taken as it is)
        return []
    return [  # (a key left null is left to the trainer too: T_max: null reached the
        # scheduler as None, which failed after the first update, a probe's)
        key
        for key, instead in _LENGTH_KEYS.items()
        if key in parameters
        and cfg.get(key) is None
        and not any(cfg.get(k) is not None for k in instead)
    ]


def build_scheduler(
    cfg: DictConfig, optimizer: torch.optim.Optimizer, total_steps: int
) -> torch.optim.lr_scheduler.LRScheduler | None:
    """The scheduler from its config node (a partial ``_target_``, called with the optimizer,
    its length set to ``total_steps`` where :func:`run_length_keys` says). A scheduler of schedulers
    (``SequentialLR``, ``ChainedScheduler``) lists partial nodes under ``schedulers``: each is
    called with the optimizer first, and the outer one gets it by keyword (``ChainedScheduler``
    takes the list first)."""
    if cfg.get("_target_") is None:
        return None
    # (a length left null in the file: the partial's None, overridden by the call's keyword)
    kwargs = dict.fromkeys(run_length_keys(cfg), max(total_steps, 1))
    if not cfg.get("schedulers"):
        with _scheduler_named(cfg):
            return instantiate(cfg)(optimizer, **kwargs)
    for i, part in enumerate(cfg.schedulers):  # (before building: Hydra builds them first)
        if not isinstance(part, DictConfig) or "_target_" not in part or not part.get("_partial_"):
            raise ConfigError(
                f"scheduler.schedulers[{i}]: give each part a _target_ and _partial_: true "
                "(the trainer calls it with the optimizer)"
            )
    factory = instantiate(cfg, _convert_="all")  # (the parts as a list of partials)
    parts = factory.keywords["schedulers"]
    built = []
    for i, part in enumerate(parts):  # (partials: checked on the config above)
        try:
            built.append(part(optimizer))
        except TypeError as e:
            raise ConfigError(
                f"scheduler.schedulers[{i}]: {e} (each is called with the optimizer; give it "
                "_partial_: true and its other keys, its length (T_max, total_steps) included)"
            ) from e
    with _scheduler_named(cfg):
        return factory(optimizer=optimizer, schedulers=built, **kwargs)


@contextlib.contextmanager
def _scheduler_named(cfg: DictConfig) -> Iterator[None]:
    """A scheduler's constructor refusing its file's values, named as the scheduler's key
    (torch's TypeError or ValueError came with Hydra's traceback, naming no key: a StepLR
    without step_size, an unknown ReduceLROnPlateau mode, a lambda given as a dotted path;
    a probe's)."""
    try:
        yield
    except (TypeError, ValueError) as e:
        text = str(e)
        own = [k for k in cfg if isinstance(k, str) and not k.startswith("_")]
        missing = re.findall(r"'(\w+)'", text) if "required positional argument" in text else []
        if missing:
            key, fix = missing[0], "set it in the scheduler's file"
        elif "multiple values for argument 'optimizer'" in text:
            key, fix = "optimizer", "leave it out: the trainer passes its optimizer"
        elif "'str' object is not callable" in text:  # (a function given by its path)
            paths = [k for k in own if isinstance(cfg.get(k), str) and "." in cfg.get(k)]
            key = paths[0] if paths else "<key>"
            fix = ("give a function as {_target_: hydra.utils.get_method, path: "
                   "my.module.fn}, not its dotted path")  # fmt: skip
        else:
            named = [k for k in own if re.search(rf"\b{re.escape(k)}\b", text)]
            key = named[0] if named else "<key>"
            fix = "check the file's values against the class's arguments"
        raise ConfigError(
            f"scheduler.{key}: {cfg.get('_target_')} could not be built from its config "
            f"({text.strip().splitlines()[0] if text.strip() else type(e).__name__}); {fix}"
        ) from e


#: what a scheduler does past the run's length the trainer set (its length key's)
_PAST_LENGTH = {
    "T_max": "CosineAnnealingLR raises the learning rate again (it is periodic)",
    "total_steps": "OneCycleLR stops the run with an error at that step",
}


#: Hydra's keys naming where a job writes (its own folder, different at every start), not
#: what it computes: a value interpolating one is kept as written in a run's identity
RUN_DIR_KEYS = ("${hydra:runtime.output_dir}", "${hydra:run.dir}", "${hydra:sweep.dir}")


def identity_config(cfg: DictConfig, resolved: dict[str, Any] | None = None) -> dict[str, Any]:
    """``cfg`` resolved, as a run's identity (its derived ``run_id``) and a checkpoint keep
    it, except values that interpolate the job's folder (:data:`RUN_DIR_KEYS`), kept as
    written: a callback writing ``${hydra:runtime.output_dir}/hooks.jsonl`` made every start
    another run (``resume=auto`` found none) and an explicit resume a changed config (a
    probe's finding). A value reaching the folder through another key is resolved."""
    if resolved is None:  # (the caller's, where it has it: resolved once)
        resolved = cast(dict[str, Any], OmegaConf.to_container(cfg, resolve=True))
    raw = OmegaConf.to_container(cfg, resolve=False)

    def kept(r: Any, v: Any) -> Any:
        if isinstance(r, dict) and isinstance(v, dict):
            return {k: kept(r.get(k), x) for k, x in v.items()}
        if isinstance(r, list) and isinstance(v, list) and len(r) == len(v):
            return [kept(a, b) for a, b in zip(r, v, strict=True)]
        if isinstance(r, str) and any(key in r for key in RUN_DIR_KEYS):
            return r
        return v

    return cast(dict[str, Any], kept(raw, resolved))


def _check_loader_keys(node: DictConfig, data: DataModule) -> None:
    """A loader key the config gives that the built data module does not hold: an
    ``__init__`` taking it by name (to size something of its own) and passing the rest of
    ``**common`` on trained with DataModule's default, unsaid (``data.batch_size=16`` ran at
    64, HParams saying 16: a probe's). Refused, naming the key and both values."""
    from trainer.data.base import LOADER_KEYS

    for key in LOADER_KEYS:
        if key not in node or not hasattr(data, key):  # (a missing one: setup names it)
            continue
        given, held = node.get(key), getattr(data, key)
        if isinstance(given, DictConfig | ListConfig):
            given = OmegaConf.to_container(given, resolve=True)
        if given != held:
            raise ContractError(
                f"data.{key}: the config gives {given!r}, and the built {type(data).__name__} "
                f"holds {held!r}: its __init__ takes {key} and does not pass it on (pass it to "
                f"super().__init__({key}={key}, **common); README, 'Bring your own'), or "
                "changes it (leave the loader keys as the config gives them)"
            )


_Sequential = torch.optim.lr_scheduler.SequentialLR
_Chained = torch.optim.lr_scheduler.ChainedScheduler


def _check_own_schedule_length(
    cfg: DictConfig, scheduler: torch.optim.lr_scheduler.LRScheduler, total_steps: int
) -> None:
    """A ``OneCycleLR`` whose length (its file's ``total_steps``, or ``epochs`` ×
    ``steps_per_epoch``; a factory's own) is shorter than the steps it is stepped: torch
    raises "Tried to step N times" at the step after it, mid-run, having trained (a session's
    finding: a run of 14 steps with ``total_steps: 5`` failed at step 6). Refused before
    training, naming the key. Inside a scheduler of schedulers, at any depth: a
    ``ChainedScheduler`` steps each part at every step of its own; a ``SequentialLR`` steps a
    part in its segment only, restarting it at its milestone, so a part is checked against the
    steps of its segment the run reaches (a OneCycleLR after the milestone, or in a factory's
    ChainedScheduler of a SequentialLR, failed mid-run unchecked: a session's and a review's)."""
    for cycle, node, name, own, start, end in _cycles(scheduler, cfg, "scheduler", 0, total_steps):
        needed = max(end - start, 0)
        length = cycle.total_steps
        if length >= needed:
            continue
        steps = (
            f"this run trains {total_steps} optimizer steps" if (start, end) == (0, total_steps)
            else f"its segment of the SequentialLR runs {needed} steps of this run's "
            f"{total_steps} (from optimizer step {start})"
        )  # fmt: skip
        passed = name == "scheduler" and "total_steps" in run_length_keys(cfg)
        factory = False
        if own and node.get("total_steps") is not None:
            keys = f"{name}.total_steps"
        elif own and node.get("epochs") is not None:
            keys = f"{name}.epochs × {name}.steps_per_epoch"
        else:  # (a factory's: its own code's length, named by its target)
            keys, factory = f"{name}._target_ ({node.get('_target_')})", True
        if not factory:  # (the file's own length)
            fix = (
                "leave the length out (the trainer sets it to the run's) or set it to at least "
                "that" if name == "scheduler" and needed == total_steps
                else f"set it to at least {needed}"
            )  # fmt: skip
        elif name == "scheduler" and node.get("total_steps") is not None:  # (the file's
            # value for a factory's keyword, passed over the run's: "take total_steps" misled)
            keys = f"{name}.total_steps, given to {name}._target_ ({node.get('_target_')})"
            fix = (f"leave scheduler.total_steps out (the trainer passes the run's length) and "
                   f"make the factory's OneCycleLR at least {needed} steps")  # fmt: skip
        elif name == "scheduler" and not passed:  # (the trainer would pass it the run's)
            fix = (f"have the factory take total_steps (the trainer passes the run's length) "
                   f"and make its OneCycleLR at least {needed} steps")  # fmt: skip
        else:  # (it takes the run's length, or is a listed part, called with the optimizer)
            fix = f"make the factory's OneCycleLR at least {needed} steps"
        raise ConfigError(
            f"{keys}: OneCycleLR's schedule is {length} steps and {steps}; past its step "
            f"{length} OneCycleLR stops the run with an error. Either {fix}, or shorten the run "
            "(trainer.max_epochs / trainer.max_steps)"
        )


def _cycles(
    scheduler: Any, node: DictConfig, name: str, start: int, end: int, own: bool = True
) -> Iterator[tuple[Any, DictConfig, str, bool, int, int]]:
    """Each ``OneCycleLR`` in ``scheduler``, stepped from run step ``start`` to ``end``, with
    the nearest config node that builds it (``own``: the node is its own; else a factory's,
    which builds it inside), that node's key, and the steps it is stepped between. A
    ``SequentialLR``'s part ``i`` is restarted at its milestone and stepped to the step
    before the next one (the last to ``end``); a ``ChainedScheduler``'s parts each at every
    step."""
    if isinstance(scheduler, torch.optim.lr_scheduler.OneCycleLR):
        yield scheduler, node, name, own, start, end
        return
    if not isinstance(scheduler, (_Chained, _Sequential)):
        return
    listed = node.get("schedulers") if own else None  # (a factory's: its file lists none)
    milestones = list(getattr(scheduler, "_milestones", ()))
    for i, part in enumerate(scheduler._schedulers):
        sub = listed[i] if listed is not None and i < len(listed) else None
        first, last = start, end
        if isinstance(scheduler, _Sequential):
            first = start + (milestones[i - 1] if i > 0 else 0)
            if i < len(milestones):
                last = min(start + milestones[i] - 1, end)
        if isinstance(sub, DictConfig):
            yield from _cycles(part, sub, f"{name}.schedulers[{i}]", first, last)
        else:
            yield from _cycles(part, node, name, first, last, own=False)


def _warn_rising_cosine(scheduler: torch.optim.lr_scheduler.LRScheduler) -> None:
    """A ``CosineAnnealingLR`` whose ``eta_min`` is above a parameter group's learning rate
    raises that group's rate over the run instead of decaying it (``scheduler=cosine
    scheduler.eta_min=0.1`` with ``optimizer.lr=1e-3`` trained at rates up to 0.1, unsaid:
    a session's finding). Warned, naming both values (a deliberate rise is the user's)."""
    if not isinstance(scheduler, torch.optim.lr_scheduler.CosineAnnealingLR):
        return
    eta_min = scheduler.eta_min
    for i, group in enumerate(scheduler.optimizer.param_groups):
        lr = group.get("initial_lr", group.get("lr"))
        if isinstance(lr, (int, float)) and lr < eta_min:
            log.warning(
                "scheduler.eta_min (%g) is above the learning rate (%g%s): the cosine schedule "
                "raises it to %g over the run instead of decaying it",
                eta_min, lr, f", parameter group {i}" if len(scheduler.optimizer.param_groups)
                > 1 else "", eta_min,
            )  # fmt: skip


def _check_schedule_length(
    trainer: Trainer, checkpoint: Path, cfg: DictConfig, saved: dict[str, int] | None = None
) -> None:
    """A schedule the trainer set to the run's length (``T_max``, ``total_steps``: the
    checkpoint's ``schedule_length``, with which a resumed run builds it again, or, of a
    checkpoint from before 2026-12-05, its scheduler state's) runs over the checkpoint's run.
    Resumed to train longer, past it ``CosineAnnealingLR`` would raise the learning rate again
    and ``OneCycleLR`` raise an error mid-run: refused. Resumed to train less, the learning rate
    follows the checkpoint's schedule and stops short of its end. A length of the config's own
    is the user's: not checked. (A factory taking ``T_max`` that returned a ``SequentialLR``
    has no ``T_max`` to read: its longer resume raised the learning rate again unchecked, a
    probe's finding.)"""
    for key in run_length_keys(cfg):
        length = saved.get(key) if saved else getattr(trainer.scheduler, key, None)
        if not isinstance(length, int) or trainer.total_steps == length:
            continue
        name = type(trainer.scheduler).__name__
        if trainer.total_steps > length:
            raise ConfigError(
                f"resume: {checkpoint}'s {name} schedule runs over its run's {length} steps "
                f"({key}); this run would train to step {trainer.total_steps}, and past {key} "
                f"{_PAST_LENGTH[key]}. Resume with the checkpoint's length "
                "(trainer.max_epochs / trainer.max_steps) or less, or start a new run"
            )
        end = "before it reaches eta_min" if key == "T_max" else "before its schedule ends"
        log.warning(
            "resume: the learning rate follows the checkpoint's %s schedule over %d steps (%s); "
            "this run stops at step %d, %s",
            name, length, key, trainer.total_steps, end,
        )  # fmt: skip


def _warn_worker_draws(saved: dict[str, Any] | None, now: dict[str, Any], trainer: Trainer) -> None:
    """A resume between ``data.num_workers=0`` and more, on the DataLoader path: a Dataset's
    random draws (augmentation) come from the global generators in the main process and from
    per-batch seeds in workers, so the resumed run's differ from the checkpoint run's (a
    probe: 3.7e-3 in the weights, unsaid)."""
    from trainer.data.base import DeviceLoader

    before = ((saved or {}).get("data") or {}).get("num_workers")
    after = (now.get("data") or {}).get("num_workers")
    if (
        isinstance(before, int) and isinstance(after, int) and (before == 0) != (after == 0)
        and isinstance(trainer.train_loader, DeviceLoader)
    ):  # fmt: skip
        log.warning(
            "resume: data.num_workers %d -> %d: random draws of the Dataset (augmentation) "
            "come from the main process's generators with 0 workers and from per-batch seeds "
            "with more, so this run's differ from the checkpoint run's (the same with any "
            "number > 0 of workers)", before, after,
        )  # fmt: skip
    # validation with workers: per-batch seeds, so another eval_batch_size draws other
    # augmentations for the same samples (a resume changing it changed val/* unsaid, a probe's)
    size = [((d or {}).get("data") or {}).get("eval_batch_size") for d in (saved, now)]
    if (
        size[0] != size[1] and isinstance(after, int) and after > 0
        and isinstance(trainer.val_loader, DeviceLoader)
    ):  # fmt: skip
        log.warning(
            "resume: data.eval_batch_size %s -> %s: with workers, random draws of the "
            "validation Dataset (augmentation) are seeded per batch, so this run's validation "
            "draws differ from the checkpoint run's (validation data that draws nothing is "
            "not affected)", size[0], size[1],
        )  # fmt: skip


def _warn_world_draws(state: dict[str, Any], trainer: Trainer) -> None:
    """A resume on another number of processes continues the checkpoint's run up to rounding
    where nothing is drawn at random; a Dataset's random draws (augmentation: each rank's
    batches are others) and dropout (one stream, the same on every rank) draw otherwise than
    the checkpoint's run would have (a probe: 0.024 in the weights, unsaid). A split held as
    tensors with no transform, or only the built-in normalization, draws nothing; dropout in
    eval mode as the checkpoint has it neither."""
    from trainer.data.base import ByteNormalize, DeviceLoader, TensorSplit

    before, now = len(state.get("tally_ranks") or [None]), trainer.world.size
    if before == now:
        return
    what = []
    loader = trainer.train_loader
    if isinstance(loader, DeviceLoader):
        data = getattr(loader.loader.dataset, "dataset", None)
        if not (
            isinstance(data, TensorSplit)
            and (data.transform is None or isinstance(data.transform, ByteNormalize))
        ):
            what.append("a Dataset's random draws (augmentation)")
    modes = state.get("train_modes") or {}
    dropout = [n or type(m).__name__ for n, m in trainer.model.named_modules()
               if (isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0
                   or isinstance(m, nn.MultiheadAttention | nn.RNNBase) and m.dropout > 0)
               and modes.get(n, m.training)]  # fmt: skip
    if dropout:
        what.append(f"dropout ({', '.join(dropout[:3])}{' …' if len(dropout) > 3 else ''}: "
                    "one stream, the same on every rank)")  # fmt: skip
    if what:
        log.warning(
            "resume: %d process(es) -> %d: %s draw otherwise than the checkpoint's run would "
            "have, so this run is not its continuation (up to rounding, it is where nothing "
            "is drawn at random)", before, now, " and ".join(what),
        )  # fmt: skip


def _point_log_to(home: Path, here: str, step: int) -> None:
    """A line in the run dir's ``train.log`` naming the job folder a continuation logs in: the
    run dir's log ended at the break, with nothing to say where the rest went (a probe's).
    Written as the job's log lines are (the format of its log file's handler)."""
    log_file = home / "train.log"
    if not log_file.is_file():
        return
    files = [h for h in logging.getLogger().handlers if isinstance(h, logging.FileHandler)]
    with contextlib.suppress(OSError):
        handler = logging.FileHandler(log_file)
        handler.setFormatter(  # (Hydra's job log format where no file handler has one)
            files[0].formatter if files and files[0].formatter is not None
            else logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
        )  # fmt: skip
        try:
            handler.handle(log.makeRecord(
                log.name, logging.INFO, __file__, 0, "continued from step %d by the job in "
                "%s: its train.log holds what follows", (step, here), None,
            ))  # fmt: skip
        finally:
            handler.close()


def _display(path: Path | None) -> str:
    """``path`` as the user can open it: relative to where the run was started (Hydra's
    ``runtime.cwd``: with ``hydra.job.chdir=true`` the working directory is the run's own,
    and the run said ``run dir: .``, a probe's), else absolute."""
    if path is None:  # (a stop whose checkpoint could not be written)
        return "none"
    from hydra.core.hydra_config import HydraConfig

    base = Path.cwd()
    if HydraConfig.initialized():
        with contextlib.suppress(Exception):
            base = Path(HydraConfig.get().runtime.cwd)
    try:
        return str(path.resolve().relative_to(base.resolve()))
    except ValueError:
        return str(path.resolve())


class Interrupted(SystemExit):
    """A run stopped by SIGTERM, SIGINT or SIGUSR1 after checkpointing: exit status 128 + N.
    ``requeue``: submitit's handler of its signal, which the job is handed to (a requeue)."""

    requeue: Any = None


def check_writable(run_dir: Path) -> None:
    """Create ``run_dir`` and prove a file can be written there, before anything runs (a
    probe file of the process's own: the ranks of a data-parallel run check the same dir at
    once, and one rank's unlink of a shared name failed the other's)."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write_test.", dir=run_dir)
        try:
            os.write(fd, b"ok")
        finally:
            os.close(fd)
            os.unlink(probe)
    except OSError as e:
        raise OSError(e.errno, f"the run dir {run_dir} cannot be written: {e.strerror or e}") from e


def check_free_space(trainer: Trainer, directory: Path, keep_last: int) -> None:
    """Refuse to start when the disk cannot hold a checkpoint; warn when it cannot hold
    ``keep_last`` + 1 (the newest ones and the one being written)."""
    params = sum(p.numel() * p.element_size() for p in trainer.model.parameters())
    buffers = sum(b.numel() * b.element_size() for b in trainer.model.buffers())
    # model + optimizer state (Adam keeps two moments per parameter) + slack for the rest
    one = 3 * params + buffers + 2**20
    where = directory
    while not where.exists() and where != where.parent:  # (a folder not made yet: its disk)
        where = where.parent
    free = shutil.disk_usage(where).free
    if free < one:
        raise OSError(
            errno.ENOSPC,
            f"{directory} has {free / 2**20:.1f} MiB free, less than one checkpoint of this "
            f"run (about {one / 2**20:.1f} MiB)",
        )
    if free < one * (keep_last + 1):
        log.warning(
            "%s has %.1f MiB free: fewer than trainer.checkpoint.keep_last + 1 = %d checkpoints "
            "of about %.1f MiB fit", directory, free / 2**20, keep_last + 1, one / 2**20,
        )  # fmt: skip


def refuse_repeated_choices() -> None:
    """A list group given an option twice (``regularizer=[l2,l2]``) composes to one entry,
    silently: refuse it from the command line's own overrides (when Hydra runs the job)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.core.override_parser.overrides_parser import OverridesParser

    if not HydraConfig.initialized():
        return
    for o in OverridesParser.create().parse_overrides(task_overrides()):
        value = o.value()
        if o.key_or_group == "regularizer" and isinstance(value, list):
            repeated = sorted({str(v) for v in value if value.count(v) > 1})
            if repeated:
                raise ConfigError(
                    f"regularizer: {', '.join(repeated)} listed more than once in {o.input_line}; "
                    "give each once and set its coef (e.g. regularizer.l2.coef=...)"
                )


def refuse_shadowed_configs() -> None:
    """A config file of one's own (``--config-dir``, ``hydra.searchpath``) with the group and
    name of one of this project's (``model/mlp.yaml``) is never used where the project's
    folder comes first on Hydra's search path: ``model=mlp`` trained the built-in MLP,
    unsaid (a probe). Refused, naming both files. (A primary config folder of one's own,
    ``--config-path``, comes first: its files win, and nothing is refused.)"""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return
    sources = [Path(s.path) for s in HydraConfig.get().runtime.config_sources
               if s.schema == "file" and s.path and Path(s.path).is_dir()]  # fmt: skip
    project = Path(__file__).resolve().parents[1] / "configs"
    first = next((i for i, p in enumerate(sources) if p.resolve() == project.resolve()), None)
    if first is None:  # (installed without its configs, or another primary folder)
        return
    later_ones = [p for p in sources[first + 1 :] if p.resolve() != project.resolve()]
    if not later_ones:  # (no folder of one's own: nothing walked at start-up)
        return
    ours = sorted(p.relative_to(project) for p in project.rglob("*.yaml"))
    for later in later_ones:
        for relative in ours:  # (the project's few files, not a walk of the user's folder)
            mine = later / relative
            if mine.is_file() and not mine.samefile(project / relative):
                raise ConfigError(
                    f"{mine} has the group and name of this project's {project / relative}, "
                    f"which Hydra finds first: yours would never be used. Give it a name of "
                    f"its own (e.g. {relative.parent / 'mine.yaml'})"
                )


def run(
    cfg: DictConfig, run_dir: str | Path | None = None, callbacks: Sequence[Callback] = ()
) -> dict[str, Any]:
    """Train as ``cfg`` says and return the final metrics (also written to metrics.json).

    With ``trainer.resume`` the run continues from a checkpoint, in the run dir that holds it.
    A stop signal ends it after the current step with a checkpoint, ``metrics.json`` saying
    ``interrupted`` and :class:`Interrupted` (exit status 128 + the signal's number).

    The process-wide settings ``trainer.deterministic`` sets (deterministic algorithms,
    cuDNN's benchmark, ``CUBLAS_WORKSPACE_CONFIG``) are the process's own again when it
    returns or raises: a notebook's own choice outlived a run (a probe's finding).

    Args:
        cfg: the composed config (``configs/train.yaml`` plus overrides).
        run_dir: where the run writes; defaults to Hydra's output dir of the current job.
        callbacks: extra callbacks for the Trainer.
    """
    with _process_settings_kept():
        return _run(cfg, run_dir, callbacks)


@contextlib.contextmanager
def _process_settings_kept() -> Iterator[None]:
    """Put back what :func:`seed_everything` changes process-wide."""
    deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    benchmark = torch.backends.cudnn.benchmark
    workspace = os.environ.get("CUBLAS_WORKSPACE_CONFIG")
    try:
        yield
    finally:
        if workspace is None:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
        else:
            os.environ["CUBLAS_WORKSPACE_CONFIG"] = workspace
        torch.backends.cudnn.benchmark = benchmark
        # (only on a change: the call imports torch._dynamo, 2 s of a small CPU's start-up)
        if (
            torch.are_deterministic_algorithms_enabled(),
            torch.is_deterministic_algorithms_warn_only_enabled(),
        ) != (deterministic, warn_only):
            torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)


def _override(key: str, value: str) -> str:
    """``key=value`` as a shell gives it to Hydra: where the value holds what Hydra's override
    grammar reads (``=``, ``,``, brackets: a folder named by ``hydra.job.override_dirname``;
    a letter outside ASCII), quoted for Hydra (its quotes escaped, and its backslashes where
    one precedes a quote or ends it: the grammar reads no other escape), then for the shell
    (which would take the inner quotes away)."""
    if re.fullmatch(r"[A-Za-z0-9_./:@+-]*", value):
        return f"{key}={value}"
    escaped = re.sub(r"(\\+)(?='|$)", lambda m: m.group(1) * 2, value).replace("'", "\\'")
    return shlex.quote(f"{key}='{escaped}'")


def _searched(search_dir: str) -> str:
    """A search dir as given, and the folder it is from here where it is relative (a
    relative one follows the folder a run is launched from: a probe launched elsewhere
    missed that it had looked in another ``outputs``)."""
    path = Path(search_dir)
    return search_dir if path.is_absolute() else f"{search_dir} ({path.resolve()})"


def _run(
    cfg: DictConfig, run_dir: str | Path | None, callbacks: Sequence[Callback]
) -> dict[str, Any]:
    start = time.perf_counter()
    before = [0.0]  # a resumed run's wall time until its checkpoint (its earlier processes)

    def wall_s() -> float:
        """The run's wall time: this process's, plus its earlier processes' until the
        checkpoint it resumed from (the time after that checkpoint was redone)."""
        return before[0] + time.perf_counter() - start

    if run_dir is None:
        from hydra.core.hydra_config import HydraConfig

        if not HydraConfig.initialized():  # (Hydra's own "HydraConfig was not set": a probe)
            raise ConfigError(
                "run(cfg): no run_dir, and no Hydra job to take its output dir from (called "
                "outside @hydra.main, e.g. with a config from hydra.compose): pass "
                "run_dir=<a folder>"
            )
        run_dir = HydraConfig.get().runtime.output_dir
    run_dir = Path(run_dir)
    ran_as = _job_identity(run_dir)  # (at the start: a sweep started meanwhile is not its)
    check_writable(run_dir)
    _refuse_a_sweeps_folder(run_dir)
    main = True  # (read in the try below: an environment torchrun did not set is recorded)
    trainer: Trainer | None = None
    resume_path = None
    taken = False  # run_dir's outputs are this run's: an earlier run's set aside, or its own
    deferred = _DeferredSignals()  # (from a failure until it is recorded)
    stops: StopOnSignals | None = None  # (the trainer's stop handlers, once added)
    #: a job continuing in another run dir (a resumed checkpoint's) marks the metrics it
    #: writes there with its own folder, which its pointer names (:data:`CONTINUED`)
    continued: dict[str, str] = {}
    try:
        main = distributed.from_env().is_main
        refuse_repeated_choices()
        refuse_shadowed_configs()
        typed = validate(cfg)  # every config error surfaces here, before anything is built
        tc = typed.trainer
        resolved = cast(dict[str, Any], OmegaConf.to_container(cfg, resolve=True))
        config = identity_config(cfg, resolved)
        run_id = tc.run_id or derive_run_id(config)  # type: ignore[arg-type]
        # (before 2026-12-05 a value naming the job's folder was part of a run's identity
        # resolved: such a run, with a fixed hydra.run.dir, is found and resumed under its id)
        legacy_id = derive_run_id(resolved)
        resume_state = None
        if not tc.resume and main and submitit_requeue() is not None:
            log.warning(
                "this job runs under submitit, which requeues it at its time limit or a "
                "preemption (once checkpointed): without trainer.resume=auto the requeued job "
                "starts the run afresh"
            )
        if tc.resume:
            # (the legacy id's checkpoints only where the run's own id has none in the same
            # place: the run folder first, then anywhere)
            ids = (run_id,) if tc.run_id or legacy_id == run_id else (run_id, legacy_id)
            own = _rank0_folder(run_dir, tc) if tc.resume == "auto" else run_dir
            resume_path, resume_state, refused, marked = select_resume(
                tc.resume, Path(tc.checkpoint.search_dir), ids, own=own
            )
            if marked == legacy_id != run_id:
                run_id = legacy_id
            for note in refused if main else ():  # (one line per run, not per rank)
                log.warning("resume: skipped %s", note)
            if main and tc.resume == "auto" and resume_path and resume_state is not None:
                _say_later_elsewhere(resume_path, int(resume_state["step"]),
                                     Path(tc.checkpoint.search_dir), ids, run_dir)  # fmt: skip
            if resume_state is None:
                if main:  # (one line per run, not one per rank)
                    which = (run_id if len(ids) == 1
                             else f"{ids[0]} (or, as before 2026-12-05, {ids[1]})")  # fmt: skip
                    none = (
                        f"resume=auto: no usable checkpoint of run {which} under "
                        f"{_searched(tc.checkpoint.search_dir)}; starting from scratch"
                    )
                    near = None
                    if not in_multirun():  # (a sweep's jobs differ in what it sweeps)
                        with contextlib.suppress(Exception):  # (a hint never stops a start)
                            near = continuable(Path(tc.checkpoint.search_dir), config, ids,
                                               distributed.from_env().size, own)  # fmt: skip
                    if near is None:
                        log.info(none)
                    else:  # (a run stopped, then started again to train longer: its id is
                        # another, and it started over without a word, a walkthrough's)
                        path, step, diffs = near
                        log.warning(
                            "%s. %s (step %d) is of a run that differs from this one only in "
                            "what a resumed run may change (%s): %s continues it with this "
                            "run's values, in that run's folder", none, path, step,
                            "; ".join(diffs[:6]) + (" …" if len(diffs) > 6 else ""),
                            _override("trainer.resume", str(path)),
                        )  # fmt: skip
                search = Path(tc.checkpoint.search_dir).resolve()
                outside = not run_dir.resolve().is_relative_to(search)
                if main and outside:  # (its checkpoints would be
                    log.warning(  # found by no later resume=auto elsewhere, a probe's finding)
                        "resume=auto: this run's folder %s is outside trainer.checkpoint."
                        "search_dir=%s, where resume=auto looks: only a start in this same "
                        "folder finds its checkpoints; set trainer.checkpoint.search_dir to "
                        "a folder above your runs' to resume them from any",
                        run_dir, tc.checkpoint.search_dir,
                    )  # fmt: skip
            else:
                saved_world = len(resume_state.get("tally_ranks") or [None])
                world_size = distributed.from_env().size
                saved = resume_state.get("config")
                changes = resume_changes(saved, config, saved_world, world_size)
                if changes and not resume_changes(saved, resolved, saved_world, world_size):
                    changes = []  # (a checkpoint from before 2026-12-05: its values resolved)
                shared_id = (
                    f". trainer.run_id={tc.run_id!r} is given by hand: resume=auto takes the "
                    "newest checkpoint of every run that gives it, whatever its config; if "
                    "another run uses this id, give each its own"
                    if tc.run_id and tc.resume == "auto"
                    else ""
                )
                if changes:
                    raise ConfigError(
                        f"resume: {resume_path} was trained with another config; this run "
                        f"changes {'; '.join(changes[:6])}{' …' if len(changes) > 6 else ''}. A "
                        "resumed run continues the checkpoint's exactly (its optimizer state "
                        "keeps the old learning rate, its records name the old values); what "
                        "may change is how long it trains, the device, logging.*, "
                        "instrument.* and how data is loaded. Keep the checkpoint's values, or "
                        "start a new run (another trainer.run_id, or no trainer.resume)" + shared_id
                    )
        # built without a logger: a checkpoint that does not fit must not touch the run it
        # came from (its metrics.json, its events)
        trainable = resume_state.get("trainable") if resume_state is not None else None
        length = resume_state.get("schedule_length") if resume_state is not None else None
        trainer = build_trainer(
            cfg, run_dir, callbacks, with_logger=False, typed=typed, trainable=trainable,
            schedule_length=length,
        )  # fmt: skip
        if resume_state is not None and main:
            _warn_worker_draws(resume_state.get("config"), resolved, trainer)
            _warn_world_draws(resume_state, trainer)
        metric_names = (*trainer.criterion.metrics, "train/loss")
        monitor = typed.monitor or trainer.criterion.monitor
        if monitor not in metric_names:
            raise ConfigError(
                f"monitor: got {monitor!r}, but this run reports {', '.join(metric_names)} "
                f"(loss: {type(trainer.criterion).__name__}, task {trainer.criterion.task})"
            )
        check_direction(monitor)  # (an optimizing sweeper's direction agrees with it)
        if main:
            _refuse_another_jobs_folder(run_dir)
        trainer.monitor = monitor
        check_plateau(trainer.scheduler, monitor)
        purge_step = None
        if resume_state is not None:
            assert resume_path is not None
            try:
                trainer.load_state_dict(resume_state)
            except (RuntimeError, ValueError, KeyError, TypeError) as e:
                if any(n.endswith(".load_state_dict)") for n in getattr(e, "__notes__", ())):
                    raise  # (a component's own load_state_dict: its error, named; it was
                    # said as a checkpoint that does not fit the run, a probe's)
                raise ValueError(f"checkpoint {resume_path} does not fit this run: {e}") from e
            if trainer.total_steps < trainer.global_step:  # (it "completed" at the step it
                # was at, validated it again and warned of a schedule stopping short: a probe's)
                raise ConfigError(
                    f"resume: {resume_path} is at step {trainer.global_step}, past this run's "
                    f"last step, {trainer.total_steps} (trainer.max_steps / "
                    "trainer.max_epochs): nothing would train; resume with the checkpoint's "
                    "length or more, or start a new run"
                )
            _check_schedule_length(
                trainer, resume_path, cfg.scheduler, resume_state.get("schedule_length")
            )
            if "schedule_length" not in resume_state:  # (a checkpoint from before 2026-12-05:
                # the length its scheduler state kept, not this run's, goes on)
                trainer.schedule_length = {
                    k: n for k in run_length_keys(cfg.scheduler)
                    if isinstance(n := getattr(trainer.scheduler, k, None), int)
                }  # fmt: skip
            world = distributed.from_env()
            set_rng_state(rank_rng_state(resume_state, world.rank, world.size))
            home = _home_of(resume_path)
            # what would refuse the run before its first step, before its files are moved (a
            # resume refused for disk space, or for a callback's state, had set the later
            # checkpoints aside, dropped their events and recorded its failure over the
            # completed run's metrics.json: a probe's)
            trainer.check_states()
            if main:
                check_free_space(trainer, (home or run_dir) / "checkpoints",
                                 tc.checkpoint.keep_last)  # fmt: skip
            if home is not None:  # continue in the run's own dir
                if main and home.resolve() != run_dir.resolve():  # where this job went (a
                    # sweep's summary and report follow it; its own earlier outputs, of an
                    # attempt refused or failed in this folder, are set aside)
                    _set_aside_previous(run_dir)
                    here = str(run_dir.resolve())
                    write_json(run_dir / CONTINUED, {"run_dir": str(home.resolve()),
                                                     "job_dir": here})  # fmt: skip
                    continued = {"job_dir": here}  # (in the metrics it writes there)
                    started_by = _started_by(home)  # (the sweep whose job the run is: its
                    if started_by is not None:  # report lists the job as continued)
                        continued["run_sweep_id"] = started_by
                    _point_log_to(home, here, int(resume_state["step"]))
                elif main:  # continued here: a pointer of an earlier attempt is stale
                    (run_dir / CONTINUED).unlink(missing_ok=True)
                run_dir = home
                if resume_path.name == "last.pt":  # (it goes, a completed run's: the run
                    # resumes its step file, the same bytes, as a completed run writes both)
                    own = step_path(resume_path.parent, int(resume_state["step"]))
                    if main and not own.exists():  # (that file deleted: last.pt becomes it)
                        os.replace(resume_path, own)
                    resume_path = own
                if main:  # one process moves the files
                    set_aside_later(resume_path.parent, int(resume_state["step"]))
            if main and resume_state.get("run_id") not in (None, run_id):
                log.warning(
                    "resuming run %s as run %s (a run's id is trainer.run_id where given, "
                    "else a hash of its config, how long it trains included): trainer."
                    "resume=auto finds it as %s from now on; give trainer.run_id=%s to keep "
                    "the checkpoint's", resume_state["run_id"], run_id, run_id,
                    resume_state["run_id"],
                )  # fmt: skip
            purge_step = int(resume_state["step"]) + 1  # its later events are replaced
            before[0] = float(resume_state.get("wall_s", 0.0))
            if main:  # (one line per run, not one per rank)
                log.info(
                    "resuming run %s from %s (step %d); it continues in %s",
                    resume_state["run_id"], resume_path, resume_state["step"],
                    _display(run_dir),
                )  # fmt: skip
        if resume_state is None:  # (before an earlier run in the folder is set aside: a
            # refused run left it in previous/1, superseded, a review's; a resumed run's are
            # checked before its files move)
            trainer.check_states()
            if main:
                check_free_space(trainer, run_dir / "checkpoints", tc.checkpoint.keep_last)
        if main and (resume_state is None or _home_of(resume_path) is None):
            _set_aside_previous(run_dir)
        taken = True
        hparams = hydra_hparams(cfg)  # (the event folder is named after the overridden ones)
        if main:  # data-parallel: rank 0 alone writes events, checkpoints and metrics.json
            listed = (monitor, *[m for m in metric_names if m != monitor])
            # (the nth run in its folder: the earlier ones are in previous/<n> below it; a
            # resumed run keeps the number it recorded)
            kept = run_number(run_dir) if resume_state is not None else None
            nth = kept if kept is not None else next_run_number(run_dir)
            keep_run_number(run_dir, nth)
            start_records = start_summaries(hparams, listed, run_name(run_dir, hparams, nth))
            events = event_dir(run_dir, overrides_text(hparams, ","))
            session = "fresh" if resume_state is None else "none"  # (HPARAMS' session start)
            if resume_state is not None and events.is_dir():  # its own end status comes later
                try:
                    drop_end_status(events)
                except Exception as e:  # noqa: BLE001 (HPARAMS' status: never stops a resume)
                    log.warning("HPARAMS: the earlier end status in %s stays (%s: %s)",
                                _display(events), type(e).__name__, e)  # fmt: skip
                at = int(resume_state["step"])  # (the failed or killed attempt's steps past
                try:  # the checkpoint: written again, TensorBoard showed both)
                    drop_events_from(events, at + 1)
                except Exception as e:  # noqa: BLE001 (never stops a resume)
                    log.warning("TensorBoard: the earlier attempt's events past step %d in %s "
                                "stay (%s: %s)", at, _display(events), type(e).__name__,
                                e)  # fmt: skip
                try:  # (a resume with other values showed the first process's: a probe)
                    session = start_state(events, start_records)
                except Exception as e:  # noqa: BLE001 (as above)
                    session = "same"
                    log.warning("HPARAMS: the earlier values in %s stay (%s: %s)",
                                _display(events), type(e).__name__, e)  # fmt: skip
            trainer.logger = TensorBoardLogger(events, purge_step=purge_step)
            if session != "same":  # this run's values, before it can fail
                for summary in start_records:
                    trainer.logger.add_summary(summary, 0)
            if session in ("differs", "none") and resume_state is not None:  # on disk
                # before the earlier ones go (with none, an experiment record left over)
                trainer.logger.flush()
                try:
                    replace_start(events, start_records, keep=trainer.logger.file.path)
                except Exception as e:  # noqa: BLE001 (as above: both stay, the first shows)
                    log.warning("HPARAMS: the earlier values in %s stay (%s: %s)",
                                _display(events), type(e).__name__, e)  # fmt: skip
        directory = run_dir / "checkpoints"
        writer = CheckpointWriter(
            trainer,
            directory,
            run_id,
            config,
            tc.checkpoint.keep_last,  # type: ignore[arg-type]
            main=main,
            clock=wall_s,
        )
        checkpoints = PeriodicCheckpoints(writer, tc.checkpoint.every_n_steps)
        # every rank checkpoints together (rank 0 writes the files) and stops on a signal (at
        # the same rest point)
        stops = StopOnSignals(writer)
        stops.on_failure = lambda: deferred.hold(stops)
        trainer.add_callbacks(checkpoints, stops)
        if resume_state is not None:
            writer.last = resume_path
        if main:
            write_run_marker(directory, run_id, run_dir)
        completed = interrupted = False
        try:  # checkpoints (periodic, at a stop, final) and stop signals: the callbacks above
            try:
                metrics = trainer.fit()
            except RuntimeError as e:  # DDP's own error names its constructor's argument
                told = bool(OmegaConf.select(cfg, "trainer.find_unused_parameters"))
                if trainer.world.distributed and not told and "not used in producing" in str(e):
                    raise RuntimeError(
                        "data-parallel: a parameter of the model got no gradient in a step (a "
                        "layer the forward did not use: an auxiliary head, a branch not taken), "
                        "which DDP requires unless told; set trainer.find_unused_parameters="
                        f"true (torch's error: {str(e).splitlines()[0]})"
                    ) from e
                raise
            completed = trainer.stopped_by is None
        except KeyboardInterrupt:  # (a second Ctrl-C, before the first's rest point: the
            interrupted = True  # run is interrupted, as metrics.json says, not failed, a
            deferred.hold(stops)  # probe's)
            raise
        except BaseException:
            deferred.hold(stops)  # (the events and metrics.json written before a stop signal)
            raise
        finally:
            if trainer.logger is not None:
                # an interrupted run goes on later: no end status
                if completed or (trainer.stopped_by is None and not interrupted):
                    trainer.logger.add_summary(end_summary(completed), trainer.global_step)
                trainer.logger.close()  # flushes the events, also when training failed
        if trainer.stopped_by is not None:
            if main:
                name = signal.Signals(trainer.stopped_by).name
                _write_metrics(run_dir, continued, ran_as, {
                    "status": "interrupted", "signal": name, "step": trainer.global_step,
                    "epoch": trainer.epoch, "checkpoint": _absolute(writer.last), "run_id": run_id,
                    "wall_s": wall_s(), **continued,
                })  # fmt: skip
                log.warning(
                    "stopped by %s at step %d; checkpoint %s; continue with trainer.resume=auto",
                    name, trainer.global_step, _display(writer.last),
                )  # fmt: skip
            stopped = Interrupted(128 + trainer.stopped_by)
            stopped.requeue = stops.requeue
            raise stopped
        last = checkpoints.final
    except Interrupted as stopped:
        deferred.stop()  # (none held: a stop is recorded by the trainer's own handlers)
        if stopped.requeue is not None:  # (checkpointed, metrics.json written: submitit's
            # handler requeues the job and exits, or raises where it does not requeue; on a
            # rank other than the first it returns: the rank ends as stopped, a sweep's task
            # without an exit status of its own, trainer.sweep._run_job)
            log.warning("handing the job to submitit, which requeues it (trainer.resume=auto "
                        "continues the run there)")  # fmt: skip
            try:  # (the first task: it requeues and exits; another returns)
                stopped.requeue()
            except Exception as e:  # (submitit's way to end a job it does not requeue: the
                # job ends interrupted, as any stopped run, not failed with submitit's error)
                log.warning("submitit did not requeue the job (%s); the run is interrupted, "
                            "checkpointed: trainer.resume=auto continues it", e)  # fmt: skip
        raise
    except BaseException as e:
        deferred.hold(stops)  # (a failure before fit: no handler of the trainer's yet)
        try:
            _record_failure(e, trainer, continued, run_dir, ran_as, main, taken, wall_s())
        finally:
            deferred.stop(e)  # (a stop signal taken meanwhile: raised again now)
        raise
    result: dict[str, Any] = {
        "train/loss": metrics["train/loss"],
        **{k: metrics[k] for k in trainer.criterion.metrics},
        "monitor": monitor,
        "step": trainer.global_step,
        "epoch": trainer.epoch,
        "wall_s": wall_s(),
        "status": "completed",
        "run_id": run_id,
        "checkpoint": _absolute(last),
        # the loss it trained, resolved (.hydra/config.yaml keeps ${...} as written): the
        # report refuses to rank val/loss or train/loss across different ones
        "loss": config.get("loss"),
        **continued,
    }
    if writer.failures:
        result["checkpoint_failures"] = writer.failures
    if not main:
        return result
    _write_metrics(run_dir, continued, ran_as, result)
    folder = _display(run_dir)
    shown_metrics = "  ".join(
        f"{k} {shown(result[k])}" for k in (*trainer.criterion.metrics[::-1], "train/loss")
    )
    job = trainer.progress_options.label  # (a sweep's job number: its lines say whose)
    log.info(
        "%sdone: %s  (%d epoch%s, %d step%s, %.1f s)", job, shown_metrics,
        result["epoch"], "" if result["epoch"] == 1 else "s",
        result["step"], "" if result["step"] == 1 else "s", result["wall_s"],
    )  # fmt: skip
    log.info("%srun dir: %s", job, folder)
    log.info("%sview it: tensorboard --logdir %s", job, folder)
    return result


class _DeferredSignals:
    """Stop signals (SIGTERM, SIGINT, SIGUSR1) held from a failure until its record is
    written, then raised again with the handlers that were in place: torchrun sends SIGTERM to
    every other rank the moment one fails, and rank 0, recording the failure its collective
    got, was killed inside it (the trainer's stop handlers are put back when ``fit`` fails):
    no ``metrics.json``, or a temporary file never renamed (a probe's, 1 run in 3). A Python
    handler that notes the signal, not a blocked mask: a signal with torch's or the default
    action may be delivered to any thread that does not block it."""

    def __init__(self) -> None:
        self.noted: list[int] = []
        self.before: dict[int, Any] = {}

    def hold(self, stops: StopOnSignals | None) -> None:
        """Held from a failure on: the trainer's stop handlers put back first (idempotent: a
        second Ctrl-C in an ``on_exception`` hook skipped theirs, and they stayed installed
        after the run, a review's), then the signals they took during the fit noted, to be
        raised again once the failure is recorded (one taken while a failing ``on_fit_end``
        ran, or the graceful stop's own, was forgotten, a review's), and every signal they
        handled held (submitit's too)."""
        if stops is None:
            self.start(STOP_SIGNALS)
            return
        stops.restore()
        self.start(stops.installed or STOP_SIGNALS)
        self.noted.extend(stops.received)

    def start(self, signals: Sequence[int]) -> None:
        if self.before or threading.current_thread() is not threading.main_thread():
            return
        for number in dict.fromkeys(signals):
            self.before[number] = signal.getsignal(number)
            signal.signal(number, lambda n, _frame: self.noted.append(n))

    def stop(self, error: BaseException | None = None) -> None:
        """The handlers put back, and the signals noted raised again (the run's ``error``
        logged first, with its traceback: a signal's default action ends the process before
        anyone else prints it, a review's)."""
        for number, handler in self.before.items():  # (None: set outside Python, not kept)
            signal.signal(number, handler if handler is not None else signal.SIG_DFL)
        self.before = {}
        noted, self.noted = list(dict.fromkeys(self.noted)), []
        if noted and error is not None:
            log.error("the run failed: %s: %s", type(error).__name__, error, exc_info=error)
        for number in noted:
            log.warning("%s, taken while the run failed, is raised again now that the failure "
                        "is recorded", signal.Signals(number).name)  # fmt: skip
            signal.raise_signal(number)


def _record_failure(
    e: BaseException,
    trainer: Trainer | None,
    continued: dict[str, str],
    run_dir: Path,
    ran_as: dict[str, Any],
    main: bool,
    taken: bool,
    wall: float,
) -> None:
    """A failed run's ``metrics.json``: its status, error and how far it got."""
    failed: dict[str, Any] = {
        "status": "interrupted" if isinstance(e, KeyboardInterrupt) else "failed",
        "error": f"{type(e).__name__}: {e}" + "".join(f" {n}" for n in getattr(e, "__notes__", ())),
        "wall_s": wall,
    }
    if trainer is not None:  # how far it got
        failed.update(step=trainer.global_step, epoch=trainer.epoch)
    failed.update(continued)
    if not main:
        return
    with contextlib.suppress(OSError):  # a full disk must not hide the first error
        if taken or not any((run_dir / n).exists() for n in RUN_OUTPUTS):
            _write_metrics(run_dir, continued, ran_as, failed)
        else:  # refused before it took the folder over: an earlier run's outputs there (the
            # one a resume was to continue, or another) stay as they were
            log.info("%s holds an earlier run's outputs: left as they were (this failure is "
                     "not recorded there)", _display(run_dir))  # fmt: skip
            e.add_note(f"(not recorded in {_display(run_dir)}, which holds an earlier run's "
                       "outputs, left as they were)")  # fmt: skip


def _write_metrics(
    run_dir: Path, continued: dict[str, str], ran_as: dict[str, Any], metrics: dict[str, Any]
) -> None:
    """``metrics.json`` in the run dir; a job that continued a run of another dir writes it in
    its own folder too (``continued["job_dir"]``): the run dir's holds the run's latest, which
    a later continuation rewrites, and the job's stays its own result."""
    metrics = {**metrics, **ran_as}
    write_json(run_dir / "metrics.json", metrics)
    if continued:
        write_json(Path(continued["job_dir"]) / "metrics.json", metrics)


def _job_identity(run_dir: Path) -> dict[str, Any]:
    """What ``metrics.json`` records of the job it is: its command-line overrides as Hydra
    wrote them (``.hydra/overrides.yaml``) and the id of the sweep it is of
    (:func:`trainer.sweep.job_sweep_id`); nothing for a run started from Python. A job refused
    in a folder holding an earlier run's outputs leaves them, and Hydra's ``.hydra/`` is
    already the refused job's: a report took the earlier result for the refused job's
    (``completed``, best, with the other overrides, a probe's); and an earlier sweep's job
    folders in a reused sweep dir were counted as the new sweep's."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return {}
    from trainer.sweep import job_sweep_id

    return {"overrides": task_overrides(),
            "sweep_id": job_sweep_id(run_dir)}  # fmt: skip


def _refuse_a_sweeps_folder(run_dir: Path) -> None:
    """A single run given a sweep's folder (``hydra.run.dir=<a sweep dir>``): its outputs
    made the folder a run dir, and the sweep's report listed that run alone, its jobs left
    out unsaid (a probe's). Refused before anything is written there."""
    from trainer.report import SWEEP_FILE, current_sweep_id
    from trainer.sweep import in_multirun

    if in_multirun() or not any((run_dir / n).is_file() for n in ("multirun.yaml", SWEEP_FILE)):
        return
    try:  # (a job of that sweep run in its folder, subdir=., continued by hand: its own)
        recorded = json.loads((run_dir / "metrics.json").read_text()).get("sweep_id")
    except (OSError, UnicodeDecodeError, ValueError, AttributeError):
        recorded = None
    if isinstance(recorded, str) and recorded == current_sweep_id(run_dir):
        return
    raise ConfigError(
        f"hydra.run.dir: {_display(run_dir)} is a sweep's folder (it holds multirun.yaml or "
        f"{SWEEP_FILE}): a run's outputs there would hide the sweep's jobs from its report; "
        "give the run a folder of its own (a job of that sweep is continued from its job "
        "folder, <sweep dir>/<n>)"
    )


def _refuse_another_jobs_folder(run_dir: Path) -> None:
    """In a multirun, refuse a job whose folder holds the result of another job of the same
    sweep (another point's overrides): ``hydra.sweep.subdir`` gives both one folder
    (``lr${optimizer.lr}`` over ``optimizer.lr=... seed=0,1``). The job set the other's
    outputs aside, unsaid but for a warning, and the sweep's report, which reads each
    folder's result, listed that job as never started and ranked without it (a probe's).
    Before anything moves: the other job's outputs stay where they are."""
    from hydra.core.hydra_config import HydraConfig

    from trainer.report import _job
    from trainer.sweep import in_multirun, job_sweep_id, subdir_as_written

    if not in_multirun():
        return
    try:
        there = json.loads((run_dir / "metrics.json").read_text())
        ran = there.get("overrides")
    except (OSError, UnicodeDecodeError, ValueError, AttributeError):
        return
    hc = HydraConfig.get()
    mine = task_overrides()
    sweep = job_sweep_id(run_dir)
    if sweep is None or there.get("sweep_id") != sweep or not isinstance(ran, list):
        return
    if _job([str(o) for o in ran]) == _job(mine):
        return
    raise ConfigError(
        f"hydra.sweep.subdir: job {hc.job.num}'s folder {_display(run_dir)} holds the result "
        f"of another job of this sweep ({' '.join(map(str, ran))}): the subdir "
        f"({subdir_as_written(hc)}) gives both one folder, and the other job's outputs would "
        "be set aside, its result no longer the folder's. Make it tell the jobs apart: "
        "${hydra.job.num} (the default), or every swept key "
        "(${hydra.job.override_dirname})"
    )


def _started_by(home: Path) -> str | None:
    """The id of the sweep whose job started the run in ``home``, as its ``metrics.json``
    records it (``run_sweep_id`` where another job continued it before, else ``sweep_id``);
    None where none is recorded (a run of its own, or one killed before it wrote a result)."""
    try:
        metrics = json.loads((home / "metrics.json").read_text())
        recorded = metrics.get("run_sweep_id", metrics.get("sweep_id"))
    except (OSError, UnicodeDecodeError, ValueError, AttributeError):
        return None
    return recorded if isinstance(recorded, str) else None


def _home_of(checkpoint: Path | None) -> Path | None:
    """The run dir a checkpoint was written in (``<run dir>/checkpoints/step_*.pt``), where a
    run resumed from it continues; None for a checkpoint kept elsewhere."""
    if checkpoint is None or checkpoint.parent.name != "checkpoints":
        return None
    return checkpoint.parent.parent


def _rank0_folder(run_dir: Path, tc: Any) -> Path:
    """The run folder whose checkpoints ``resume=auto`` takes first: this one, and rank 0's
    data-parallel (it alone writes checkpoints, and every rank must resume the same one:
    with a folder per rank, each took its own folder's first, and the ranks resumed different
    checkpoints, a review's; the process group is joined here for it)."""
    world = distributed.from_env()
    if not world.distributed:
        return run_dir
    distributed.setup(world, resolve_device(tc.device))
    return Path(str(distributed.all_gather_objects(str(run_dir))[0]))


def _say_later_elsewhere(chosen: Path, step: int, search_dir: Path, ids: tuple[str, ...],
                         run_dir: Path) -> None:  # fmt: skip
    """``resume=auto`` continued this folder's own checkpoint: say so where another folder
    holds a later one of the same run id, which a path resumes from."""
    own = (run_dir / "checkpoints").resolve()
    if chosen.parent.resolve() != own:
        return
    for path in find_checkpoints(search_dir, ids):
        later = step_of(path)
        if path.parent.resolve() != own and later is not None and later > step:
            log.warning(
                "resume=auto continues this folder's own checkpoint %s (step %d); another "
                "folder holds a later one of run %s, %s (step %d, not loaded or checked "
                "here): give trainer.resume=<its path> to continue that one instead",
                _display(chosen), step, marked_id(path), _display(path), later,
            )  # fmt: skip
            return


def _absolute(path: Path | None) -> str:
    """A checkpoint's path as ``metrics.json`` names it: absolute (a relative one, of a run
    folder given relative to the working directory, named another file from elsewhere, and
    was not followed when the run was set aside: a review's)."""
    return str(path) if path is None else os.path.abspath(path)


def _set_aside_previous(run_dir: Path) -> None:
    """:func:`set_aside_previous`, saying where the earlier run went."""
    moved = set_aside_previous(run_dir)
    if moved is not None:
        log.warning(
            "%s held an earlier run's outputs; they are set aside in %s (TensorBoard lists "
            "them as a run of their own)", _display(run_dir), _display(moved),
        )  # fmt: skip


def _sweep_progress() -> dict[str, Any]:
    """In a multirun: label lines with the job number; no bars when jobs run in parallel
    (a launcher other than Hydra's basic one), where they would draw over each other."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return {}
    hc = HydraConfig.get()
    basic = str(hc.launcher.get("_target_", "")).endswith(".BasicLauncher")
    return {"bar": basic, "label": f"job {hc.job.num}: "}


def build_loss(node: DictConfig) -> Loss:
    """The loss component from ``cfg.loss`` (its ``mode`` is the trainer's, not passed on)."""
    spec = OmegaConf.to_container(node, resolve=True)
    assert isinstance(spec, dict)
    spec.pop("mode", None)
    return as_loss(build("loss", spec))


def build_user_callbacks(cfg: DictConfig) -> list[Callback]:
    """The ``callbacks`` group's entries, each ``_target_`` + keys, in the order given."""
    out = []
    for name, node in (cfg.get("callbacks") or {}).items():
        cb = build(f"callbacks.{name}", node)
        if not isinstance(cb, Callback):
            raise ConfigError(
                f"callbacks.{name}._target_: {node._target_} built a {type(cb).__name__}, not a "
                "trainer.loop.Callback (subclass it and override the hooks you need)"
            )
        check_callback(cb, f"callbacks.{name}")  # (refused here: named by its key)
        out.append(cb)
    return out


#: devices whose fused optimizer kernels are taken by default (``optimizer.fused: null``)
FUSED_BY_DEFAULT = ("cuda",)


def build_optimizer(node: DictConfig, params: Any, device: torch.device) -> torch.optim.Optimizer:
    """The optimizer from its config node (a partial ``_target_``; the parameters come here).

    ``fused: null``, the built-in schemas' default, takes torch's fused implementation on a CUDA
    device (one kernel for every parameter, where torch's own default is one per tensor): there
    the non-finite guard defers its check (``instrument.nonfinite.sync=auto``), and a fused
    step skips a bad update itself, from the flag on the device (``found_inf``, as
    ``GradScaler`` hands it over), where any other step needs a copy of the parameters and
    the optimizer state put back with ``torch.where`` (trainer/update.py). Elsewhere, and for
    an optimizer whose config has no ``fused`` key, torch's default; ``fused: false`` opts out.
    """
    factory = instantiate(node, _convert_="all")
    keywords = getattr(factory, "keywords", {})
    params = list(params)
    # (torch's fused kernels take floating-point tensors only: a complex parameter would fail
    # at the first step, so such a model keeps torch's default; and torch refuses fused with
    # foreach or differentiable, which a user may have asked for with +optimizer.<key>=true)
    floating = all(isinstance(p, torch.Tensor) and p.is_floating_point() for p in params)
    if (
        device.type in FUSED_BY_DEFAULT
        and "fused" in keywords
        and keywords["fused"] is None
        and floating
        and not keywords.get("foreach")
        and not keywords.get("differentiable")
    ):
        return factory(params, fused=True)
    return factory(params)


def set_trainable(model: nn.Module, saved: dict[str, bool]) -> None:
    """``requires_grad`` of each parameter as a checkpoint had it (a layer a callback unfroze
    mid-run, which it will not do again on a resume past that step). Before a data-parallel
    wrap: DistributedDataParallel takes the trainable set once, and a one-process checkpoint
    taken after an unfreeze was refused on two. A checkpoint of another model's parameters
    is left to ``Trainer.load_state_dict``, which names the mismatch."""
    named = dict(model.named_parameters())
    if sorted(saved) != sorted(named):
        return
    changed = [n for n, p in named.items() if p.requires_grad != bool(saved[n])]
    for n in changed:
        named[n].requires_grad_(bool(saved[n]))
    if changed:
        log.info(
            "requires_grad as the checkpoint had it: %s%s",
            ", ".join(f"{n}={bool(saved[n])}" for n in changed[:5]),
            " …" if len(changed) > 5 else "",
        )  # fmt: skip


def batchnorm_across_ranks(
    model: nn.Module, distributed: bool, sync: bool, device: torch.device
) -> nn.Module:
    """Data-parallel, a BatchNorm in training mode normalizes each rank's part of the batch
    (torch's DDP): the run is then not one process on the global batch (its 2 x B differed
    from 1 x 2B by 1e-2 in the weights, silently). ``sync`` converts them to SyncBatchNorm
    (the global batch's statistics; torch runs it on CUDA only, and a model without one has
    nothing to convert); else the trainer names them as fit starts
    (:func:`trainer.distributed.warn_batch_norms`). A model's own SyncBatchNorm off CUDA is
    refused naming it (torch's DDP raised its own error, after a warning that suggested
    ``sync_batchnorm``: a probe's finding)."""
    if not distributed:
        return model
    own = [n or type(model).__name__ for n, m in model.named_modules()
           if isinstance(m, nn.SyncBatchNorm)]  # fmt: skip
    if own and device.type != "cuda":
        raise ConfigError(
            f"data-parallel on {device.type}: the model's own SyncBatchNorm layers "
            f"({', '.join(own[:5])}{' …' if len(own) > 5 else ''}) run on CUDA only (torch's "
            "DDP refuses them elsewhere); build them as BatchNorm for this run (each rank "
            "then normalizes its own part of the batch) or run on CUDA"
        )
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
             and not isinstance(m, nn.SyncBatchNorm)]  # fmt: skip
    # (converted whatever their mode: a callback may put a frozen one in training mode)
    if sync and norms:
        if device.type != "cuda":
            raise ConfigError(
                f"trainer.sync_batchnorm: SyncBatchNorm runs on CUDA only (torch's DDP refuses "
                f"it on {device.type}); turn it off (each rank then normalizes its own part "
                "of the batch)"
            )
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model  # (those left normalizing per rank: named as fit starts, warn_batch_norms)


def materialize_lazy(model: nn.Module, data: DataModule) -> None:
    """Initialize a model's lazy modules (``nn.LazyLinear``, ``nn.LazyConv2d``: shapes taken
    at the first forward) by torch's dry run: one forward, without gradients, of the first
    training sample twice over as a batch of two (a batch norm normalizing with the batch's
    own statistics refuses a batch of one, a review's), every module in eval mode (a batch
    norm's running statistics are not moved by it, dropout draws nothing) and put back in
    its mode after. As the model is built, before it is moved to the run's device and before
    the optimizer is built (it takes the initialized tensors): the initial values draw from
    the generator, and in the order, a model given its sizes draws from as it is built, where
    the forward calls the lazy modules in the order they are built (a resumed run's are the
    checkpoint's). A lazy module the forward does not call in eval mode is refused, named."""
    lazy = [n for n, t in itertools.chain(model.named_parameters(), model.named_buffers())
            if nn.parameter.is_lazy(t)]  # fmt: skip
    if not lazy:
        return
    named = f"{', '.join(lazy[:3])}{' …' if len(lazy) > 3 else ''}"
    x = data.first_input
    if x is None:  # (a data module whose setup was overridden without the first sample)
        raise ContractError(
            f"model: {named} are lazy (shapes taken at the first forward) and "
            f"{type(data).__name__} gives no first training input to run the model on "
            "(data.first_input: DataModule.setup sets it)"
        )
    where = next(itertools.chain(model.parameters(), model.buffers())).device
    batch = torch.stack([x, x]).to(where)
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            model(batch)
    except Exception as e:
        refusal = dtype_refusal(e, batch, model) if isinstance(e, RuntimeError) else None
        if refusal is not None:
            raise refusal from e
        e.add_note(
            f"(the trainer's dry run, one forward of {type(data).__name__}'s first training "
            f"sample twice over as a batch of two in eval mode, initializing the lazy modules "
            f"{named}, raised it)"
        )
        raise
    finally:
        for m, training in modes.items():
            m.training = training
    left = [n for n, t in itertools.chain(model.named_parameters(), model.named_buffers())
            if nn.parameter.is_lazy(t)]  # fmt: skip
    if left:
        raise ContractError(
            f"model: {', '.join(left[:3])}{' …' if len(left) > 3 else ''} still uninitialized "
            "after the trainer's dry run, one forward in eval mode of a training batch: a lazy "
            "module the forward does not call in eval mode (one called in training only) "
            "never gets its shape there; give it its sizes (or call it in eval mode too)"
        )


def build_trainer(
    cfg: DictConfig,
    run_dir: Path,
    callbacks: Sequence[Callback] = (),
    with_logger: bool = True,
    typed: TrainConfig | None = None,
    trainable: dict[str, bool] | None = None,
    schedule_length: dict[str, int] | None = None,
) -> Trainer:
    """Validate ``cfg`` (unless ``typed``, its validated form, is given) and build data,
    model, optimizer, scheduler, logger (unless ``with_logger`` is false: ``trainer.logger``
    is then None until set) and Trainer. ``trainable``: a checkpoint's ``requires_grad`` by
    parameter name, set on the model before anything selects among its parameters (the
    regularizers, DistributedDataParallel's reducer, the Trainer). ``schedule_length``: a
    checkpoint's, the length the trainer gave its scheduler, given again (a factory's closure
    over ``T_max``, which no scheduler state keeps, is then the checkpoint run's)."""
    if typed is None:
        typed = validate(cfg)  # every config error surfaces here, before anything is built
    world = distributed.from_env()
    device = distributed.setup(world, resolve_device(typed.trainer.device))
    seed_everything(typed.seed, typed.trainer.deterministic)

    data = build("data", cfg.data)
    if not isinstance(data, DataModule):
        raise ConfigError(
            f"data._target_: {cfg.data._target_} built a {type(data).__name__}, not a "
            "trainer.data.base.DataModule (subclass it; README, 'Bring your own')"
        )
    _check_loader_keys(cfg.data, data)
    data.setup(device, typed.seed, world)
    if len(data.train_loader) == 0:
        raise ConfigError(
            f"data.batch_size: {data.batch_size} is larger than the training split "
            f"({data.train_loader.num_samples} samples) with data.drop_last=true: no batch left"
        )
    if data.val_loader.num_samples == 0:
        raise ConfigError("data: the validation split is empty; give it at least one sample")
    loss = build_loss(cfg.loss)
    first = data.first_target
    if (
        loss.has_units
        and data.out_dim_inferred
        and first is not None
        and first.ndim >= 1
        and not first.is_floating_point()
    ):  # (per-position class targets: out_dim was taken as T, the targets' length, for T
        # tokens: a tagger's head got as many outputs as its sequences were long, silently)
        raise ConfigError(
            f"data: {type(data).__name__} sets neither out_dim nor vocab_size, and its targets "
            f"are {first.dtype} sequences ({tuple(first.shape)} per sample) that "
            f"{type(loss).__name__} scores per position: set out_dim in the data module, the "
            "classes each position is scored over (a language model's vocabulary, a tagger's "
            "tags; data=tensors: data.num_classes)"
        )
    loss.check(data)
    built = build("model", cfg.model, provided=data.provides())
    if not isinstance(built, nn.Module):  # (it failed at .to(device), naming no key: a probe)
        raise ConfigError(
            f"model._target_: {cfg.model._target_} built a {type(built).__name__}, not a "
            "torch.nn.Module (a class or a factory returning one)"
        )
    if next(built.parameters(), None) is None:  # (torch's "optimizer got an empty parameter
        # list", with a traceback, named neither the model nor why: a probe's)
        raise ConfigError(
            f"model._target_: {cfg.model._target_} built a {type(built).__name__} with no "
            "parameters: nothing to train (weights are nn.Parameter attributes of the module or "
            "of its submodules; a tensor kept as a plain attribute, in a Python list, or as a "
            "buffer is not trained: nn.Parameter, nn.ModuleList, nn.ParameterList)"
        )
    materialize_lazy(built, data)  # (as built: a model given its sizes draws there)
    model: nn.Module = built.to(device)
    model = batchnorm_across_ranks(model, world.distributed, typed.trainer.sync_batchnorm, device)
    if trainable is not None:
        set_trainable(model, trainable)
    optimizer = build_optimizer(cfg.optimizer, model.parameters(), device)
    # (a factory's optimizer: its class is known once built; LBFGS from a parameter-group
    # factory failed at the first step, not refused before it, a probe's)
    check_stepping("optimizer", type(optimizer))
    tc = typed.trainer
    total_steps = planned_steps(
        len(data.train_loader), tc.accumulate_grad_batches, tc.max_epochs, tc.max_steps
    )
    if schedule_length:  # (resumed: the checkpoint run's, one value under each key)
        total_steps = next(iter(schedule_length.values()))
    scheduler = build_scheduler(cfg.scheduler, optimizer, total_steps)
    if scheduler is not None:
        check_stepping("scheduler", type(scheduler))
        _check_own_schedule_length(cfg.scheduler, scheduler, total_steps)
        _warn_rising_cosine(scheduler)
    weighting: Weighting | None = None
    if typed.loss_mode == "vector":
        weighting = build("weighting", cfg.weighting)
        prepare(weighting, loss, world, f"weighting._target_ ({cfg.weighting._target_})")
        weighting.setup(data, device)  # class counts, per-class lengths, per-sample files
    regularizers = [
        instantiate(node, name=name).bind(model)
        for name, node in cfg.get("regularizer", {}).items()
    ]
    if tc.channels_last:
        model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    forward_model: nn.Module | None = None
    if world.distributed:  # gradients all-reduced (averaged) during backward
        from torch.nn.parallel import DistributedDataParallel

        forward_model = DistributedDataParallel(
            model, device_ids=[device] if device.type == "cuda" else None,
            find_unused_parameters=tc.find_unused_parameters,
        )  # fmt: skip
    if tc.compile:
        if typed.instrument.per_sample.every_n_steps:
            raise ConfigError(
                "trainer.compile: per-sample gradient norms (instrument.per_sample) arm module "
                "hooks on their steps, which a compiled forward does not call; turn one off"
            )
        if tc.detect_anomaly and tc.compile_backend != "eager":
            raise ConfigError(
                "trainer.detect_anomaly: it names the forward operation whose backward made "
                f"a NaN, and torch.compile's AOTAutograd backends ({tc.compile_backend}) make "
                "the whole forward one autograd node (CompiledFunctionBackward, the trainer's "
                "line for its forward); use trainer.compile_backend=eager (Dynamo without "
                "AOTAutograd: operations named as uncompiled), or leave compile off"
            )
        penalty = [r.name for r in regularizers if isinstance(r, InputGradPenalty)]
        if penalty and tc.compile_backend != "eager":
            raise ConfigError(
                f"trainer.compile: regularizer {penalty[0]} differentiates the forward twice "
                "(double backprop), which torch.compile's AOTAutograd backends "
                f"({tc.compile_backend}) do not support (torch raised at the first step); "
                "use trainer.compile_backend=eager (Dynamo without AOTAutograd: it trains as "
                "uncompiled), or leave compile off"
            )
        from torch._dynamo.exc import InvalidBackend

        try:
            forward_model = cast(  # an OptimizedModule: a Module
                nn.Module,
                torch.compile(
                    forward_model if forward_model is not None else model,
                    backend=tc.compile_backend,
                    # inductor draws its own random numbers otherwise: dropout's masks were
                    # not the plain run's (a probe's, torch 2.14.1), nor those the curvature
                    # instrument replays from the step's random state on the plain module
                    options={"fallback_random": True} if tc.compile_backend == "inductor" else None,
                ),
            )
        except InvalidBackend as e:  # (torch's message named no key)
            raise ConfigError(
                f"trainer.compile_backend: got {tc.compile_backend!r}, which torch.compile "
                "does not know; e.g. inductor, aot_eager or eager (torch._dynamo."
                "list_backends(exclude_tags=()) lists them all)"
            ) from e
    trainer = Trainer(
        model,
        optimizer,
        data.train_loader,
        data.val_loader,
        criterion=loss,
        device=device,
        weighting=weighting,
        scheduler=scheduler,
        precision=tc.precision,
        grad_clip=tc.grad_clip,
        accumulate_grad_batches=tc.accumulate_grad_batches,
        max_epochs=tc.max_epochs,
        max_steps=tc.max_steps,
        log_every_n_steps=typed.logging.every_n_steps,
        logger=TensorBoardLogger(event_dir(run_dir)) if with_logger else None,
        progress=ProgressOptions(
            typed.logging.progress,
            every_n_steps=typed.logging.progress_every_n_steps,
            **_sweep_progress(),
        ),
        detect_anomaly=tc.detect_anomaly,
        callbacks=[*build_callbacks(typed.instrument), *build_user_callbacks(cfg), *callbacks],
        world=world,
        forward_model=forward_model,
        channels_last=tc.channels_last,
        regularizers=regularizers,
    )
    # the length given to the scheduler, checkpointed: a resume gives it again and checks it
    trainer.schedule_length = dict.fromkeys(run_length_keys(cfg.scheduler), max(total_steps, 1))
    return trainer
