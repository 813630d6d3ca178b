"""What a step reports, kept on the device and read on the steps that write it.

:class:`Staging` holds the scalars and short histograms callbacks stage during a step, for one
batched host read at its end. :class:`LossTally` is the training loss:

Each micro-batch's detached losses are appended as they are (no kernel per step for per-sample
losses); a logging step concatenates those since the previous log into ``train/loss`` and folds
them into the epoch's device-side sum, which validation reads with its own metrics in one
transfer. Per-token losses (B, T) are kept as u·ℓ with their Σu in a device scalar, so
``train/loss`` is the loss's own average Σuℓ/Σu, never a mean over padding.
"""

from __future__ import annotations

import math
import numbers
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from trainer.callbacks import LOOP_PREFIXES, LOOP_TAGS
from trainer.instrument.histograms import host_histogram
from trainer.logger import Scalars, to_host_many
from trainer.precision import LOW_PRECISION, sum_dtype, widen

if TYPE_CHECKING:
    from trainer.logger import TensorBoardLogger


@dataclass
class _Deferred:
    """A step's staged scalars and histograms, kept on the device until the next write."""

    step: int
    scalars: Scalars
    histograms: dict[str, Tensor]
    #: (key, tensor, its version when staged): an in-place change before the read is an error
    versions: list[tuple[str | tuple[str, ...], Tensor, int]] = field(default_factory=list)
    #: (key, 1-D tensor, function of its values on the host giving scalars) (stage_on_host)
    host: list[tuple[str, Tensor, HostFn]] = field(default_factory=list)
    #: histograms staged with count_nonfinite=False (their NaN values stand for no value)
    uncounted: set[str] = field(default_factory=set)
    #: when the step's values were kept: their events' wall time (a step measured between
    #: logging steps was written with the time of the read, later than the next step's
    #: events in TensorBoard's wall-time axis, a probe's)
    wall_time: float = field(default_factory=time.time)


#: a function of a staged tensor's values, read to the host, giving the scalars to write
HostFn = Callable[[list[float]], dict[str, float]]


def _check_names(tags: Iterable[object], what: str) -> None:
    """Each of ``tags`` a string, none the loop's own."""
    for tag in tags:
        if not isinstance(tag, str):
            # (TypeErrors, not the trainer's ContractError: a call one's own code made, whose
            # traceback, kept, leads to its line)
            raise TypeError(f"{what}: a tag must be a string (or a tuple of them), got {tag!r}")
        if tag in LOOP_TAGS or tag.startswith(LOOP_PREFIXES):
            raise ValueError(
                f"{what}: {tag!r} is the trainer's own tag; a staged value would replace the "
                "trainer's or add points to its curve: name yours otherwise (e.g. "
                f"'my/{tag.rsplit('/', 1)[-1]}')"
            )


def _stager_name(owner: object) -> str:
    """A callback in words: its class and id."""
    return f"{type(owner).__qualname__} (at {id(owner):#x})"


def _check_new(tags: Iterable[str], taken: Any, what: str) -> None:
    """None of ``tags`` already in ``taken`` (a set or a dict's keys: staged for this step)."""
    if not taken.isdisjoint(tags):
        tag = next(t for t in tags if t in taken)
        raise ValueError(
            f"{what}: {tag!r} was staged twice for this step (by two callbacks, or twice by "
            "one): the earlier value would be lost without a word"
        )


