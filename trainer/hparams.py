"""TensorBoard HPARAMS for a run: its hyperparameters next to its real final metrics.

Three events go into the run's own event file (``tb/``, no extra sub-run): the experiment
(which hyperparameters and metrics the HPARAMS tab shows), the session start (this run's
values) when training starts, and the session end (completed or failed) when it stops. The
metrics are not copied: TensorBoard's HPARAMS tab reads the last value of the run's own
``val/acc``, ``val/loss`` and ``train/loss`` scalars, so what it shows is what was logged.

TensorBoard shows one run's experiment record for a whole logdir (the first it finds), so every
run lists every key it could override, not only the ones it did: the choice of each config
group and every setting of the composed config that changes what is trained (not
:data:`NOT_HPARAMS`: presentation, bookkeeping, where files go; a component's ``_target_`` only
when overridden), and every built-in task's metrics after its own (:data:`TASK_METRICS`: a
logdir of classification, regression and sequence runs). A key another run overrides is then
a column whichever run's record is picked, as long as both chose the same components: the
keys of a component the picked run did not choose (``model.channels`` of ``model=cnn`` when
an ``mlp`` run's record is picked) are missing, as are the metrics of a loss of one's own that
another run's record leaves out. The keys this run set on the command line (in a sweep:
every key of its command line, swept or not) are marked ``differs``, which the tab shows
first and ticks. A key holds one kind of value in every run, since the tab's filters and
sorting fail on a column of two (a whole table request refused): numbers (integers too, as
TensorBoard's float64, exact up to 2⁵³; beyond, as text), booleans, text (lists as JSON); a
None is left out (an empty cell; its column typed from the config's schema where it
declares one). The regularizers are shown as their names ("l2+orthogonal"). A session group
is named after the run: its folder (a sweep's job number) and its overrides.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import os
import re
import stat
import struct
import tempfile
import time
import types
import typing
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

#: the metrics the HPARAMS tab shows for a classification run, read from the run's scalars
#: (a run passes its task's own: trainer.losses.Loss.metrics)
METRICS = ("val/acc", "val/loss", "train/loss")
#: every built-in task's metrics (trainer.losses.Loss.metrics), listed after a run's own: the
#: one experiment record TensorBoard picks for a logdir of runs of several tasks listed only
#: its own task's, and the others' monitored metrics were in no column (a probe's)
TASK_METRICS = ("val/loss", "train/loss", "val/acc", "val/mse", "val/ppl", "val/token_acc")
#: integers up to this magnitude are exact as TensorBoard's float64 numbers
EXACT_INT = 2**53
#: config groups whose choice is a hyperparameter (when the run was composed by Hydra)
GROUPS = (
    "experiment", "debug", "data", "model", "optimizer", "scheduler", "loss", "weighting",
    "regularizer", "instrument",
)  # fmt: skip
#: values listed for every run, also when a config lacks them (then left out: an empty cell)
KEY_VALUES = (
    "seed", "loss.mode", "data.batch_size", "optimizer.lr", "optimizer.weight_decay",
)  # fmt: skip
#: config keys (and everything under them) that do not change what is trained
NOT_HPARAMS = (
    "hydra", "logging", "monitor", "trainer.checkpoint", "trainer.resume", "trainer.run_id",
    "trainer.detect_anomaly", "trainer.find_unused_parameters", "data.root",
    "data.num_workers", "data.pin_memory", "data.memory_limit_mb", "data.loader",
    "data.eval_batch_size",
)  # fmt: skip

HParamValue = bool | int | float | str | None


@dataclass
class RunHParams:
    """A run's hyperparameters and the keys of them its command line set."""

    values: dict[str, HParamValue]
    overridden: list[str] = field(default_factory=list)
    #: the declared kind (bool, float or str) of each key whose value is None, where the
    #: config's schema declares one (the record's column type: a None is left out of values)
    kinds: dict[str, type] = field(default_factory=dict)


def _value(v: Any, key: str = "") -> HParamValue:
    """A value TensorBoard can show, of one kind for a key in every run (the tab's filters and
    sorting failed on a column of two: an integer as text in one run, a float in another, a
    None as "none" beside numbers or booleans, a probe's): bool, number (an integer beyond
    :data:`EXACT_INT` as text, which float64 would round), string, None (left out of the
    record), containers as JSON text; a number as JSON text too for a ``key`` that another
    built-in option of its group declares as a list (:func:`_text_keys`)."""
    if isinstance(v, int | float) and not isinstance(v, bool) and key in _text_keys():
        return json.dumps(v)
    if v is None or isinstance(v, bool | float | str):
        return v
    if isinstance(v, int):
        return v if abs(v) <= EXACT_INT else str(v)
    if isinstance(v, DictConfig | ListConfig):
        v = OmegaConf.to_container(v, resolve=True)
    return json.dumps(v, sort_keys=True, default=str)


