"""The HPARAMS record a run started from Python writes (a probe's finding, 2026-12-07)."""

from __future__ import annotations

from conftest import BASE, make_cfg
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

from trainer.logger import event_dir
from trainer.run import run


def _hparams_records(run_dir) -> tuple[list[str], dict[str, object]]:
    acc = EventAccumulator(str(event_dir(run_dir)), size_guidance={"tensors": 0})
    acc.Reload()
    content = acc.PluginTagToContent("hparams")
    experiment = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"])
    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"])
    return [h.name for h in experiment.experiment.hparam_infos], dict(
        start.session_start_info.hparams
    )


def test_a_run_started_from_python_lists_its_config_groups_choices_in_hparams(tmp_path) -> None:
    """README: "TensorBoard takes one run's experiment record for the whole logdir (the first
    it finds), so every run lists every key it could override, not only those it did: the
    choice of each config group (`data`, `model`, `optimizer`, `scheduler`, `loss`,
    `weighting`, `regularizer` shown by name as `l2+orthogonal`, `instrument`, `experiment`,
    `debug`) ...". A run started with `trainer.run(cfg, run_dir)` (the documented Python
    entry point) lists none of them: where its record is the one TensorBoard picks, every
    CLI run of the logdir loses its `model`/`optimizer`/... columns, unsaid."""
    cfg = make_cfg(*BASE, "model=mlp", "optimizer=sgd", "regularizer=[l2]",
                   "trainer.max_steps=1", "trainer.max_epochs=1")  # fmt: skip
    run(cfg, run_dir=tmp_path)
    names, values = _hparams_records(tmp_path)
    groups = ["data", "model", "optimizer", "scheduler", "loss", "weighting", "regularizer",
              "instrument", "experiment", "debug"]  # fmt: skip
    assert [g for g in groups if g not in names] == []
    # the choices are not known (no Hydra): empty cells, but the regularizers', read off the
    # config
    assert [g for g in groups if g in values] == ["regularizer"]
    assert values["regularizer"].string_value == "l2"