class Staging:
    """Scalars and short histograms staged during a step, written together at its end (a
    logging step), or kept on the device and written, each at its own step, with the next
    logging step's in the same transfer (:meth:`defer`)."""

    def __init__(self) -> None:
        self.scalars: dict[str | tuple[str, ...], Tensor | float] = {}
        self.histograms: dict[str, Tensor] = {}
        self.host: list[tuple[str, Tensor, HostFn]] = []
        self.deferred: list[_Deferred] = []
        #: each staged tensor and its version counter when it was staged, by key: one changed
        #: in place before it is read is an error (its value would be written as it is then)
        self._versions: dict[str | tuple[str, ...], tuple[Tensor, int]] = {}
        #: the tags staged for this step (each once; none the loop's own)
        self._tags: set[str] = set()
        #: the tags already taken for a step, and that step: hooks after the step (validation,
        #: a rest point) stage for the same step again, and a tag staged in two of them was
        #: written twice at that step (a probe's finding)
        self._taken: tuple[int, set[str]] = (-1, set())
        #: keys whose tags were checked (strings, none the loop's own)
        self._known: set[object] = set()
        #: the hook the Trainer is running (None outside its hooks): whose tags are staged
        self.stager: Any = None
        #: each tag's stager (the callback whose hook staged it first; what is staged
        #: outside the hooks is not recorded): a callback staging an instrument's tag mixed
        #: its points into that curve, unsaid
        self._owners: dict[str, object] = {}
        #: each checked key's stager when last checked (a key staged by another: checked)
        self._key_owner: dict[object, object] = {}
        #: histograms staged this step whose NaN values stand for samples without a value (not
        #: counted): the call's, kept with its step (a set for the run silenced a tag's count
        #: on every step, earlier ones waiting to be written included, and a resumed run's
        #: differed: a probe's)
        self._nan_means_none: set[str] = set()

    def pending(self) -> bool:
        return bool(self.scalars or self.histograms or self.host)

    def stage(self, values: Scalars, own: bool = True) -> None:
        """Queue scalars (``Trainer.stage_scalars``). A tuple of tags takes a tensor of as
        many values, a tag one value: checked here (metadata, no sync), as the step's one
        transfer is cut by those counts, and a tensor of another size shifted every value
        after it (``train/loss`` included) onto other tags. ``own=False``: views staged as
        they are (an instrument's slice of a tensor nothing writes to; :func:`_own`)."""
        staged = {}
        for key, v in values.items():
            tags = key if isinstance(key, tuple) else (key,)
            self._check(key, tags, "stage_scalars")
            if isinstance(v, Tensor):
                if v.numel() != len(tags):
                    what = f"{len(key)} tags" if isinstance(key, tuple) else "one tag"
                    raise ValueError(
                        f"stage_scalars: {key!r} is {what}, staged with a tensor of "
                        f"{v.numel()} value(s) (shape {tuple(v.shape)}); stage one value per tag"
                    )
                staged[key] = _own(v) if own else v
            elif isinstance(key, tuple) or not isinstance(v, numbers.Real):
                raise TypeError(
                    f"stage_scalars: {key!r} staged with a {type(v).__name__}; stage a number "
                    "or a tensor (a tuple of tags: a tensor of their values)"
                )
            else:
                staged[key] = v
            self._tags.update(tags)
        self.scalars.update(staged)
        self._record(staged.items())

    def _check(self, key: object, tags: tuple[Any, ...], what: str) -> None:
        """``tags`` (of ``key``) strings, none the loop's own (checked once per key: an
        instrument builds its tags once and stages them every step), none staged before
        for this step."""
        if not self._tags.isdisjoint(tags):
            _check_new(tags, self._tags, what)
        owner = getattr(self.stager, "__self__", self.stager)  # (a bound hook's callback)
        if key not in self._known:
            _check_names(tags, what)
            if len(self._known) > 4096:  # (tags made anew at each step: kept bounded)
                self._known.clear()
                self._key_owner.clear()
            self._known.add(key)
        elif self._key_owner.get(key) is owner:  # (the common case: one dict look-up)
            return
        self._check_owner(tags, owner, what)
        self._key_owner[key] = owner

    def _check_owner(self, tags: tuple[Any, ...], owner: object, what: str) -> None:
        """None of ``tags`` staged by another callback before (a probe's callback staging
        ``grad_norm/<param>`` at steps of its own put its points into the norms instrument's
        curve, unsaid). What is staged outside the trainer's hooks (``owner`` None: a
        closure an instrument hands the loop, plain code) is nobody's: it was refused beside
        the same instrument's hook, a review's."""
        if owner is None:
            return
        if len(self._owners) > 65536:  # (tags made anew at each step: kept bounded)
            self._owners.clear()
        for tag in tags:
            other = self._owners.setdefault(tag, owner)
            if other is not owner:
                raise ValueError(
                    f"{what}: {tag!r} is staged by {_stager_name(owner)} and by "
                    f"{_stager_name(other)}: their points would be one curve; name yours "
                    "otherwise"
                )

    def stage_histogram(self, tag: str, values: Tensor, count_nonfinite: bool = True) -> None:
        """Queue a short 1-D tensor to bin on the host (``Trainer.stage_histogram``)."""
        tags = (tag, f"{tag}_mean", f"{tag}_max", f"{tag}_nonfinite")
        self._check(tag, tags, "stage_histogram")
        if not isinstance(values, Tensor):
            raise TypeError(f"stage_histogram: {tag!r} staged with a {type(values).__name__}, "
                            "not a tensor")  # fmt: skip
        if not count_nonfinite:  # (once staged: a refused call leaves the tag counted)
            self._nan_means_none.add(tag)
        self._tags.update(tags)
        self.histograms[tag] = values = _own(values)
        self._record([(tag, values)])

    def stage_on_host(self, values: Tensor, fn: HostFn) -> None:
        """Queue a 1-D tensor whose scalars ``fn`` computes on the host from its values once
        read (``Trainer.stage_on_host``)."""
        if not isinstance(values, Tensor) or not callable(fn):
            raise TypeError(
                f"stage_on_host: takes a tensor and a function, got a {type(values).__name__} "
                f"and a {type(fn).__name__}"
            )
        key = f"<values {len(self.host)} for {_name(fn)}>"
        values = _own(values)
        self.host.append((key, values, fn))
        self._record([(key, values)])

    def _record(self, items: Iterable[tuple[str | tuple[str, ...], object]]) -> None:
        """Each tensor's version as it is staged (a user's views are copied when staged:
        :func:`_own`; an instrument's view staged as it is shares its base's counter, and is
        checked from the end of its step, :meth:`_entry`)."""
        for key, v in items:
            if isinstance(v, Tensor) and not v.is_inference() and not v._is_view():
                self._versions[key] = (v, v._version)  # (an inference tensor has no counter)
            else:  # (a number, or a view, staged again under a tensor's key)
                self._versions.pop(key, None)

    def defer_staged(self, step: int) -> None:
        """:meth:`defer` what is staged now (if anything) at ``step``."""
        if self.pending():
            self.defer(self.take_scalars(step), step)

    def taken_back(self, step: int) -> None:
        """Steps from ``step`` on are trained again (a fit called again after a failure):
        their tags may be staged again."""
        if self._taken[0] >= step:
            self._taken = (-1, set())

    def take_scalars(self, step: int) -> dict[str | tuple[str, ...], Tensor | float]:
        """The staged scalars, to be written at ``step``; a tag already taken for ``step``
        (staged in two hooks of it: ``on_train_step_end`` and ``on_validation_end``) is
        refused."""
        if self._taken[0] != step:
            self._taken = (step, set())
        twice = self._tags & self._taken[1]
        if twice:  # (the entries holding them dropped: a failure's write keeps the others)
            for key in [k for k in self.scalars
                        if not twice.isdisjoint((k,) if isinstance(k, str) else k)]:  # fmt: skip
                del self.scalars[key]
            self._tags -= twice
            raise ValueError(
                f"stage_scalars: {sorted(twice)[0]!r} was staged twice for step {step}, in two "
                "of its hooks (by two callbacks, or by one): both values would be written at "
                "that step"
            )
        out, self.scalars = self.scalars, {}
        tags, self._tags = self._tags, set()
        self._taken[1].update(tags)
        return out

    def _entry(self, step: int, values: Scalars, histograms: dict[str, Tensor]) -> _Deferred:
        """``values``, ``histograms`` and the tensors staged for the host of ``step``, with
        each tensor's version: as it was staged, or, for a view or one not staged (the loop's
        own), as it is now."""
        staged, self._versions = self._versions, {}
        host, self.host = self.host, []
        versions = []
        for key, v in [*values.items(), *histograms.items(), *[(k, t) for k, t, _ in host]]:
            if isinstance(v, Tensor) and not v.is_inference():
                kept = staged.get(key)
                version = kept[1] if kept is not None and kept[0] is v else v._version
                versions.append((key, v, version))
        uncounted, self._nan_means_none = self._nan_means_none, set()
        return _Deferred(step, dict(values), histograms, versions, host, uncounted)

    def defer(self, values: Scalars, step: int) -> None:
        """Keep ``values`` and the staged histograms of ``step`` (one that does not log) on the
        device: no host read now; the next :meth:`write` or :meth:`flush` writes them at
        ``step``. A staged tensor must not change in place until then (checked: its version
        counter, as it was when staged)."""
        histograms, self.histograms = self.histograms, {}
        self.deferred.append(self._entry(step, values, histograms))

    def write(
        self, values: Scalars, step: int, logger: TensorBoardLogger | None
    ) -> dict[str, float]:
        """Write the deferred steps (each at its own step), then ``values`` and the staged
        histograms (each with ``<tag>_mean`` and ``<tag>_max`` over its finite values) at
        ``step``; returns this step's scalars as floats. One batched host read for all:
        logging steps only. A staged tensor changed in place since it was staged is left out
        (the others are written) and named in the error raised after."""
        histograms, self.histograms = self.histograms, {}
        entries, self.deferred = [*self.deferred, self._entry(step, values, histograms)], []
        problem = _drop_changed(entries)
        floats = self._write(entries, logger)[-1]
        if problem:
            raise RuntimeError(problem)
        return floats

    def flush(self, logger: TensorBoardLogger | None, strict: bool = True) -> str | None:
        """Write the deferred steps now (before a checkpoint, at the end of a run). A value
        changed in place since it was staged is left out and named: in the error raised after
        the others are written, or (``strict=False``) in the message returned."""
        entries, self.deferred = self.deferred, []
        problem = _drop_changed(entries)
        if entries:
            self._write(entries, logger)
        if problem and strict:
            raise RuntimeError(problem)
        return problem

    def _write(
        self, entries: list[_Deferred], logger: TensorBoardLogger | None
    ) -> list[dict[str, float]]:
        arrays = [t for e in entries for t in [*e.histograms.values(), *[v for _, v, _ in e.host]]]
        all_floats, lists = to_host_many([e.scalars for e in entries], arrays)  # host sync:
        host_values = iter(lists)  # logging steps only (and before a checkpoint, at the end)
        binned: list[dict[str, Any]] = []
        problems: list[str] = []
        for e, floats in zip(entries, all_floats, strict=True):
            hists = {tag: host_histogram(next(host_values)) for tag in e.histograms}
            for tag, h in hists.items():
                floats[f"{tag}_mean"] = h.sum / h.num if h.num else math.nan
                floats[f"{tag}_max"] = h.max if h.num else math.nan
                if h.nonfinite and tag not in e.uncounted:  # (left out of the above)
                    floats[f"{tag}_nonfinite"] = float(h.nonfinite)
            for _, _, fn in e.host:  # (in step order: a function may keep state, an average)
                problem = _host_scalars(fn, next(host_values), floats, e.step, self._known)
                if problem:  # (the step's other values, and the other steps', are written)
                    problems.append(problem)
            binned.append(hists)
        # every step's values first, then the writes: a write that fails (a full disk) loses
        # what it writes, not a host function's step (a running average would skip it)
        for e, floats, hists in zip(entries, all_floats, binned, strict=True):
            if logger is not None:
                for tag, h in hists.items():
                    logger.log_histogram_raw(tag, h, e.step, e.wall_time)
                if floats:
                    logger.add_floats(floats, e.step, e.wall_time)
        if problems:
            raise ValueError("; ".join(problems[:3]) + (" …" if len(problems) > 3 else ""))
        return all_floats