@functools.cache
def _text_keys() -> frozenset[str]:
    """The keys (``group.field``) that one built-in option of a group declares as a list and
    another as a number (``model.hidden``: an MLP's widths, a CNN's channels): a logdir of
    both had a column of two kinds (a review's), so their values are text in every run. (A
    key of one's own, untyped, is written as its value is: one that is a list in one run and
    a number in another makes such a column.)"""
    from trainer.config import group_schemas

    kinds: dict[str, set[str]] = {}
    for group, options in group_schemas().items():
        for schema in options.values():
            for name, hint in typing.get_type_hints(schema).items():
                kinds.setdefault(f"{group}.{name}", set()).add(_kind_of(hint))
    return frozenset(k for k, found in kinds.items() if {"list", "number"} <= found)


def _kind_of(hint: Any) -> str:
    """A schema field's kind: "list", "number", "bool", "str", "node" (a dataclass) or
    "other"; an optional one's (``bool | None``: "bool")."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        found = {_kind_of(a) for a in typing.get_args(hint) if a is not type(None)}
        return found.pop() if len(found) == 1 else "other"
    if hint in (list, tuple) or typing.get_origin(hint) in (list, tuple):
        return "list"
    if hint is bool:
        return "bool"
    if hint in (int, float):
        return "number"
    if hint is str:
        return "str"
    return "node" if dataclasses.is_dataclass(hint) else "other"


def _schema_kind(
    key: str, choices: Mapping[str, Any], config: Mapping[str, Any] | None = None
) -> type | None:
    """The kind (bool, float or str) the built-in schema of the run's chosen option declares
    for ``key`` (``optimizer.fused`` of ``optimizer: sgd``: bool), or None (a key of one's
    own, a list, an option not built in). Without the group's choice (a run built in
    Python), the option whose ``_target_`` is the one in the run's ``config``."""
    from trainer.config import group_schemas

    if key in _text_keys():
        return str
    group, *rest = key.split(".")
    options = group_schemas().get(group, {})
    schema = options.get(str(choices.get(group))) or (
        next(iter(options.values())) if len(options) == 1 else None)  # fmt: skip
    target = ((config or {}).get(group) or {}).get("_target_") if schema is None else None
    if target is not None:  # (the option built with it)
        schema = next((o for o in options.values() if _default(o, "_target_") == target), None)
    for part in rest:
        if schema is None or not dataclasses.is_dataclass(schema):
            return None
        hint = typing.get_type_hints(schema).get(part)
        if hint is None:
            return None
        kind = _kind_of(hint)
        if kind == "node":
            found = (a for a in (*typing.get_args(hint), hint) if dataclasses.is_dataclass(a))
            schema = typing.cast(type, next(found))
            continue
        return {"bool": bool, "number": float, "str": str}.get(kind) if part == rest[-1] else None
    return None


def _default(schema: type, name: str) -> Any:
    """A dataclass field's default (None where it has none)."""
    for f in dataclasses.fields(schema):
        if f.name == name:
            return None if f.default is dataclasses.MISSING else f.default
    return None


def is_hparam(key: str) -> bool:
    """Whether a config key changes what is trained (not one of :data:`NOT_HPARAMS`, nor a
    regularizer's ``allow_unmatched``, which is not part of a run's identity either)."""
    if re.fullmatch(r"regularizer\.[^.]+\.allow_unmatched", key):
        return False
    return not any(key == k or key.startswith(k + ".") for k in NOT_HPARAMS)


def _leaves(node: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    for k, v in node.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):  # (an empty one, e.g. no callbacks: nothing to list)
            yield from _leaves(v, key + ".")
        else:
            yield key, v


