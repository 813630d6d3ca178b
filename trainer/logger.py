"""TensorBoard writer and progress output.

:class:`TensorBoardLogger` takes scalars as Python floats or 0-d tensors; the tensors of one call
are read back to the host in a single batched transfer (the only host sync of a logging step)
and written to the event file in bursts (see :class:`TensorBoardLogger` and :class:`EventFile`).
:class:`Progress` draws a tqdm bar over optimizer steps when its stream is a terminal and
otherwise stays silent, leaving a plain log line per epoch (written by the Trainer).
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import logging
import math
import os
import socket
import struct
import sys
import time
import types
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import google_crc32c
import torch
from torch import Tensor
from tqdm import tqdm

log = logging.getLogger(__name__)


#: tag -> a float or a 0-d tensor; or a tuple of tags -> a 1-D tensor with one value per tag
#: (keys: ``str`` or ``tuple[str, ...]``; typed ``Any`` since ``Mapping`` is invariant in its
#: key, so a plain ``dict[str, Tensor]`` would not match a union key type)
Scalars = Mapping[Any, Tensor | float | int]


def _has_width(stream: TextIO) -> bool:
    """Whether a terminal ``stream`` has columns to draw in (unknown: assumed)."""
    try:
        return os.get_terminal_size(stream.fileno()).columns > 0
    except (OSError, ValueError, AttributeError):  # (io.UnsupportedOperation is both)
        return True


def shown(value: float) -> str:
    """A metric as the epoch and summary lines print it: 4 decimals, and 4 significant digits
    where those would show less than 0.01 (a converged loss of 1e-4 printed as 0.0000, a
    probe's) or it reaches a million (a diverged loss printed 31 digits, a review's)."""
    value = value + 0.0  # (-0.0 as 0.0)
    near = abs(round(value, 4)) if math.isfinite(value) else math.inf
    if math.isfinite(value) and value != 0 and (near < 0.01 or near >= 1e6):
        return f"{value:.3e}"
    return f"{value:.4f}"


def to_floats(values: Scalars) -> dict[str, float]:
    """Python floats for a mapping of floats and tensors, with one device-to-host copy.

    A tuple of tags may map to a 1-D tensor holding their values: a callback that measured one
    value per parameter hands them over as one tensor instead of one 0-d tensor each.
    """
    (floats,), _ = to_host_many([values])
    return floats


def to_host_many(
    batches: Sequence[Scalars], arrays: Sequence[Tensor] = ()
) -> tuple[list[dict[str, float]], list[list[float]]]:
    """:func:`to_floats` of several mappings (the scalars of several steps), and each of
    ``arrays`` (tensors of any shape) as a flat list of floats, all in one device-to-host
    copy."""
    outs: list[dict[str, float]] = []
    tags: list[list[str]] = []
    parts: list[Tensor] = []  # 1-D
    for values in batches:
        out: dict[str, float] = {}
        names: list[str] = []
        for key, v in values.items():
            if not isinstance(v, Tensor):
                out[key] = float(v)  # type: ignore[index]
            elif isinstance(key, tuple):
                names.extend(key)
                parts.append(v if v.dim() == 1 else v.reshape(-1))
            else:
                names.append(key)
                parts.append(v.reshape(1))
        outs.append(out)
        tags.append(names)
    sizes = [a.numel() for a in arrays]
    flat_arrays = [a if a.dim() == 1 else a.reshape(-1) for a in arrays]
    lists: list[list[float]] = []
    if any(a.dtype == torch.float64 for a in flat_arrays):  # float64 arrays reach the host as
        # they are (a staged histogram of values 1e-12 apart was binned after rounding them
        # to float32: one bucket; 1e39 counted as non-finite); the scalars, each rounded to
        # float32 on its own as below, join them exactly
        parts = [t.float().double() for t in parts] + [a.double() for a in flat_arrays]
    else:
        parts += flat_arrays
        if any(t.dtype != torch.float32 for t in parts):  # each cast on its own, as cat
            parts = [t.float() for t in parts]  # would promote them all to one dtype first
    if parts:
        with torch.no_grad():  # (a staged tensor may require grad: no graph for the copy)
            flat = torch.cat(parts).tolist()  # host sync: logging steps only
        start = 0
        for out, names in zip(outs, tags, strict=True):
            out.update(zip(names, flat[start : start + len(names)], strict=True))
            start += len(names)
        for n in sizes:
            lists.append(flat[start : start + n])
            start += n
    return outs, lists


@functools.cache
def session_start(step: int, wall_time: float) -> Any:
    """A session-start ``Event`` at ``step``: TensorBoard drops the run's events at ``step``
    and later written before it (a resumed run's ``purge_step``, a fit trained again)."""
    from tensorboard.compat.proto.event_pb2 import Event, SessionLog

    return Event(wall_time=wall_time, step=step, session_log=SessionLog(status=SessionLog.START))


def _protos() -> Any:
    """TensorBoard's Event and Summary protos, imported on first use (not at start-up)."""
    from tensorboard.compat.proto.event_pb2 import Event
    from tensorboard.compat.proto.summary_pb2 import Summary

    return types.SimpleNamespace(Event=Event, Summary=Summary)


_file_ids = itertools.count()  # two files opened in the same second get different names


def _event_file_name(log_dir: Path, now: float) -> str:
    """A new event file's name, sorting after every event file already in ``log_dir``.

    TensorBoard reads a folder's event files in name order and never goes back to a name that
    sorts before the one it is reading, so a resumed run's file must sort last. ``SummaryWriter``
    names files ``events.out.tfevents.<seconds>.<host>.<pid>``: two files opened in the same
    second sort by pid as text (``10001`` before ``9999``), which put a resumed run's file
    first and hid the run's earlier events. Here the time has microseconds and a name that
    would not sort last is moved just past the last one.
    """
    host, pid = socket.gethostname(), os.getpid()
    name = f"events.out.tfevents.{now:017.6f}.{host}.{pid}.{next(_file_ids)}"
    existing = sorted(p.name for p in log_dir.glob("events.out.tfevents.*"))
    if existing and name <= existing[-1]:
        name = f"{existing[-1]}.{pid}.{next(_file_ids)}"  # a longer name with the same prefix
    return name


def _masked_crc(data: bytes) -> bytes:
    """The TFRecord checksum of ``data``: CRC-32C, rotated and offset ("masked")."""
    crc = google_crc32c.value(data)
    return struct.pack("<I", (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF)


def tfrecord(data: bytes) -> bytes:
    """One TFRecord: length, checksum of the length, the data, checksum of the data."""
    header = struct.pack("<Q", len(data))
    return header + _masked_crc(header) + data + _masked_crc(data)


class EventFile:
    """An append-only TensorBoard event file, written synchronously in bursts.

    The format is TensorBoard's: ``Event`` protos (tensorboard's own) framed as TFRecords, in a
    file named as ``SummaryWriter`` names it, starting with the ``file_version`` event. What
    differs is the checksum: without TensorFlow installed, tensorboard's writer computes
    CRC-32C in pure Python (about 110 µs for a 600-byte event of 20 scalars, on a background
    thread that holds the GIL), which alone cost 8 % of a 1.5 ms training step logging norms
    every step; ``google_crc32c`` (the C implementation) does it in about 1 µs. Files are read
    back in the tests with tensorboard's own reader, which verifies every checksum.
    """

    def __init__(self, log_dir: str | Path, purge_step: int | None = None):
        from tensorboard.compat.proto.event_pb2 import Event

        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        now = time.time()
        self.path = self.log_dir / _event_file_name(self.log_dir, now)
        self._file = open(self.path, "xb")  # noqa: SIM115 (closed by close())
        first = [Event(wall_time=now, file_version="brain.Event:2")]
        if purge_step is not None:  # TensorBoard drops this file's older events at steps >= it
            first.append(session_start(purge_step, now))
        self.write(first)

    def write(self, events: list[Any]) -> None:
        """Append ``events`` (``Event`` protos) and flush them to the operating system."""
        if not events:
            return
        self._file.write(b"".join(tfrecord(e.SerializeToString()) for e in events))
        self._file.flush()

    def close(self) -> None:
        if not self._file.closed:
            os.fsync(self._file.fileno())
            self._file.close()


#: the event folder of a run without overrides (a run built in Python, the defaults)
DEFAULT_EVENT_FOLDER = "run"


def event_dir(run_dir: str | Path, label: str | None = None) -> Path:
    """Where a run's event files are: ``run_dir/tb/<label>``, the label saying what the run set
    (its command-line overrides, e.g. ``optimizer.lr=0.01,model=cnn``), so that TensorBoard's
    run list tells runs apart by more than their folder number.

    The folder that exists is found first: a resumed run continues in it, and a run of the
    older layout wrote into ``tb/`` itself. With none, ``label`` names a new one (``/`` made
    ``_``, at most 120 characters; default :data:`DEFAULT_EVENT_FOLDER`).
    """
    tb = Path(run_dir) / "tb"
    if tb.is_dir():
        if any(tb.glob("events.out.tfevents.*")):
            return tb
        found = sorted(d for d in tb.iterdir() if d.is_dir())
        if found:
            return found[0]
    name = (label or DEFAULT_EVENT_FOLDER).replace("/", "_").replace(os.sep, "_").strip(". ")
    if len(name) > 120:  # distinct, still readable
        digest = hashlib.sha1(name.encode()).hexdigest()[:8]
        name = f"{name[:110]}~{digest}"
    return tb / (name or DEFAULT_EVENT_FOLDER)


class TensorBoardLogger:
    """TensorBoard events for the run's ``tb/``, buffered in memory and written in bursts.

    Values are buffered and written by :meth:`flush`, which :meth:`add_floats` calls once
    ``flush_secs`` have passed and :meth:`close` calls at the end, also when a run fails. Each
    logging call becomes one event holding all its scalars (``SummaryWriter.add_scalar`` writes
    one event per scalar, about 10x the cost: 57 µs against 6 µs per scalar measured here), and
    nothing runs on a background thread: with a writer thread woken for every event, on a 2-core
    CPU that thread fought the training threads for the GIL and the cores and slowed
    small-model training by 10-40 %.
    """

    def __init__(
        self, log_dir: str | Path, flush_secs: float = 30.0, purge_step: int | None = None
    ):
        self.log_dir = Path(log_dir)
        self.flush_secs = flush_secs
        self.file = EventFile(self.log_dir, purge_step)
        self._events: list[Any] = []  # Event protos not yet written
        self._last_flush = time.monotonic()

    def log_scalars(self, values: Scalars, step: int) -> dict[str, float]:
        """Record ``values`` at ``step``; returns them as floats (one host sync for tensors)."""
        floats = to_floats(values)
        self.add_floats(floats, step)
        return floats

    def add_floats(
        self, floats: dict[str, float], step: int, wall_time: float | None = None
    ) -> None:
        """Record scalars already on the host, as one event (at ``wall_time``: when they were
        measured, where that was before now)."""
        event = _protos().Event(wall_time=wall_time or time.time(), step=step)
        add = event.summary.value.add  # filled in place (an Event(summary=...) copies it)
        for t, v in floats.items():
            add(tag=t, simple_value=v)
        self._add_event(event)

    def log_histogram_raw(
        self, tag: str, h: Any, step: int, wall_time: float | None = None
    ) -> None:
        """Record a histogram binned elsewhere (``trainer.instrument.histograms.RawHistogram``)."""
        from tensorboard.compat.proto.summary_pb2 import HistogramProto, Summary

        histo = HistogramProto(
            min=h.min, max=h.max, num=h.num, sum=h.sum, sum_squares=h.sum_squares,
            bucket_limit=h.bucket_limits, bucket=h.bucket_counts,
        )  # fmt: skip
        self.add_summary(Summary(value=[Summary.Value(tag=tag, histo=histo)]), step, wall_time)

    def add_summary(self, summary: Any, step: int, wall_time: float | None = None) -> None:
        """Record a ``Summary`` proto (scalars, histograms, plugin data) at ``step``."""
        when = wall_time or time.time()
        self._add_event(_protos().Event(wall_time=when, step=step, summary=summary))

    def _add_event(self, event: Any) -> None:
        self._events.append(event)
        if time.monotonic() - self._last_flush > self.flush_secs:
            self.flush()

    def restart_at(self, step: int) -> None:
        """The events at ``step`` and later taken out of the run's event files (what a failed
        fit wrote of the steps a fit called again trains again), as a resume does
        (:func:`trainer.hparams.drop_events_from`: a session start alone left them in
        TensorBoard's default data server), and a new file, starting with the session start
        at ``step`` (older TensorBoards' purge)."""
        from trainer.hparams import drop_events_from

        self.flush()
        self.file.close()
        drop_events_from(self.log_dir, step)
        self.file = EventFile(self.log_dir, purge_step=step)
        self._last_flush = time.monotonic()

    def flush(self) -> None:
        """Write everything buffered to the event file."""
        events, self._events = self._events, []
        self.file.write(events)
        self._last_flush = time.monotonic()

    def close(self) -> None:
        self.flush()
        self.file.close()


@dataclass(frozen=True)
class ProgressOptions:
    """How a run shows its progress (:class:`Progress`): off unless ``enabled``."""

    enabled: bool = False
    bar: bool = True  # a tqdm bar when the stream is a terminal
    every_n_steps: int = 100  # otherwise a log line every N steps
    label: str = ""  # the lines' prefix (a sweep's job number)


class Progress:
    """Progress while training: a tqdm bar over optimizer steps, or plain log lines.

    The bar is drawn when ``bar`` is allowed and ``stream`` is a terminal. Otherwise (output
    redirected to a file, or a parallel sweep whose jobs would draw over each other) a log line
    every ``every_n_steps`` steps says the same: step, epoch, loss, grad norm, samples/s,
    prefixed with ``label`` (e.g. the sweep's job number). Values come from logging steps, so a
    line appears at the first logging step at or after each multiple of ``every_n_steps``.
    """

    def __init__(
        self,
        enabled: bool,
        total_steps: int,
        stream: TextIO | None = None,
        bar: bool = True,
        every_n_steps: int = 100,
        label: str = "",
        initial: int = 0,
    ):
        stream = stream if stream is not None else sys.stderr
        # the bar is drawn: on a terminal with a width (one of 0 columns, a pty nobody sized,
        # showed neither bar nor lines, a probe's)
        self.active = enabled and bar and stream.isatty() and _has_width(stream)
        self.lines = enabled and not self.active and every_n_steps > 0
        self.total_steps, self.every, self.label = total_steps, every_n_steps, label
        # a resumed run (``initial``: the steps already taken) keeps the cadence and the count
        self._next_line = (initial // every_n_steps + 1) * every_n_steps if every_n_steps > 0 else 0
        self.bar = tqdm(
            total=total_steps,
            initial=initial,
            unit="step",
            file=stream,
            dynamic_ncols=True,
            disable=not self.active,
            leave=True,
        )

    def update(self) -> None:
        self.bar.update(1)

    def show(self, epoch: int, max_epochs: int, step: int, postfix: Mapping[str, float]) -> None:
        text = {k: f"{v:.0f}" if abs(v) >= 1000 else f"{v:.4g}" for k, v in postfix.items()}
        if self.active:
            self.bar.set_description(f"epoch {epoch + 1}/{max_epochs}", refresh=False)
            self.bar.set_postfix(text, refresh=False)
        elif self.lines and step >= self._next_line:
            self._next_line = (step // self.every + 1) * self.every
            values = "  ".join(f"{k} {v}" for k, v in text.items())
            log.info(
                "%sstep %d/%d  epoch %d/%d  %s",
                self.label, step, self.total_steps, epoch + 1, max_epochs, values,
            )  # fmt: skip

    def close(self) -> None:
        self.bar.close()