def _host_scalars(
    fn: HostFn, values: list[float], floats: dict[str, float], step: int, known: set[object]
) -> str:
    """Add what ``fn(values)`` (a ``stage_on_host`` function) returns to ``floats``, the
    values of ``step``; what is wrong with it, naming the function and the tag (its values
    are then left out), or "". ``known``: tags checked before (a function returns the same
    ones at each step)."""
    try:
        got = fn(values)
    except Exception as e:  # noqa: BLE001 (named in the error raised after the writes)
        return f"{_where(fn, step)} raised {type(e).__name__}: {e}"
    if not isinstance(got, dict):
        return f"{_where(fn, step)} returned {type(got).__name__}, not a dict of tag -> value"
    try:
        _check_new(got.keys(), floats.keys(), "stage_on_host")
        for tag, v in got.items():
            if type(v) is not float and not isinstance(v, numbers.Real):
                return f"{_where(fn, step)} returned {type(v).__name__} for {tag!r}, not a number"
            if tag not in known:
                _check_names([tag], "stage_on_host")
                if len(known) > 4096:  # (tags made anew at each step: kept bounded)
                    known.clear()
                known.add(tag)
    except (TypeError, ValueError) as e:
        return f"{_where(fn, step)}: {e}"
    floats.update((tag, float(v)) for tag, v in got.items())
    return ""


