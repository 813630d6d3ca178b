"""Atomic checkpoint writes and safe loads; what a resumable training checkpoint holds.

A checkpoint is written to a temporary file in the same folder, fsynced, then moved over the
final name with ``os.replace``: a crash mid-write leaves the previous file intact and never a
partial file under the final name. Loading always uses ``torch.load(weights_only=True)``, which
refuses pickles that would run code; there is no fallback.
"""

from __future__ import annotations

import contextlib
import copy
import filecmp
import functools
import hashlib
import io
import json
import logging
import os
import pickle
import random
import signal
import sys
import tempfile
import threading
import zipfile
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from trainer.callbacks import Callback, Every
from trainer.distributed import all_gather_objects, all_reduce_max

log = logging.getLogger(__name__)


def _umask() -> int:
    """The process's umask (Linux: read, not set; elsewhere set and put back at once)."""
    with contextlib.suppress(OSError, ValueError, IndexError), open("/proc/self/status") as f:
        for line in f:
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _atomic_write(path: Path, write: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        # the mode open() gives a new file (mkstemp's is its owner's alone: a checkpoint
        # another user of the group could not read, a probe)
        with contextlib.suppress(OSError):  # (a file system without modes: as it gives)
            os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> Path:
    """Write ``state`` (tensors, containers and primitives only) atomically to ``path``."""
    path = Path(path)
    _atomic_write(path, lambda f: torch.save(state, f))
    return path


def _mapped(obj: Any, leaf: Callable[[Any], Any]) -> Any:
    """``obj`` with ``leaf`` applied to each value inside its plain dicts, lists and tuples."""
    if type(obj) in (dict, OrderedDict):
        return type(obj)((k, _mapped(v, leaf)) for k, v in obj.items())
    if type(obj) in (list, tuple):
        return type(obj)(_mapped(v, leaf) for v in obj)
    return leaf(obj)


def _skeleton_leaf(obj: Any) -> Any:
    """A tensor as an empty one of its dtype (what loading it allows does not depend on its
    size); a subclass, a quantized one, anything else as it is."""
    if type(obj) in (torch.Tensor, torch.nn.Parameter) and not obj.is_quantized:
        return torch.empty(0, dtype=obj.dtype)
    return obj


def _numpy_leaf(obj: Any) -> Any:
    """A NumPy scalar as a Python number, a numeric NumPy array as a tensor (the same
    values); object, string and masked arrays, a long double, a datetime stay (refused,
    named)."""
    if isinstance(obj, np.generic):
        return obj.item()
    if type(obj) is np.ndarray and obj.dtype.kind in "biufc":
        try:
            return torch.from_numpy(obj.astype(obj.dtype.newbyteorder("="), order="C", copy=True))
        except TypeError:  # (a dtype torch has not: long double, its complex)
            return obj
    return obj


def _numpy_in(obj: Any) -> bool:
    found: list[bool] = []
    _mapped(obj, lambda v: found.append(isinstance(v, np.generic | np.ndarray)))
    return any(found)


def _refused(obj: Any) -> str | None:
    """Why ``torch.load(weights_only=True)`` would refuse ``obj`` once saved, or None
    (checked on its skeleton in memory: quick whatever its tensors' sizes)."""
    buffer = io.BytesIO()
    try:
        torch.save(_mapped(obj, _skeleton_leaf), buffer)
        buffer.seek(0)
        torch.load(buffer, weights_only=True)
    except Exception as e:  # noqa: BLE001 (pickling errors too: a local class, a lambda)
        lines = [ln.split("WeightsUnpickler error:", 1)[-1].strip() for ln in str(e).splitlines()]
        skip = ("Weights only load failed", "Check the documentation", "Please file an issue",
                "In PyTorch", "(1)", "(2)", "You can use", "Detected")  # fmt: skip
        why = " ".join(ln for ln in lines if ln and not ln.startswith(skip))
        return why.split(" Please use", 1)[0][:300] or type(e).__name__
    return None


#: callbacks already warned about NumPy values in their state (once per class)
_WARNED_NUMPY: set[str] = set()


def checkpointable(state: Any, owner: str, kind: str = "callback") -> Any:
    """A callback's (``kind``: or a loss's, ...) ``state_dict()`` as a checkpoint can hold
    it: NumPy scalars and arrays
    (``min(best, np.float64(x))``) become Python numbers and tensors of the same values, with
    a warning (``torch.load(weights_only=True)`` refuses NumPy: the checkpoint was written
    and then refused at the resume, which started the run afresh). Anything else such a load
    refuses raises ``ValueError`` naming ``owner`` and the cause, when written, not when
    resumed."""
    if _numpy_in(state):
        state = _mapped(state, _numpy_leaf)
        if owner not in _WARNED_NUMPY:
            _WARNED_NUMPY.add(owner)
            log.warning(
                "%s %s: its state_dict() holds NumPy values; checkpointed as Python "
                "numbers and tensors of the same values (a safe load refuses NumPy), which "
                "its load_state_dict() gets on a resume", kind, owner,
            )  # fmt: skip
    why = _refused(state)
    if why is not None:
        raise ValueError(
            f"{kind} {owner}: its state_dict() holds what a checkpoint loaded with "
            f"torch.load(weights_only=True) refuses, so no run could resume from it ({why}); "
            "keep tensors, numbers, strings and plain dicts, lists and tuples of them"
        )
    return state


def _newest_in(folder: Path) -> Path | None:
    """A run's latest checkpoint in ``folder`` (a run dir or its ``checkpoints/``): its
    ``last.pt``, else its newest ``step_*.pt`` (a run stopped or failed has no last.pt)."""
    for where in (folder / "checkpoints", folder):
        if (where / "last.pt").is_file():
            return where / "last.pt"
        steps = sorted((n, p) for p in where.glob("step_*.pt") if (n := step_of(p)) is not None)
        if steps:
            return steps[-1][1]
    return None


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True``; errors name the file and the cause."""
    path = Path(path)
    if path.is_dir():
        newest = _newest_in(path)
        hint = f": {newest}?" if newest is not None else ""
        raise IsADirectoryError(
            f"checkpoint {path} is a folder; give a checkpoint file (.pt){hint} "
            "(trainer.resume=auto continues the run of its own folder)"
        )
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.stat().st_size == 0:
        raise ValueError(f"checkpoint {path} is empty (0 bytes)")
    damaged = _crc_mismatch(path)
    if damaged is not None:
        raise ValueError(
            f"checkpoint {path} is corrupt: the bytes of {damaged} do not match their stored "
            "CRC-32 (damaged on disk or in a copy)"
        )
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's text advises turning weights_only off, never an option here: keep its cause
        skip = ("Weights only load failed", "Check the documentation", "Please file an issue")
        lines = [ln.strip() for ln in str(e).splitlines()]
        lines = [ln.split("WeightsUnpickler error:", 1)[-1].strip() for ln in lines]
        cause = " ".join(ln for ln in lines if ln and not ln.startswith(skip)) or "no reason given"
        raise ValueError(
            f"checkpoint {path} was refused by torch.load(weights_only=True): it is corrupt or "
            f"holds more than tensors and plain containers: {cause}"
        ) from e
    except Exception as e:
        cause = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ValueError(
            f"checkpoint {path} is not a readable PyTorch checkpoint (corrupt or truncated?): "
            f"{cause}"
        ) from e
    if not isinstance(state, dict):
        raise ValueError(f"checkpoint {path} holds a {type(state).__name__}, not a dict")
    return state


def _crc_mismatch(path: Path) -> str | None:
    """The first record of a zip checkpoint (``torch.save``'s format) whose bytes do not match
    their CRC-32, or None. ``torch.load`` does not check them: a flipped bit in a tensor's
    bytes loaded, and trained on, without a word. Other files: None (``torch.load`` says what
    is wrong with them)."""
    try:
        with zipfile.ZipFile(path) as archive:
            if not any(i.CRC for i in archive.infolist() if i.file_size):
                return None  # (saved without checksums: compute_crc32 = False)
            return archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError):
        return None


def write_json(path: str | Path, data: dict[str, Any]) -> None:
    """Write ``data`` as indented JSON, atomically."""
    text = json.dumps(data, indent=2, sort_keys=True) + "\n"
    _atomic_write(Path(path), lambda f: f.write(text.encode()))


# ----------------------------------------------------------------------------- training state

#: checkpoint layout version, checked when resuming
FORMAT = 1
#: keys every training checkpoint has (besides those of ``Trainer.state_dict``)
REQUIRED = ("format", "run_id", "model", "optimizer", "step", "epoch", "batch_in_epoch", "rng")


def rng_state() -> dict[str, Any]:
    """Python's, NumPy's and torch's (CPU and every CUDA device's) RNG states, in a form
    ``torch.load(weights_only=True)`` accepts: tuples, ints, floats, strings and tensors (NumPy's
    key array becomes an int64 tensor)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": {
            "name": name,
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },  # fmt: skip
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],
    }