def override_keys(overrides: Iterable[str]) -> list[str]:
    """The config keys (or groups) a list of command-line overrides sets, in order, parsed
    by Hydra's own override parser; ``hydra.*`` keys and deletions are left out."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    keys = []
    for o in OverridesParser.create().parse_overrides(list(overrides)):
        key = o.key_or_group
        if o.is_delete() or key == "hydra" or key.startswith("hydra."):
            continue
        if key not in keys:
            keys.append(key)
    return keys


def _regularizers(cfg: DictConfig) -> str:
    names = list(OmegaConf.select(cfg, "regularizer", default=None) or {})
    return "+".join(names) if names else "none"


def run_hparams(
    cfg: DictConfig, choices: Mapping[str, Any] | None = None, overrides: Iterable[str] = ()
) -> RunHParams:
    """The run's hyperparameters (module docstring): the config groups' choices,
    :data:`KEY_VALUES`, every config leaf that is one (:func:`is_hparam`), and the overridden
    keys (``differs``).

    ``choices`` is Hydra's ``hydra.runtime.choices`` (group -> chosen option) and
    ``overrides`` its ``hydra.overrides.task``; without them (a run built in Python) the
    groups' columns are listed empty (the regularizers' names are read off the config) and
    nothing is marked as overridden.
    """
    choices = dict(choices or {})
    plain = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(plain, dict)
    values: dict[str, HParamValue] = {}
    for group in GROUPS:  # all of them, so every job has the same keys; a run built in
        # Python has no choices to read: listed, empty, but the regularizers' names, read off
        # the config (it listed none, and where TensorBoard took its record for a logdir's
        # columns the command-line runs' choices were in none, a probe's)
        chosen = choices.get(group) if choices else None
        values[group] = (_regularizers(cfg) if group == "regularizer"
                         else str(chosen or "none") if choices else None)  # fmt: skip
    for key in KEY_VALUES:
        values[key] = _value(OmegaConf.select(cfg, key, default=None), key)
    for key, v in _leaves(plain):
        if is_hparam(key) and key.rsplit(".", 1)[-1] not in ("_target_", "_partial_"):
            values[key] = _value(v, key)
    overridden = []
    for key in override_keys(overrides):
        if not is_hparam(key):
            continue
        if key == "regularizer":
            values[key] = _regularizers(cfg)
        elif key in choices:
            values[key] = str(choices[key] or "none")
        else:
            values[key] = _value(OmegaConf.select(cfg, key), key)
        overridden.append(key)
    kinds = {k: kind for k, v in values.items() if v is None and (kind := _declared(cfg, k))}
    kinds.update({g: str for g in GROUPS if values[g] is None})  # (their columns: text)
    return RunHParams(values, overridden, kinds)


def _declared(cfg: DictConfig, key: str) -> type | None:
    """The kind of value the config's schema declares for ``key`` (``bool | None``: bool),
    or None (an untyped key of one's own, a key the config lacks)."""
    from omegaconf.nodes import BooleanNode, EnumNode, FloatNode, IntegerNode, StringNode

    node: Any = cfg
    try:
        for part in key.split("."):
            node = node._get_node(part)
    except Exception:  # noqa: BLE001 (a key the config lacks, a list's element)
        return None
    for classes, kind in (((BooleanNode,), bool), ((FloatNode, IntegerNode), float),
                          ((StringNode, EnumNode), str)):  # fmt: skip
        if isinstance(node, classes):
            return kind
    return None


def hydra_hparams(cfg: DictConfig) -> RunHParams:
    """:func:`run_hparams` with the current Hydra job's choices and overrides, if any."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return run_hparams(cfg)
    hc = HydraConfig.get()
    from trainer.sweep import task_overrides

    return run_hparams(cfg, hc.runtime.choices, task_overrides())


def run_name(run_dir: Path, hparams: RunHParams, nth: int = 1) -> str:
    """A session group's name: the run's folder (in a sweep: the sweep's and the job's
    number), ``#nth`` for the nth run in that folder (the earlier ones set aside in
    ``previous/``: TensorBoard averages the sessions of one group, and an earlier run of the
    same overrides made one row with the new one's, the mean of both runs' metrics, a
    probe's), the values of the keys it overrides, and a tag of the folder's path."""
    numbered = run_dir.name.isascii() and run_dir.name.isdigit()  # (as Hydra numbers jobs)
    where = f"{run_dir.parent.name}/{run_dir.name}" if numbered else run_dir.name
    where += f"#{nth}" if nth > 1 else ""
    # the folder's own tag: runs of two folders alike by these names (sweeps `a/sw` and
    # `b/sw`, their jobs `sw/0`) made one group, the mean of their metrics (a probe's)
    tag = hashlib.sha1(str(run_dir.resolve()).encode()).hexdigest()[:6]
    return " ".join(part for part in (where, overrides_text(hparams, " "), f"({tag})") if part)


def overrides_text(hparams: RunHParams, sep: str) -> str:
    """The overridden keys with their values, ``key=value`` joined by ``sep``: the values as
    the composed config holds them (``optimizer.lr=1e12`` as ``1000000000000.0``), booleans
    as YAML's ``true``/``false`` (not Python's ``True``), None as ``null``."""

    def shown(v: HParamValue) -> str:
        return "null" if v is None else str(v).lower() if isinstance(v, bool) else str(v)

    return sep.join(f"{k}={shown(hparams.values[k])}" for k in hparams.overridden)


def _plugin_summary(tag: str, data: Any) -> Any:
    """A ``Summary`` holding hparams plugin data under ``tag``, as tensorboard's own writers
    make it."""
    from tensorboard.compat.proto.summary_pb2 import Summary
    from tensorboard.plugins.hparams import metadata

    value = Summary.Value(
        tag=tag, metadata=metadata.create_summary_metadata(data), tensor=metadata.NULL_TENSOR
    )
    return Summary(value=[value])


def start_summaries(
    hparams: RunHParams, metrics: Iterable[str] = METRICS, name: str | None = None
) -> list[Any]:
    """The experiment and session-start ``Summary`` protos for ``hparams``; ``metrics``: the
    run's scalars the HPARAMS tab shows (the task's, the monitored one first; then the other
    built-in tasks' :data:`TASK_METRICS`); ``name``: the session group's name (default:
    TensorBoard's hash of the values). A key whose value is None is left out of the session
    (an empty cell), and of the experiment where the schema declares no kind for it."""
    from tensorboard.plugins.hparams import api_pb2, metadata, plugin_data_pb2
    from tensorboard.plugins.hparams import summary_v2 as hp

    def dtype(kind: type) -> int:
        if kind is bool:
            return api_pb2.DATA_TYPE_BOOL
        return api_pb2.DATA_TYPE_FLOAT64 if kind in (int, float) else api_pb2.DATA_TYPE_STRING

    values, differs = hparams.values, set(hparams.overridden)
    kinds = {k: type(v) for k, v in values.items() if v is not None}
    kinds.update({k: t for k, t in hparams.kinds.items() if values.get(k, 0) is None})
    order = sorted(kinds, key=lambda k: (k not in differs, k))  # the overridden ones first
    listed = list(dict.fromkeys([*metrics, *TASK_METRICS]))
    experiment = api_pb2.Experiment(
        hparam_infos=[
            api_pb2.HParamInfo(name=k, type=dtype(kinds[k]), differs=k in differs) for k in order
        ],  # fmt: skip
        metric_infos=[api_pb2.MetricInfo(name=api_pb2.MetricName(tag=t)) for t in listed],
        time_created_secs=time.time(),
    )
    data = plugin_data_pb2.HParamsPluginData(experiment=experiment)
    present = {k: v for k, v in values.items() if v is not None}
    return [
        _plugin_summary(metadata.EXPERIMENT_TAG, data),
        hp.hparams_pb(present, trial_id=name, start_time_secs=time.time()),
    ]


def end_summary(completed: bool) -> Any:
    """The session-end ``Summary`` proto: success or failure."""
    from tensorboard.plugins.hparams import api_pb2, metadata, plugin_data_pb2

    info = plugin_data_pb2.SessionEndInfo(
        status=api_pb2.STATUS_SUCCESS if completed else api_pb2.STATUS_FAILURE,
        end_time_secs=time.time(),
    )
    data = plugin_data_pb2.HParamsPluginData(session_end_info=info)
    return _plugin_summary(metadata.SESSION_END_INFO_TAG, data)


def _frames(data: bytes) -> tuple[list[tuple[int, int]], int]:
    """The TFRecord frames of an event file's bytes, as (start, end) of each whole record
    (length, its checksum, the data, its checksum), and where the last whole one ends (a
    killed writer may leave a partial record after it)."""
    frames, pos = [], 0
    while pos + 12 <= len(data):
        (n,) = struct.unpack_from("<Q", data, pos)
        end = pos + 12 + n + 4
        if end > len(data):
            break
        frames.append((pos, end))
        pos = end
    return frames, pos


def _rewrite(
    directory: Path, names: tuple[bytes, ...], drop: Any, skip: Path | None = None
) -> list[Path]:
    """Rewrite each event file in ``directory`` (but ``skip``) holding one of ``names``
    without the records ``drop(event)`` selects (only records holding a name are decoded),
    atomically, its other records byte for byte and its mode kept; returns the files
    changed."""
    from tensorboard.compat.proto.event_pb2 import Event

    changed = []
    for path in sorted(directory.glob("events.out.tfevents.*")):
        if skip is not None and path.name == skip.name:
            continue
        data = path.read_bytes()
        if not any(name in data for name in names):  # (most files: none to drop)
            continue
        frames, whole = _frames(data)

        def dropped(record: bytes) -> bool:
            return any(name in record for name in names) and drop(Event.FromString(record))

        kept = [data[a:b] for a, b in frames if not dropped(data[a + 12 : b - 4])]
        if len(kept) == len(frames):
            continue
        _replace(path, b"".join(kept) + data[whole:])
        changed.append(path)
    return changed


def _replace(path: Path, content: bytes) -> None:
    """Replace the file at ``path`` by ``content`` atomically, its mode kept."""
    # (a name without "tfevents": TensorBoard does not read a leftover one)
    fd, temporary = tempfile.mkstemp(prefix=".rewrite-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(content)
            f.flush()
            os.fsync(f.fileno())
        # (mkstemp's file is its owner's alone: a TensorBoard run by another user lost the
        # earlier steps of a resumed run, a probe)
        with contextlib.suppress(OSError):  # (a file system without modes)
            os.chmod(temporary, stat.S_IMODE(path.stat().st_mode))
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise


def drop_events_from(directory: Path, step: int, skip: Path | None = None) -> list[Path]:
    """Take the events at ``step`` and later out of the event files in ``directory`` (but
    ``skip``), the HPARAMS records kept, each file rewritten atomically with its other records
    byte for byte; returns the files changed. What a failed or killed attempt wrote past the
    checkpoint a resume continues from (or past the rest point a fit called again trains
    from), which the new attempt writes again: TensorBoard's ``SessionLog.START`` purge
    (written too) was not enough, its default data server (RustBoard) ignoring it and its
    Python reader ignoring a run's first one, so the failed attempt's points stayed beside
    the new ones, steps twice and a curve going back (a probe's). Each record's step is read
    off its bytes (no record decoded); files with no step at or past ``step`` are left as
    they are."""
    changed = []
    for path in sorted(directory.glob("events.out.tfevents.*")):
        if skip is not None and path.name == skip.name:
            continue
        data = path.read_bytes()
        frames, whole = _frames(data)
        kept = [
            (a, b)
            for a, b in frames
            if _step_of(data, a + 12) < step
            or HPARAMS_PREFIX in data[a + 12 : b - 4]
            or _is_version(data, a + 12)
        ]
        if len(kept) == len(frames):
            continue
        _replace(path, b"".join(data[a:b] for a, b in kept) + data[whole:])
        changed.append(path)
    return changed


#: the HPARAMS plugin's tags (experiment, session start and end records) begin so
HPARAMS_PREFIX = b"_hparams_/"


def _step_of(data: bytes, pos: int) -> int:
    """The ``step`` of the serialized ``Event`` at ``pos``: its fields in number order,
    ``wall_time`` (field 1, a double: tag 0x09, 8 bytes) then ``step`` (field 2, a varint:
    tag 0x10); absent, 0."""
    if data[pos : pos + 1] == b"\x09":
        pos += 9
    if data[pos : pos + 1] != b"\x10":
        return 0
    value, shift = 0, 0
    while True:
        pos += 1
        byte = data[pos]
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            break
        shift += 7
    return value - (1 << 64) if value >= 1 << 63 else value


def _is_version(data: bytes, pos: int) -> bool:
    """Whether the serialized ``Event`` at ``pos`` is a file's version record (its first:
    ``wall_time``, then ``file_version``, field 3, a string: tag 0x1a), which has no step
    (read as 0) and is kept whatever the step dropped from."""
    if data[pos : pos + 1] == b"\x09":
        pos += 9
    return data[pos : pos + 1] == b"\x1a"


def _session_start_values(summary: Any) -> Any:
    """The hparams map of a session-start ``Summary`` (or event summary) value, or None."""
    from tensorboard.plugins.hparams import metadata

    for v in summary.value:
        if v.tag == metadata.SESSION_START_INFO_TAG:
            return metadata.parse_session_start_info_plugin_data(v.metadata.plugin_data.content)
    return None


def start_state(directory: Path, summaries: list[Any]) -> str:
    """Whether the event files in ``directory`` hold a session start with the hyperparameters
    of ``summaries`` (from :func:`start_summaries`): ``"same"``, ``"differs"`` (a run resumed
    with a longer ``trainer.max_steps``: HPARAMS showed the first process's values, as
    TensorBoard keeps a tag's first record) or ``"none"``."""
    from tensorboard.compat.proto.event_pb2 import Event
    from tensorboard.plugins.hparams import metadata

    new = next(i for i in map(_session_start_values, summaries) if i is not None)
    name = metadata.SESSION_START_INFO_TAG.encode()
    found = "none"
    for path in sorted(directory.glob("events.out.tfevents.*")):
        data = path.read_bytes()
        if name not in data:
            continue
        frames, _ = _frames(data)
        for a, b in frames:
            record = data[a + 12 : b - 4]
            if name in record:
                old = _session_start_values(Event.FromString(record).summary)
                if old is not None:
                    if dict(old.hparams) != dict(new.hparams):
                        return "differs"
                    found = "same"
    return found


def replace_start(directory: Path, summaries: list[Any], keep: Path) -> None:
    """Take the experiment and session-start records out of the event files in
    ``directory`` but ``keep`` (the resumed run's own, which holds ``summaries``, handed to
    the OS already: a crash between the two leaves both, and the first shows until the next
    resume, never neither; a review)."""
    from tensorboard.plugins.hparams import metadata

    start, experiment = metadata.SESSION_START_INFO_TAG, metadata.EXPERIMENT_TAG

    def stale(event: Any) -> bool:  # every start and experiment record but ``keep``'s (a
        # crash between the two steps left one with the same values, a review: a duplicate)
        return any(v.tag in (start, experiment) for v in event.summary.value)

    _rewrite(directory, (start.encode(), experiment.encode()), stale, skip=keep)


def drop_end_status(directory: Path) -> list[Path]:
    """Take the session-end records (the status a run had when a process of it stopped) out
    of the event files in ``directory``, each file rewritten atomically with its other records
    byte for byte; returns the files changed.

    A run resumed in its own folder writes its own end status when it stops; TensorBoard keeps
    the first record of a tag, so a run that failed and was resumed to completion showed
    ``STATUS_FAILURE`` in HPARAMS. Called before the resumed run writes (the record it drops is
    the earlier process's status, superseded; its events stay). Files without the tag are not
    parsed; frames are cut by their lengths, and only records holding the tag's name are
    decoded (a 10 MB file: milliseconds)."""
    from tensorboard.plugins.hparams import metadata

    tag = metadata.SESSION_END_INFO_TAG
    return _rewrite(directory, (tag.encode(),),
                    lambda event: any(v.tag == tag for v in event.summary.value))  # fmt: skip


#: an integer as the older records wrote it: text
_INT_TEXT = re.compile(r"-?[0-9]+")


#: how much later than its run's ``metrics.json`` an event file may have been written and still
#: be of the process that wrote it (a run's last events and its metrics are written within a
#: second of each other; a resumed run's file grows for as long as it trains)
SETTLED_S = 60.0


def _unsettled(event_file: Path, first: float, last: float) -> str:
    """Why a process may still be writing ``event_file`` ("" where none can), whose first and
    last events were written at wall times ``first`` and ``last``: its run has no
    ``metrics.json`` (a run writes it as it ends), or the file was begun after it (a process
    of the run resumed since: each writes a file of its own) or written to after it. Rewritten
    under a process that writes it, the file is replaced by a new one while the process goes
    on writing into the old, gone from the folder: every event from then on lost (a probe's).
    The events' own times, not the file's: a file rewritten since (by an earlier migration, a
    copy) is not taken for one being written (a review's)."""
    run = next((f.parent for f in event_file.parents if f.name == "tb"), None)
    if run is None:
        return ""
    metrics = run / "metrics.json"
    if not metrics.is_file():
        return ("no metrics.json: the run may still be writing this file (or was killed); "
                "once no process writes it, run again with --unfinished")  # fmt: skip
    ended = metrics.stat().st_mtime
    if first > ended or last > ended + SETTLED_S:
        return ("written after the run's metrics.json: a resumed run may still be writing "
                "it; once no process writes it, run again with --unfinished")  # fmt: skip
    return ""


def _event_files(root: Path) -> list[Path]:
    """The event files under ``root``, through symlinked folders too (TensorBoard follows
    them: ``rglob`` did not, and such a run was neither rewritten nor listed, a probe's),
    each real file once."""
    found: dict[Path, Path] = {}
    seen: set[Path] = set()
    for folder, dirs, files in os.walk(root, followlinks=True):
        real = Path(folder).resolve()
        if real in seen:  # (a link back up: walked once)
            dirs[:] = []
            continue
        seen.add(real)
        for name in files:
            if name.startswith("events.out.tfevents."):
                found.setdefault((real / name).resolve(), Path(folder) / name)
    return sorted(found.values())


def migrate(root: Path, unfinished: bool = False) -> tuple[list[Path], list[tuple[Path, str]]]:
    """Rewrite the HPARAMS records of the runs under ``root`` written before 2026-12-07, when
    integers were text ("64"), a None was "none" and a run listed its own task's metrics
    only, to what is written since (integers as numbers, a None left out: :func:`_value`;
    every built-in task's metrics, :data:`TASK_METRICS`); returns the files changed, and
    those left as they are with why. A file a process may still be writing is left
    (:func:`_unsettled`) unless ``unfinished``. A logdir holding runs of both had two kinds of
    value in a column, and TensorBoard refused the table's sorting and filtering by it (a review's).
    Each value is decided by the run's own config (:func:`_run_config`), never guessed (text
    that reads as an integer may be text: ``trainer.precision`` is "32"): a text value whose
    config value is an integer becomes a number, one whose config value is None is left out
    (its column in the experiment record typed by the chosen option's schema, or left out
    where it declares none). Group choices stay text. A file that cannot be read or
    rewritten is left, with its error, and the others are migrated. Files are rewritten
    atomically, their other records byte for byte; running it again changes nothing."""
    changed: list[Path] = []
    left: list[tuple[Path, str]] = []
    for path in _event_files(Path(root)):
        try:
            why = _migrate_file(path, unfinished)
        except Exception as e:  # noqa: BLE001 (named, and the others migrated)
            why = f"{type(e).__name__}: {e}"
        if why is None:
            changed.append(path)
        elif why:
            left.append((path, why))
    return changed, left


def _migrate_file(path: Path, unfinished: bool = False) -> str | None:
    """:func:`migrate` of one event file: None where it was rewritten, "" where it needs
    nothing, else why it is left as it is."""
    from tensorboard.compat.proto.event_pb2 import Event
    from tensorboard.plugins.hparams import api_pb2, metadata, plugin_data_pb2

    from trainer.logger import tfrecord

    start, experiment = metadata.SESSION_START_INFO_TAG, metadata.EXPERIMENT_TAG
    data = path.read_bytes()
    if start.encode() not in data and experiment.encode() not in data:
        return ""
    frames, whole = _frames(data)
    events = {}  # frame index -> (event, its value, its plugin data)
    for i, (a, b) in enumerate(frames):
        record = data[a + 12 : b - 4]
        if HPARAMS_PREFIX not in record:
            continue
        event = Event.FromString(record)
        for v in event.summary.value:
            if v.tag in (start, experiment):
                plugin = plugin_data_pb2.HParamsPluginData.FromString(
                    v.metadata.plugin_data.content
                )
                events[i] = (event, v, plugin)
    starts = [p.session_start_info.hparams for _, v, p in events.values() if v.tag == start]
    texts = [k for h in starts for k in h if h[k].WhichOneof("kind") == "string_value"
             and k not in GROUPS and (h[k].string_value == "none"
                                      or _INT_TEXT.fullmatch(h[k].string_value))]  # fmt: skip
    # a run built in Python listed no group before 2026-12-07; one written since lists them
    # all (empty text columns, the regularizers' names read off its config): the migrated
    # record listed none, and where TensorBoard took it for a logdir's columns the
    # command-line runs' choices were in none (a probe's)
    groupless = [h for h in starts if not any(g in h for g in GROUPS)]
    config, why = _run_config(path) if texts or groupless else ({}, "")
    if config is None:
        return why
    for hparams in groupless:
        names = list(config.get("regularizer") or {})
        hparams["regularizer"].string_value = "+".join(names) if names else "none"
    numbers: set[str] = set()
    gone: set[str] = set()
    choices: dict[str, str] = {}
    for hparams in starts:
        choices.update({g: hparams[g].string_value for g in GROUPS if g in hparams})
        for key in list(hparams):
            kind = _migrated_kind(key, hparams[key], config)
            if kind == "number":
                hparams[key].number_value = int(hparams[key].string_value)
                numbers.add(key)
            elif kind == "gone":
                del hparams[key]
                gone.add(key)
    missing = False
    for _event, v, plugin in events.values():
        if v.tag == experiment:
            listed = [m.name.tag for m in plugin.experiment.metric_infos]
            extra = [t for t in TASK_METRICS if t not in listed]
            missing = missing or bool(extra)
            plugin.experiment.metric_infos.extend(
                api_pb2.MetricInfo(name=api_pb2.MetricName(tag=t)) for t in extra
            )
            columns = {info.name for info in plugin.experiment.hparam_infos}
            if groupless and not columns & set(GROUPS):
                plugin.experiment.hparam_infos.extend(
                    api_pb2.HParamInfo(name=g, type=api_pb2.DATA_TYPE_STRING) for g in GROUPS
                )
                missing = True
            infos = []
            for info in plugin.experiment.hparam_infos:
                if info.name in gone:
                    declared = _schema_kind(info.name, choices, config)
                    if declared is None:
                        continue
                    info.type = {bool: api_pb2.DATA_TYPE_BOOL, float: api_pb2.DATA_TYPE_FLOAT64,
                                 str: api_pb2.DATA_TYPE_STRING}[declared]  # fmt: skip
                elif info.name in numbers:
                    info.type = api_pb2.DATA_TYPE_FLOAT64
                infos.append(info)
            del plugin.experiment.hparam_infos[:]
            plugin.experiment.hparam_infos.extend(infos)
    if not numbers and not gone and not missing and not groupless:
        return ""
    if not unfinished:
        times = [Event.FromString(data[a + 12 : b - 4]).wall_time
                 for a, b in (frames[0], frames[-1])]  # fmt: skip
        if busy := _unsettled(path, *times):
            return busy
    for _event, v, plugin in events.values():
        v.metadata.plugin_data.content = plugin.SerializeToString()
    parts = [
        tfrecord(events[i][0].SerializeToString()) if i in events else data[a:b]
        for i, (a, b) in enumerate(frames)
    ]
    # (a symlinked file's target: the link replaced by a copy left the target as it was, a
    # review's)
    _replace(path.resolve(), b"".join(parts) + data[whole:])
    return None


def _run_config(event_file: Path) -> tuple[dict | None, str]:
    """The config of the run an event file belongs to (the folder holding its ``tb/``), and
    why there is none: its ``.hydra/config.yaml``, resolved, else the resolved one its newest
    checkpoint that loads keeps (a run built in Python, an earlier run set aside in
    ``previous/``, a config whose interpolations do not resolve outside its sweep:
    ``${hydra:job.num}``; loaded with ``weights_only=True``, memory-mapped)."""
    import torch

    run = next((f.parent for f in event_file.parents if f.name == "tb"), None)
    if run is None:
        return None, "not in a run's tb/ folder"
    reasons = []
    found = run / ".hydra" / "config.yaml"
    if found.is_file():
        try:
            plain = OmegaConf.to_container(OmegaConf.load(found), resolve=True)
            if isinstance(plain, dict) and plain:
                return plain, ""
            # (an empty one was taken: every key absent, the run's integers left text and
            # the file said rewritten, a probe's)
            reasons.append(f"{found} holds no config (empty, or not a mapping)")
        except Exception as e:  # noqa: BLE001 (a resolver of its sweep's: the checkpoint's)
            reasons.append(f"{found} does not resolve here ({type(e).__name__}: {e})")
    else:
        reasons.append("no .hydra/config.yaml")
    kept = sorted((run / "checkpoints").glob("step_*.pt"))
    paths = [p for p in [run / "checkpoints" / "last.pt", *reversed(kept)] if p.is_file()]
    for path in paths:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:  # noqa: BLE001 (the next one; named if none loads)
            reasons.append(f"{path} does not load ({type(e).__name__}: {str(e)[:200]})")
            continue
        saved = state.get("config") if isinstance(state, dict) else None
        if isinstance(saved, dict):
            return saved, ""
        reasons.append(f"{path} holds no config")
    if not paths:
        reasons.append("no checkpoint")
    return None, "; ".join(reasons)


_ABSENT = object()


def _migrated_kind(key: str, value: Any, config: dict) -> str | None:
    """What an older record's value of ``key`` becomes: "number", "gone" (a None) or None
    (as it is)."""
    if value.WhichOneof("kind") != "string_value" or key in GROUPS:
        return None
    text = value.string_value
    node: Any = config
    for part in key.split("."):
        node = node.get(part, _ABSENT) if isinstance(node, dict) else _ABSENT
    if node is None or node is _ABSENT and text == "none" and key in KEY_VALUES:
        return "gone"  # (a listed key the config lacks was "none" too: left out now)
    now = _value(node, key) if node is not _ABSENT else None
    if isinstance(now, int) and not isinstance(now, bool) and _INT_TEXT.fullmatch(text):
        return "number"
    return None