def _where(fn: HostFn, step: int) -> str:
    return f"step {step}: stage_on_host's function {_name(fn)}"


def _own(v: Tensor) -> Tensor:
    """A staged view, copied (one small kernel; other tensors as they are): a view shares its
    base's version counter, so a change to it in place (a gradient's slice, clipped later in
    its step; a weight's, by the optimizer's update) could not be told from a change to
    another slice of the base, and the value written was the one at the read. A tensor made
    under ``torch.inference_mode()`` has no counter at all: copied too (its change in place
    was written, unsaid, a probe's)."""
    return v.detach().clone() if v._is_view() or v.is_inference() else v


def _name(fn: Any) -> str:
    """A function's name for a message (a ``functools.partial``'s wrapped one)."""
    inner = getattr(fn, "func", fn)
    return str(getattr(inner, "__qualname__", repr(fn)))


def _drop_changed(entries: list[_Deferred]) -> str | None:
    """Leave out of ``entries`` each tensor changed in place since it was staged (the others
    are still written); the error that names the first such value, or None."""
    problem = None
    for e in entries:
        for key, t, version in e.versions:
            if t._version == version:
                continue
            e.scalars = {k: v for k, v in e.scalars.items() if k != key}
            e.histograms = {k: v for k, v in e.histograms.items() if k != key}
            e.host = [h for h in e.host if h[0] != key]
            if problem is None:
                tag = key if isinstance(key, str) else key[0]
                problem = (
                    f"step {e.step}: the tensor staged as {tag!r} was changed in place after it "
                    "was staged (the other values were written); staged values are read at the "
                    "end of a logging step (a step that does not log: with the next one), so "
                    "stage a tensor that stays as it is until then (a copy)"
                )
    return problem


