"""TensorBoard HPARAMS for a run: its hyperparameters next to its real final metrics.

Three events go into the run's own event file (``tb/``, no extra sub-run): the experiment
(which hyperparameters and metrics the HPARAMS tab shows), the session start (this run's
values) when training starts, and the session end (completed or failed) when it stops. The
metrics are not copied: TensorBoard's HPARAMS tab reads the last value of the run's own
``val/acc``, ``val/loss`` and ``train/loss`` scalars, so what it shows is what was logged.

The hyperparameters are the same keys for every job of a sweep, so the tab lists the jobs side
by side: the choice of each config group, a fixed set of key values (:data:`KEY_VALUES`), and
every key the command line overrides (in a sweep, the swept keys).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Mapping
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

#: the metrics the HPARAMS tab shows for a classification run, read from the run's scalars
#: (a run passes its task's own: trainer.losses.Loss.metrics)
METRICS = ("val/acc", "val/loss", "train/loss")
#: config groups whose choice is a hyperparameter (when the run was composed by Hydra)
GROUPS = (
    "experiment", "debug", "data", "model", "optimizer", "scheduler", "loss", "weighting",
    "regularizer", "instrument",
)  # fmt: skip
#: values logged for every run, overridden or not
KEY_VALUES = (
    "seed", "loss.mode", "data.batch_size", "optimizer.lr", "optimizer.weight_decay",
    "trainer.max_epochs", "trainer.max_steps", "trainer.precision", "trainer.grad_clip",
    "trainer.accumulate_grad_batches",
)  # fmt: skip

HParamValue = bool | float | str


def _value(v: Any) -> HParamValue:
    """A value TensorBoard can show: bool, number or string (None and containers as text)."""
    if isinstance(v, bool | int | float | str):
        return v
    if v is None:
        return "none"
    if isinstance(v, DictConfig | ListConfig):
        v = OmegaConf.to_container(v, resolve=True)
    return json.dumps(v, sort_keys=True, default=str)


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


def run_hparams(
    cfg: DictConfig, choices: Mapping[str, Any] | None = None, overrides: Iterable[str] = ()
) -> dict[str, HParamValue]:
    """The run's hyperparameters: group choices, :data:`KEY_VALUES`, overridden keys.

    ``choices`` is Hydra's ``hydra.runtime.choices`` (group -> chosen option) and
    ``overrides`` its ``hydra.overrides.task``; without them (a run built in Python) only
    :data:`KEY_VALUES` are reported.
    """
    choices = dict(choices or {})
    out: dict[str, HParamValue] = {}
    for group in GROUPS if choices else ():  # all of them, so every job has the same keys
        out[group] = _value(choices.get(group))
    for key in KEY_VALUES:
        out[key] = _value(OmegaConf.select(cfg, key, default=None))
    for key in override_keys(overrides):
        out[key] = _value(choices[key] if key in choices else OmegaConf.select(cfg, key))
    return out


def hydra_hparams(cfg: DictConfig) -> dict[str, HParamValue]:
    """:func:`run_hparams` with the current Hydra job's choices and overrides, if any."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return run_hparams(cfg)
    hc = HydraConfig.get()
    return run_hparams(cfg, hc.runtime.choices, hc.overrides.task)


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
    hparams: Mapping[str, HParamValue], metrics: Iterable[str] = METRICS
) -> list[Any]:
    """The experiment and session-start ``Summary`` protos for ``hparams``; ``metrics``: the
    run's scalars the HPARAMS tab shows (the task's, the monitored one first)."""
    from tensorboard.plugins.hparams import api_pb2, metadata, plugin_data_pb2
    from tensorboard.plugins.hparams import summary_v2 as hp

    def dtype(v: HParamValue) -> int:
        if isinstance(v, bool):
            return api_pb2.DATA_TYPE_BOOL
        return api_pb2.DATA_TYPE_FLOAT64 if isinstance(v, int | float) else api_pb2.DATA_TYPE_STRING

    experiment = api_pb2.Experiment(
        hparam_infos=[api_pb2.HParamInfo(name=k, type=dtype(hparams[k])) for k in sorted(hparams)],
        metric_infos=[api_pb2.MetricInfo(name=api_pb2.MetricName(tag=t)) for t in metrics],
        time_created_secs=time.time(),
    )
    data = plugin_data_pb2.HParamsPluginData(experiment=experiment)
    return [
        _plugin_summary(metadata.EXPERIMENT_TAG, data),
        hp.hparams_pb(dict(hparams), start_time_secs=time.time()),
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