def rank_rng_state(state: dict[str, Any], rank: int, world_size: int) -> dict[str, Any]:
    """The RNG states a rank resumes with from checkpoint ``state``: its own where the
    checkpoint has every rank's and as many ranks resume it, else the writer's (rank 0's;
    resumed on another number of processes, the data order is not the saved one anyway)."""
    ranks = state.get("rng_ranks")
    if ranks and len(ranks) == world_size:
        return ranks[rank]
    return state["rng"]


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    keys = n["keys"].numpy().astype(np.uint32)
    np.random.set_state((n["name"], keys, n["pos"], n["has_gauss"], n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"][: torch.cuda.device_count()])


#: config keys that do not change what a run computes: left out of the derived run id
_NOT_IDENTITY = (
    ("trainer", "resume"), ("trainer", "run_id"), ("trainer", "checkpoint"),
    ("logging", "progress"), ("logging", "progress_every_n_steps"),
    # how DDP finds unused parameters, not what is computed (added 2026-12-05: a run started
    # before keeps its id, and resume=auto finds it)
    ("trainer", "find_unused_parameters"),
)  # fmt: skip
#: keys left out of a run's identity while null, their default (added 2026-12-05: a run
#: started before keeps its id); set, they are part of it (``foreach: true`` takes a CUDA
#: run off the fused default)
_NOT_IDENTITY_WHILE_NULL = (("optimizer", "foreach"),)


def _without_identityless(config: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``config`` without the keys that are not part of a run's identity."""
    config = copy.deepcopy(config)
    for section, key in _NOT_IDENTITY:
        config.get(section, {}).pop(key, None)
    for section, key in _NOT_IDENTITY_WHILE_NULL:
        node = config.get(section)
        if isinstance(node, dict) and key in node and node[key] is None:
            del node[key]
    for reg in (config.get("regularizer") or {}).values():
        if isinstance(reg, dict):  # whether a pattern may match nothing: not what is
            # computed (added 2026-12-07: a run started before keeps its id)
            reg.pop("allow_unmatched", None)
    data = config.get("data")
    if (
        isinstance(data, dict)
        and data.get("_target_") == "trainer.data.chars.CharText"
        and isinstance(data.get("block_size"), int)
        and data.get("stride") == max(data["block_size"] // 2, 1)
    ):  # data=chars: a stride of half the block is its default, null (a run started before
        # 2026-12-05 saved the old default, 32 of 64, and keeps its id)
        data["stride"] = None
    return config


def derive_run_id(config: dict[str, Any]) -> str:
    """A stable id for a resolved config: 12 hex digits of a hash of everything but the keys
    that do not change the computation (``_NOT_IDENTITY``: resume, run_id, checkpointing,
    progress output, DDP's unused-parameter search, a regularizer's ``allow_unmatched``;
    ``_NOT_IDENTITY_WHILE_NULL``: ``optimizer.foreach`` at its default)."""
    config = _without_identityless(config)
    text = json.dumps(config, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


#: keys a resumed run may change (how long it trains; what it logs and measures, which never
#: changes the trajectory), besides those not part of its identity
_RESUMABLE_CHANGES = (
    ("trainer", "max_steps"), ("trainer", "max_epochs"), ("trainer", "device"),
    ("logging", None), ("instrument", None),
    # how batches are loaded, not which (the loader paths give the same batches, tested)
    ("data", "num_workers"), ("data", "pin_memory"), ("data", "loader"),
    ("data", "memory_limit_mb"), ("data", "eval_batch_size"),
)  # fmt: skip


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, dict):
        return {prefix: tree}
    out: dict[str, Any] = {}
    for k, v in tree.items():
        out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def resume_changes(
    saved: dict[str, Any] | None,
    config: dict[str, Any],
    saved_world: int = 1,
    world: int = 1,
) -> list[str]:
    """What this run's config changes of the one a checkpoint was trained with, as
    ``key: old -> new``, leaving out the keys that are not part of a run's identity and those
    a resumed run may change (training length, logging, instruments). A resumed run continues
    the checkpoint's: its optimizer state would keep an old learning rate whatever the command
    line says, and its hyperparameter record would name the old values. ``saved_world`` and
    ``world``: the processes the checkpoint's run and this one have (the global batch counts).
    (None: a checkpoint of an earlier format without its config.)"""
    if saved is None:
        return []
    old, new = _without_identityless(saved), _without_identityless(config)
    for tree in (old, new):
        for section, key in _RESUMABLE_CHANGES:
            if key is None:
                tree.pop(section, None)
            elif isinstance(tree.get(section), dict):
                tree[section].pop(key, None)
    a, b = _flat(old), _flat(new)
    # on another number of processes the global batch is what must stay (data.batch_size is a
    # rank's part of it: 2 x 60 resumed on 1 x 120)
    key = "data.batch_size"
    old_size, new_size = a.get(key), b.get(key)
    if isinstance(old_size, int) and isinstance(new_size, int):
        if old_size * saved_world == new_size * world:
            b[key] = old_size
        elif saved_world != world:  # (the same per-process size can be another global batch:
            # its epoch position, counted in the old batches, would skip samples)
            a[key], b[key] = (f"{n} per process on {w} (global batch {n * w})"
                              for n, w in ((old_size, saved_world), (new_size, world)))  # fmt: skip
    return _changes(a, b)


def _changes(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """The keys of two flat configs whose values differ, as ``key: old -> new``."""
    changed = [k for k in sorted(set(a) | set(b)) if k not in a or k not in b or a[k] != b[k]]
    return [f"{k}: {a.get(k, '(unset)')} -> {b.get(k, '(unset)')}" for k in changed]


#: how many other runs' newest checkpoints :func:`continuable` looks at (the newest first)
CONTINUABLE_LOOKS = 20
#: the run lengths the trainer gives a scheduler (``T_max``, ``total_steps``): a resume that
#: trains longer than a checkpoint's is refused
_SCHEDULE_LENGTHS = ("T_max", "total_steps")


def continuable(
    search_dir: Path,
    config: dict[str, Any],
    ids: tuple[str, ...],
    world: int = 1,
    own: Path | None = None,
) -> tuple[Path, int, list[str]] | None:
    """The checkpoint a run that ``resume=auto`` found none of may have meant to continue:
    the newest step checkpoint under ``search_dir`` of another run (not of ``ids``) whose
    config differs from ``config`` only in what a resumed run may change (how long it trains,
    logging, instruments, the device, how data is loaded: :func:`resume_changes` has nothing
    against it) and that this run's length leaves steps to train (its step below
    ``trainer.max_steps``, its epochs below ``trainer.max_epochs``), as (path, step, its
    differences ``key: old -> new``). Those keys are part of a run's identity, so
    ``resume=auto`` with a longer ``trainer.max_epochs`` starts another run;
    ``trainer.resume=<path>`` continues the checkpoint with them. Not one whose scheduler
    the trainer set to its run's length (cosine's ``T_max``, OneCycle's ``total_steps``)
    where the length changes: a longer resume of it is refused. Not one in the run folder
    ``own``, whose earlier outputs a run of another id sets aside (its path would be stale).
    Each run folder's newest checkpoint, the :data:`CONTINUABLE_LOOKS` newest runs at most,
    each read memory-mapped (its tensors are not read); a file that does not read as a
    checkpoint is passed over. None when none fits."""
    newest: list[tuple[float, int, Path]] = []
    mine = (own / "checkpoints").resolve() if own is not None else None
    for marker in search_dir.rglob("checkpoints/run.json"):
        try:
            if marker.parent.resolve() == mine:
                continue
            marked = json.loads(marker.read_text())
            if not isinstance(marked, dict) or marked.get("run_id") in ids:
                continue
            steps = [(n, p) for p in marker.parent.glob("step_*.pt")
                     if (n := step_of(p)) is not None]  # fmt: skip
            if steps:
                step, path = max(steps)
                newest.append((path.stat().st_mtime, step, path))
        except (OSError, ValueError):
            continue
    trainer = config.get("trainer")
    max_steps, max_epochs = (
        (trainer.get("max_steps"), trainer.get("max_epochs"))
        if isinstance(trainer, dict)
        else (None, None)
    )
    for _, step, path in sorted(newest, key=lambda t: t[:2], reverse=True)[:CONTINUABLE_LOOKS]:
        try:
            diffs = _continuable_diffs(path, config, world, max_steps, max_epochs)
        except Exception:  # noqa: BLE001 (another run's file, whatever it holds: a hint
            continue  # never stops a start)
        if diffs:
            return path, step, diffs
    return None


def _continuable_diffs(
    path: Path, config: dict[str, Any], world: int, max_steps: Any, max_epochs: Any
) -> list[str]:
    """:func:`continuable`'s test of one checkpoint: the keys that differ (``key: old ->
    new``), or [] when this run cannot continue it."""
    state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    saved = state.get("config") if isinstance(state, dict) else None
    if not isinstance(saved, dict):
        return []
    saved_world = len(state.get("tally_ranks") or [None])
    if resume_changes(saved, config, saved_world, world):
        return []
    step, epoch = state.get("step"), state.get("epoch")
    if _limit(max_steps) and not (isinstance(step, int) and step < max_steps):
        return []  # (nothing left to train: a resume would end where it starts)
    if _limit(max_epochs) and not (isinstance(epoch, int) and epoch < max_epochs):
        return []  # (max_steps=-1, the default, and max_epochs=0: no limit of their own)
    a, b = _flat(_without_identityless(saved)), _flat(_without_identityless(config))
    if "schedule_length" in state:  # the lengths the trainer gave the scheduler
        lengths = state["schedule_length"] or {}
    else:  # (a checkpoint from before 2026-12-05: its scheduler state's, unless the config's)
        own = saved.get("scheduler")
        given = own if isinstance(own, dict) else {}
        lengths = {k: v for k, v in (state.get("scheduler") or {}).items() if k not in given}
    scheduled: list[int] = [lengths[k] for k in _SCHEDULE_LENGTHS if _limit(lengths.get(k))]
    # (a max_steps within the schedule's length caps the run there, whatever its epochs)
    capped = scheduled and _limit(max_steps) and max_steps <= min(scheduled)
    if scheduled and not capped and _longer(a, b):
        return []  # (a schedule of the checkpoint run's length: a longer resume is refused)
    return _changes(a, b)


def _limit(value: Any) -> bool:
    """A positive int: a length that limits (-1 and 0 do not; a bool is no length)."""
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _longer(old: dict[str, Any], new: dict[str, Any]) -> bool:
    """Whether a run of the flat config ``new`` may train longer than one of ``old``: a
    limit of steps or epochs raised, or set where there was none, or one taken away."""
    for key in ("trainer.max_steps", "trainer.max_epochs"):
        before, after = old.get(key), new.get(key)
        if _limit(before) != _limit(after) or _limit(after) and after > before:  # type: ignore[operator]
            return True
    return False


def step_path(directory: Path, step: int) -> Path:
    return directory / f"step_{step:09d}.pt"


def step_of(path: Path) -> int | None:
    stem = path.stem
    digits = stem[5:]  # (ASCII digits, as written: str.isdigit also takes '²', int() not)
    if path.suffix == ".pt" and stem.startswith("step_") and digits.isascii() and digits.isdigit():
        return int(digits)
    return None


def prune(directory: Path, keep_last: int, keep: Path | None = None) -> list[Path]:
    """Delete all but the newest ``keep_last`` step checkpoints, never ``keep`` (the one
    just written); returns the deleted ones."""
    steps = sorted((s, p) for p in directory.glob("step_*.pt") if (s := step_of(p)) is not None)
    doomed = [p for _, p in steps[: max(len(steps) - keep_last, 0)] if p != keep]
    for p in doomed:
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
    return doomed


def set_aside_later(directory: Path, step: int) -> list[Path]:
    """Move the step checkpoints after ``step`` into ``directory/abandoned/``: a run resumed
    from ``step`` replaces that stretch (as TensorBoard's purge_step replaces its events), and
    they must neither be resumed from nor outrank the new ones when old ones are pruned."""
    later = [p for p in directory.glob("step_*.pt") if (step_of(p) or 0) > step]
    aside = directory / "abandoned"
    last = directory / "last.pt"
    names = [p.name for p in later] + (["last.pt"] if last.is_file() else [])
    n = 1
    while any((aside / name).exists() for name in names):  # (a stretch abandoned before,
        n += 1  # from the same step or an earlier one: it stays, this one goes beside it;
        aside = directory / "abandoned" / str(n)  # it was replaced, a review's)
    if later:
        aside.mkdir(parents=True, exist_ok=True)
    for p in later:
        os.replace(p, aside / p.name)
    _retire_last(directory, aside)
    return later


def _retire_last(directory: Path, aside: Path) -> None:
    """A resumed run is no completed one: the ``last.pt`` a completed run left (its last
    step's checkpoint under a second name) would outrank the resumed run's own checkpoints
    where a run's latest is looked for, and, resumed from an earlier step, be the abandoned
    stretch's end (a probe's: ``last.pt`` at step 15 beside the resumed run's step 8). Where a
    step checkpoint is the same file, only the second name goes; a copy (no hard links on the
    disk) whose step file is gone is moved ``aside``, with the stretch set aside."""
    last = directory / "last.pt"
    if not last.is_file():
        return
    if any(_same_file(last, p) for p in [*directory.glob("step_*.pt"), *aside.glob("step_*.pt")]):
        last.unlink()
        return
    aside.mkdir(parents=True, exist_ok=True)
    os.replace(last, aside / "last.pt")


def _same_file(a: Path, b: Path) -> bool:
    """The same file under two names (a hard link), or a copy of it byte for byte."""
    try:
        if os.path.samefile(a, b):
            return True
        return a.stat().st_size == b.stat().st_size and filecmp.cmp(a, b, shallow=False)
    except OSError:
        return False


#: what a run writes into its run dir (Hydra's ``.hydra/`` and log file aside)
#: a run's outputs in its folder; ``continued.json``: a job that continued in another run dir
#: (trainer.report.CONTINUED)
RUN_OUTPUTS = ("tb", "checkpoints", "metrics.json", "continued.json")


def set_aside_previous(run_dir: Path) -> Path | None:
    """Move an earlier run's outputs in ``run_dir`` (``tb/``, ``checkpoints/``,
    ``metrics.json``) into ``run_dir/previous/<n>/`` (n = 1, 2, ...) and return that folder,
    or None when there were none.

    A new run given a folder that holds another run's (a fixed ``hydra.run.dir``, a sweep
    folder run again, ``run(cfg, run_dir=...)``) would otherwise write its events into the
    other run's event folder, where TensorBoard shows both runs' points as one curve and keeps
    the first run's HParams record, and would leave the other run's checkpoints where
    ``resume=auto`` looks for its own. Set aside, the earlier run stays whole and is listed by
    TensorBoard as a run of its own (``previous/<n>/tb/...``). Its ``checkpoints/run.json``
    becomes ``superseded.json``: ``resume=auto`` no longer finds the set-aside checkpoints (a
    run of the same config would otherwise continue the earlier run's newer one); a path to
    one still resumes from it. Its ``metrics.json``'s ``checkpoint``, where it is one of the
    set-aside checkpoints, is their path now (it named the new run's ``last.pt``, a probe's);
    nothing else is changed.
    """
    found = [name for name in RUN_OUTPUTS if (run_dir / name).exists()]
    if not found:
        return None
    # (its own number, ``#n`` in TensorBoard's session groups, where it recorded one and it
    # is free; else after the highest: the lowest free one, after previous/1 was deleted,
    # gave two runs one group, and one past the highest left, after the newest previous/<n>
    # was deleted, gave the run set aside and the new one the same number, a probe's)
    own = run_number(run_dir)
    free = own is not None and not (run_dir / "previous" / str(own)).exists()
    dest = run_dir / "previous" / str(own if free else set_aside_count(run_dir) + 1)
    dest.mkdir(parents=True)
    for name in (*found, RUN_NUMBER):
        if (run_dir / name).exists():
            os.replace(run_dir / name, dest / name)
    marker = dest / "checkpoints" / "run.json"
    if marker.exists():
        os.replace(marker, marker.with_name("superseded.json"))
    _follow_checkpoint(dest / "metrics.json", run_dir / "checkpoints", dest / "checkpoints")
    return dest


def set_aside_count(run_dir: Path) -> int:
    """The highest number of a run set aside in ``run_dir/previous/<n>``, 0 for none."""
    numbers = [int(p.name) for p in (run_dir / "previous").glob("*")
               if p.name.isascii() and p.name.isdigit() and p.is_dir()]  # fmt: skip
    return max(numbers, default=0)


#: a run's number in its folder (``#n`` of its HPARAMS session group; the earlier runs in
#: ``previous/<n>``), written beside its outputs and set aside with them
RUN_NUMBER = ".run_number"


def run_number(run_dir: Path) -> int | None:
    """The number the run in ``run_dir`` recorded (:data:`RUN_NUMBER`); None where none is (a
    run from before 2026-12-07, or none) or it does not read as one."""
    try:
        text = (run_dir / RUN_NUMBER).read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None
    return int(text) if text.isascii() and text.isdigit() and int(text) > 0 else None


def next_run_number(run_dir: Path) -> int:
    """A new run's number in ``run_dir``: one past every number a run kept there has had
    (the folders in ``previous/`` and the numbers they recorded), so that a deleted
    ``previous/<n>`` is not given again while a run numbered past it is kept."""
    kept = [run_number(p) for p in (run_dir / "previous").glob("*") if p.is_dir()]
    return 1 + max([set_aside_count(run_dir), *(n for n in kept if n is not None)])


def keep_run_number(run_dir: Path, number: int) -> None:
    """Record the run's number in its folder (:data:`RUN_NUMBER`)."""
    _atomic_write(run_dir / RUN_NUMBER, lambda f: f.write(f"{number}\n".encode()))


def _follow_checkpoint(metrics: Path, old: Path, new: Path) -> None:
    """``metrics``'s ``checkpoint``, a path in the folder ``old``, as the same file in
    ``new``; a file that cannot be read as such is left as it is."""
    try:
        data = json.loads(metrics.read_text())
        path = Path(data["checkpoint"])
        inside = path.parent.resolve() == old.resolve()
    except (OSError, ValueError, KeyError, TypeError):
        return
    if inside:
        data["checkpoint"] = os.path.abspath(new / path.name)
        write_json(metrics, data)


def write_run_marker(directory: Path, run_id: str, run_dir: Path) -> None:
    """``checkpoints/run.json``: how ``resume=auto`` finds this run's checkpoints."""
    write_json(directory / "run.json", {"run_id": run_id, "run_dir": str(run_dir)})


def find_checkpoints(
    search_dir: Path, run_id: str | tuple[str, ...], own: Path | None = None
) -> list[Path]:
    """Step checkpoints of run ``run_id`` (or of any of several ids, the first preferred: a
    run's id and the one a run of its config had before 2026-12-05) anywhere under
    ``search_dir``, newest first; those of the run folder ``own`` (the folder a run starts
    in) before any other: a run stopped there and started again in it continues its own
    checkpoints, not a later one of the same id in another folder (until 2026-12-05 it resumed
    another folder's finished run and set its own checkpoints aside, a probe's)."""
    ids = (run_id,) if isinstance(run_id, str) else run_id
    markers = list(search_dir.rglob("checkpoints/run.json"))
    if own is not None and (own / "checkpoints" / "run.json").is_file():
        markers.append(own / "checkpoints" / "run.json")  # (also outside search_dir)
    mine = (own / "checkpoints").resolve() if own is not None else None
    found: dict[Path, tuple[bool, int, int, float, Path]] = {}
    for marker in markers:
        try:
            marked = json.loads(marker.read_text()).get("run_id")
        except (OSError, ValueError):
            continue
        if marked not in ids:
            continue
        home, preferred = marker.parent.resolve() == mine, -ids.index(marked)
        steps = sorted(
            marker.parent.glob("step_*.pt"), key=lambda p: step_of(p) or 0, reverse=True
        )  # (the newest first: the one a last.pt is)
        for p in steps:
            step = step_of(p)
            if step is not None:
                with contextlib.suppress(OSError):
                    found[p.resolve()] = (home, preferred, step, p.stat().st_mtime, p)
        last = marker.parent / "last.pt"  # (a completed run's; its step file deleted, it is
        # the run's newest, and resume=auto took an older one, a review's)
        if last.is_file() and not any(_same_file(last, p) for p in steps):
            try:
                step = int(load_checkpoint(last)["step"])
            except Exception:  # noqa: BLE001 (tried first, and named where it does not load,
                step = sys.maxsize  # as any checkpoint: it was skipped unsaid, a review's)
            with contextlib.suppress(OSError):
                found[last.resolve()] = (home, preferred, step, last.stat().st_mtime, last)
    return [t[-1] for t in sorted(found.values(), key=lambda t: t[:4], reverse=True)]


def marked_id(path: Path) -> str | None:
    """The run id a step checkpoint's folder is marked with (``checkpoints/run.json``)."""
    try:
        return json.loads((path.parent / "run.json").read_text()).get("run_id")
    except (OSError, ValueError):
        return None


def load_training_checkpoint(path: str | Path) -> dict[str, Any]:
    """:func:`load_checkpoint` plus the checks a resume needs: the layout version and every
    required key. Errors name the file and the cause."""
    path = Path(path)
    state = load_checkpoint(path)
    missing = [k for k in REQUIRED if k not in state]
    if missing:
        raise ValueError(
            f"checkpoint {path} is not a training checkpoint of this trainer: it lacks "
            f"{', '.join(missing)}"
        )
    if state["format"] != FORMAT:
        raise ValueError(f"checkpoint {path} has layout version {state['format']}, not {FORMAT}")
    return state


def select_resume(
    resume: str, search_dir: Path, run_id: str | tuple[str, ...], own: Path | None = None
) -> tuple[Path | None, dict[str, Any] | None, list[str], str | None]:
    """The checkpoint ``trainer.resume`` names: (path, state, notes on refused files, the run
    id its folder is marked with).

    A path must load (else the error names it). ``auto`` takes the newest step checkpoint of
    ``run_id`` (or of the first of several ids that has one) under ``search_dir`` that loads
    and is complete, those of the run folder ``own`` first (:func:`find_checkpoints`),
    skipping (and noting) broken ones; (None, None, notes, None) when there is none.
    """
    if resume != "auto":
        path = Path(resume)
        return path, load_training_checkpoint(path), [], None
    notes: list[str] = []
    for path in find_checkpoints(search_dir, run_id, own):
        try:
            return path, load_training_checkpoint(path), notes, marked_id(path)
        except (OSError, ValueError) as e:
            notes.append(str(e))
    return None, None, notes, None


class CheckpointWriter:
    """Writes a trainer's checkpoints into ``directory`` and keeps the newest ``keep_last``.

    Before each write the scalars measured on steps that did not log are written and the
    TensorBoard events flushed, so everything logged up to the checkpoint's step is on disk when
    the checkpoint exists (a resumed run purges only later
    steps). A periodic checkpoint that cannot be written (disk full, I/O error) is reported and
    training goes on: the previous checkpoint is intact (writes are atomic). The final one must
    succeed.
    """

    def __init__(
        self,
        trainer: Any,
        directory: Path,
        run_id: str,
        config: dict[str, Any],
        keep_last: int,
        main: bool = True,
        clock: Callable[[], float] | None = None,
    ):
        self.trainer, self.directory, self.run_id = trainer, directory, run_id
        #: the run's wall time so far (kept in each checkpoint: a resumed run's wall_s counts
        #: its earlier processes)
        self.clock = clock
        self.config, self.keep_last = config, keep_last
        #: data-parallel: whether this rank writes the files (rank 0); the others take part in
        #: gathering what each rank keeps of its own (its losses not yet logged), and write none
        self.main = main
        self.saving = False  # a signal handler reads it: a second Ctrl-C waits for the save
        self.failures: list[str] = []
        self.last: Path | None = None

    def state(self) -> dict[str, Any]:
        state = self.trainer.state_dict()
        rng = rng_state()
        state.update(format=FORMAT, run_id=self.run_id, config=self.config, rng=rng)
        world = getattr(self.trainer, "world", None)
        if world is not None and world.distributed:  # each rank's own (a collective): ranks
            # drawing unevenly (augmentation in the main process over a ragged last batch;
            # each rank's own CUDA device) no longer all resume with rank 0's states
            state["rng_ranks"] = all_gather_objects(rng)
        if self.clock is not None:
            state["wall_s"] = self.clock()
        return state

    def write(self, path: Path) -> Path:
        failed: Exception | None = None
        try:  # (data-parallel: a failure here, writing rank 0's events, must not keep this
            # rank from the gather below, which every rank's writer takes part in)
            write_deferred = getattr(self.trainer, "write_deferred", None)
            if write_deferred is not None:  # scalars of steps that did not log, into the events
                write_deferred()
            if self.trainer.logger is not None:
                self.trainer.logger.flush()
        except Exception as e:
            failed = e
        state = self.state()  # (data-parallel: a collective)
        if failed is not None:
            raise failed
        if not self.main:
            self.last = path
            return path
        self.saving = True
        try:
            save_checkpoint(path, state)
        finally:
            self.saving = False
        self.last = path
        prune(self.directory, self.keep_last, keep=path)
        return path

    def _anywhere(self, flag: bool) -> bool:
        """``flag`` on any rank (data-parallel: one small all-reduce and a host read; for the
        end of a run)."""
        world = getattr(self.trainer, "world", None)
        if world is None or not world.distributed:
            return flag
        value = torch.tensor(float(flag), device=self.trainer.device)
        return bool(all_reduce_max(value))  # host sync: the end of a run

    def periodic(self, trainer: Any) -> Path | None:
        """A periodic step checkpoint; a failure is reported and training goes on."""
        step = trainer.global_step
        try:
            return self.write(step_path(self.directory, step))
        except OSError as e:
            kept = f"the previous one, {self.last}, is intact" if self.last else "none is kept"
            message = f"step {step}: checkpoint not written ({e}); {kept}"
            self.failures.append(message)
            log.error("%s; training goes on", message)
            return None

    def final(self) -> Path:
        """The step checkpoint of the last step (if not written yet) and ``last.pt``."""
        step = self.trainer.global_step
        path = step_path(self.directory, step)
        if self._anywhere(self.last != path):  # (every rank alike: the write is a collective;
            self.write(path)  # rank 0's periodic write of this step may have failed)
        if not self.main:
            return path
        last = self.directory / "last.pt"
        tmp = self.directory / ".last.pt.link"
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        try:  # the same file under a second name, swapped in atomically
            os.link(path, tmp)
            os.replace(tmp, last)
        except OSError:  # no hard links here: a copy, written atomically
            data = path.read_bytes()
            _atomic_write(last, lambda f: f.write(data))
        return last


class PeriodicCheckpoints(Callback):
    """Checkpoint cadence: at rest points (trainer/callbacks.py) every ``every_n_steps``
    optimizer steps (0: none), and at the rest point a stop signal ends the run at (that one
    must be written); when the run completes, the last step's checkpoint and ``last.pt``
    (:attr:`final`). Data-parallel, every rank has one (each rank's losses not yet logged
    are gathered into the checkpoint), and rank 0's writer alone writes."""

    def __init__(self, writer: CheckpointWriter, every_n_steps: int):
        self.writer, self.every = writer, Every(every_n_steps)
        #: ``last.pt`` of a completed run, once written
        self.final: Path | None = None

    def _written(self, step: int) -> bool:
        return self.writer.last == step_path(self.writer.directory, step)

    def on_rest_point(self, trainer: Any) -> None:
        step = trainer.global_step
        if self._written(step):
            return
        if trainer.stopped_by is not None:  # the run goes on later from here: no failure allowed
            self.writer.write(step_path(self.writer.directory, step))
        elif self.every.due(step):
            self.writer.periodic(trainer)

    def on_fit_end(self, trainer: Any, metrics: dict[str, float]) -> None:
        if trainer.stopped_by is None:
            self.final = self.writer.final()


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


def submitit_requeue() -> tuple[int, Callable[..., Any]] | None:
    """The signal submitit sends a job before its time limit or preemption (``USR2``, or
    ``SUBMITIT_PREEMPT_SIGNAL``: Hydra's submitit launcher asks SLURM for it
    ``signal_delay_s`` before the end) and submitit's handler of it, which requeues the job
    (where the callable can be checkpointed: Hydra's launcher's can) and exits; None where
    this process is no submitit job (that signal's handler is not submitit's)."""
    sig = getattr(signal, "SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2"), None)
    if not isinstance(sig, signal.Signals) or threading.current_thread() is not (
        threading.main_thread()
    ):
        return None
    handler = signal.getsignal(sig)
    owner = getattr(handler, "__self__", None)
    if not callable(handler) or not type(owner).__module__.startswith("submitit."):
        return None
    return int(sig), handler


class StopOnSignals(Callback):
    """While ``fit`` runs, SIGTERM, SIGINT and SIGUSR1 ask the run to stop at its next rest
    point (after the current optimizer step; every rank stops at the same one), where
    :class:`PeriodicCheckpoints` writes a checkpoint. A second SIGINT stops at once, except while
    a checkpoint is being written (then the save finishes first). The previous handlers come
    back when ``fit`` ends or fails. Main thread only (Python delivers signals there).

    In a submitit job (Hydra's submitit launcher), submitit's signal before the time limit or
    preemption stops the run too, and ``requeue`` is then submitit's handler of it, for the
    caller to hand the job to once the run is checkpointed (it ran in the middle of a step:
    the run failed, its last steps lost, and the job was requeued to start afresh)."""

    def __init__(self, writer: CheckpointWriter | None = None, signals=STOP_SIGNALS):
        self.writer, self.signals = writer, tuple(signals)
        self._previous: dict[int, Any] = {}
        self.requeue: Callable[..., Any] | None = None
        #: the signals the handler took while ``fit`` ran
        self.received: list[int] = []
        #: the signals it handles while ``fit`` runs (submitit's too, in a submitit job)
        self.installed: tuple[int, ...] = ()
        #: called when ``fit`` fails, once the previous handlers are back (``trainer.run``
        #: holds stop signals until the failure is recorded: one arriving meanwhile killed the
        #: run before its metrics.json, and one taken here was never acted on, a review's)
        self.on_failure: Callable[[], None] | None = None

    def on_fit_start(self, trainer: Any) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        submitit = submitit_requeue()
        self.requeue = None
        self.received = []

        def handler(signum: int, frame: Any) -> None:
            self.received.append(signum)
            name = signal.Signals(signum).name
            if submitit is not None and signum == submitit[0]:  # (also after another stop
                # signal: SLURM's preemption sends SIGTERM first)
                self.requeue = functools.partial(submitit[1], signum, None)
                if trainer.stop_signal is not None:
                    log.warning("%s: once the run is checkpointed, submitit requeues the job",
                                name)  # fmt: skip
            then = "submitit requeues the job" if self.requeue is not None else "exit"
            if trainer.stop_signal is None:
                trainer.stop_signal = signum
                log.warning("%s: finishing the current step, then a checkpoint, then %s",
                            name, then)  # fmt: skip
            elif self.writer is not None and self.writer.saving:
                log.warning("%s again: a checkpoint is being written; it finishes first", name)
            elif signum == signal.SIGINT:
                raise KeyboardInterrupt  # a second Ctrl-C outside a save: stop now

        signals = (*self.signals, *([submitit[0]] if submitit else []))
        self.installed = tuple(dict.fromkeys(signals))
        self._previous = {s: signal.signal(s, handler) for s in self.installed}

    def restore(self) -> None:
        """The handlers from before ``fit`` put back (once; again: nothing)."""
        for s, h in self._previous.items():
            signal.signal(s, h)
        self._previous = {}

    def on_fit_end(self, trainer: Any, metrics: dict[str, float]) -> None:
        self.restore()

    def on_exception(self, trainer: Any, error: BaseException) -> None:
        self.restore()
        if self.on_failure is not None:
            self.on_failure()