def mean_of(total: float, count: float) -> float:
    """``total / count``: a sum over a count of samples or a sum of unit weights (which may be
    below 1); NaN where nothing was counted (every token padding, no batch), not a mean of 0."""
    return total / count if count > 0 else math.nan


class LossTally:
    """Losses since the last log and since the epoch's start (see the module docstring)."""

    def __init__(self, device: torch.device, per_token: bool):
        self.device, self.per_token = device, per_token
        #: the sums' dtype: float64 (a float32 running total of an epoch's windows drifts by
        #: their count's roundings; float32 token counts stop at 2²⁴), float32 on MPS (none)
        self.wide = sum_dtype(device)
        self._log: list[Tensor] = []  # per micro-batch: losses (B,), or u·ℓ (B, T)
        self._epoch: list[Tensor] = []  # the same, not yet folded into the epoch's sum
        self._epoch_sum = torch.zeros((), dtype=self.wide, device=device)
        self._epoch_samples = 0  # per-sample losses: the epoch's count, on the host
        # per-token: Σu since the last log, and of the epoch
        self._units_log = torch.zeros((), dtype=self.wide, device=device)
        self._units_epoch = torch.zeros((), dtype=self.wide, device=device)
        #: rows of a resumed run's first window that an earlier process trained (flattened:
        #: not its samples), left out of the window's samples (samples/s is this process's)
        self._resumed_rows = 0
        #: micro-batches added since the last optimizer step, and (per-token) their Σu: what
        #: a fit that failed inside a window leaves, taken out again (:meth:`discard_window`)
        self._in_window = 0
        self._window_units: list[Tensor] = []

    def add(self, losses: Tensor, units: Tensor | None) -> None:
        """One micro-batch's detached losses (and the loss's unit weights, per-token).
        float16/bfloat16 losses are averaged in float32 (their own mean would round it to
        their 8 or 11 bits)."""
        if units is not None:
            if losses.dtype in LOW_PRECISION:  # (a product of two such values is exact in float32)
                losses, units = losses.float(), units.float()
            kept = losses * units
            units_sum = units.sum()
            self._units_log += units_sum
            self._units_epoch += units_sum
            self._window_units.append(units_sum)
        else:
            kept = losses  # no kernel
        self._log.append(kept)
        self._epoch.append(kept)
        self._in_window += 1

    def in_window(self) -> int:
        """Micro-batches added since the last optimizer step."""
        return self._in_window

    def end_window(self) -> None:
        """The optimizer step of the micro-batches added since the last one is taken."""
        self._in_window = 0
        self._window_units.clear()

    def discard_window(self) -> None:
        """Take out the micro-batches added since the last optimizer step (a fit that failed
        inside its window: a second fit trains the window again, and counted its losses
        twice, a probe's). Σu is subtracted: exact for whole-number unit weights."""
        n, self._in_window = self._in_window, 0
        if n == 0:
            return
        added = self._log[-n:] if n <= len(self._log) else []
        del self._log[len(self._log) - len(added) :]
        tail = self._epoch[-len(added) :] if added else []
        if len(tail) == len(added) and all(a is b for a, b in zip(tail, added, strict=True)):
            del self._epoch[len(self._epoch) - len(tail) :]
        if self._window_units:
            units = torch.stack(self._window_units).sum(dtype=self.wide)
            self._units_log -= units
            self._units_epoch -= units
            self._window_units.clear()

    def has_log(self) -> bool:
        """Losses were added since the last :meth:`take_log`."""
        return bool(self._log)

    def start_epoch(self) -> None:
        self._epoch.clear()
        self._epoch_sum.zero_()
        self._units_epoch.zero_()
        self._epoch_samples = 0

    def take_log(self) -> tuple[Tensor, Tensor, Tensor | int, int]:
        """(train/loss, its numerator, its denominator, samples) since the last log, on the
        device but the sample count (the denominator of per-sample losses is that count: an
        int); the window is then folded into the epoch's sum. The numerator and denominator
        are what a data-parallel run sums over the ranks."""
        samples = sum(t.shape[0] for t in self._log) - self._resumed_rows
        self._resumed_rows = 0
        if not self._log:  # (a data-parallel rank with nothing pending where another has)
            self._log = [torch.zeros(0, device=self.device)]
        count: Tensor | int
        if self.per_token:  # Σuℓ / Σu
            interval = torch.cat([t.reshape(-1) for t in self._log])
            total, count = interval.sum(dtype=self.wide), self._units_log.clone()
            mean = total / count  # (a window without a unit: NaN, not a loss of 0)
            self._units_log.zero_()
        else:
            interval = widen(torch.cat(self._log))  # (samples since the last log,)
            mean, total, count = interval.mean(), interval.sum(dtype=self.wide), interval.numel()
        if len(self._epoch) == len(self._log) and all(
            a is b for a, b in zip(self._epoch, self._log, strict=True)
        ):  # the epoch's pending losses are the window's (no validation since the last log):
            # their sum is ``total`` bit for bit (the same concatenation, summed alike)
            self._epoch_sum += total
            self._epoch_samples += interval.numel()
            self._epoch.clear()
        self._log.clear()
        self.fold()
        return mean, total, count, samples

    def fold(self) -> None:
        """Add the epoch's pending losses into its device-side sum."""
        if self._epoch:
            flat = widen(torch.cat([t.reshape(-1) for t in self._epoch]))
            self._epoch_sum += flat.sum(dtype=self.wide)
            self._epoch_samples += sum(t.numel() for t in self._epoch)
            self._epoch.clear()

    def epoch_parts(self) -> Tensor:
        """[Σ, count] of the epoch's losses so far, (2,) on the device (no copy)."""
        self.fold()
        if self.per_token:  # Σu of the epoch's tokens
            count = self._units_epoch
        else:
            count = torch.full((), self._epoch_samples, dtype=self.wide, device=self.device)
        return torch.stack([self._epoch_sum, count])

    def state_dict(self) -> dict[str, Any]:
        """The losses not yet logged or folded, as they are (a resumed run logs the same)."""

        def cat(ts: list[Tensor]) -> Tensor:
            if not ts:
                return torch.zeros(0, device=self.device)
            return torch.cat([t.reshape(-1) for t in ts])

        return {
            "pending_log": cat(self._log),
            "pending_epoch": cat(self._epoch),
            "epoch_loss_sum": self._epoch_sum.clone(),
            "epoch_samples": self._epoch_samples,
            "units_log": self._units_log.clone(),
            "units_epoch": self._units_epoch.clone(),
        }

    @staticmethod
    def merged(states: list[dict[str, Any]]) -> dict[str, Any]:
        """Several tallies' states as one (their losses concatenated, their sums summed)."""
        return {
            "pending_log": torch.cat([s["pending_log"].cpu() for s in states]),
            "pending_epoch": torch.cat([s["pending_epoch"].cpu() for s in states]),
            "epoch_loss_sum": sum(s["epoch_loss_sum"].cpu() for s in states),
            "epoch_samples": sum(int(s["epoch_samples"]) for s in states),
            "units_log": sum(s["units_log"].cpu() for s in states),
            "units_epoch": sum(s["units_epoch"].cpu() for s in states),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pending_log, pending_epoch = state["pending_log"], state["pending_epoch"]
        self._log = [pending_log.to(self.device)] if pending_log.numel() else []
        self._resumed_rows = pending_log.numel()
        self._epoch = [pending_epoch.to(self.device)] if pending_epoch.numel() else []
        # (a checkpoint of an earlier version: float32 sums, widened exactly)
        self._epoch_sum = state["epoch_loss_sum"].to(self.device, self.wide)
        self._epoch_samples = int(state["epoch_samples"])
        self._units_log = state["units_log"].to(self.device, self.wide)
        self._units_epoch = state["units_epoch"].to(self.device, self.wide)
