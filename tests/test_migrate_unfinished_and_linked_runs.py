"""scripts/migrate_hparams.py (trainer.hparams.migrate) on a researcher's mixed ``outputs/``:
a run still being written, a symlinked run folder, a run whose ``.hydra/config.yaml`` is empty
(a probe's findings, 2026-12-08)."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from conftest import make_cfg
from omegaconf import OmegaConf
from test_sweeps import _older_run, _records, older_python_run


def _save_config(run: Path, cfg) -> None:
    (run / ".hydra").mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, run / ".hydra" / "config.yaml")


def _steps(run: Path, tag: str) -> list[int]:
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    return sorted(e.step for p in run.rglob("events.out.tfevents.*")
                  for e in EventFileLoader(str(p)).Load()
                  for v in e.summary.value if v.tag == tag)  # fmt: skip


def test_migrate_does_not_lose_what_a_running_writer_writes_after_it(tmp_path) -> None:
    """A run still being written (its process started before the upgrade, its event file
    open): the migration replaces the file by a new one (os.replace), the writer goes on
    appending to the old, unlinked inode, and every event it writes from then on is lost
    (here step 2's train/loss). Nothing a user has may be lost: such a file should be left
    (listed, as a run without its final metrics.json) or its later events kept."""
    from test_tensorboard_server import _older_record

    from trainer.hparams import migrate, run_hparams
    from trainer.logger import TensorBoardLogger

    cfg = make_cfg("trainer.max_steps=2")
    run = tmp_path / "running"
    logger = TensorBoardLogger(run / "tb" / "run")
    for s in _older_record(run_hparams(cfg, {"model": "mlp"}).values):
        logger.add_summary(s, 0)
    logger.add_floats({"train/loss": 1.5}, 1)
    logger.flush()  # (on disk, the process still running: no metrics.json yet)
    _save_config(run, cfg)
    event = next(run.rglob("events.out.tfevents.*"))
    assert migrate(tmp_path) == ([], [(event, (
        "no metrics.json: the run may still be writing this file (or was killed); once no "
        "process writes it, run again with --unfinished"))])  # fmt: skip
    logger.add_floats({"train/loss": 2.5}, 2)
    logger.close()
    assert _steps(run, "train/loss") == [1, 2]
    assert _records(event)["start"]["seed"] == "string_value"  # (left as written)
    assert migrate(tmp_path, unfinished=True) == ([event], [])  # (its process ended)
    assert _records(event)["start"]["seed"] == "number_value"


def test_migrate_leaves_a_resumed_run_written_after_its_metrics(tmp_path) -> None:
    """A run ended once (its metrics.json) and resumed since, by code from before the
    upgrade: its file, written after the metrics, may be being written."""
    from trainer.hparams import SETTLED_S, migrate

    cfg = make_cfg("trainer.max_steps=2")
    run = tmp_path / "run"
    event = _older_run(run, cfg)
    _save_config(run, cfg)
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    times = [e.wall_time for e in EventFileLoader(str(event)).Load()]
    first, last = times[0], times[-1]
    metrics = run / "metrics.json"
    os.utime(metrics, (first - 1, first - 1))  # (the file begun after the run's end)
    assert migrate(tmp_path) == ([], [(event, (
        "written after the run's metrics.json: a resumed run may still be writing it; once "
        "no process writes it, run again with --unfinished"))])  # fmt: skip
    ended = max(first, last - SETTLED_S)  # (its last events within SETTLED_S of its end)
    os.utime(metrics, (ended, ended))
    assert migrate(tmp_path) == ([event], [])


def test_migrate_finds_a_run_behind_a_symlinked_folder(tmp_path) -> None:
    """``outputs/linked`` a symlink to a run kept elsewhere: TensorBoard follows it (its run
    list has the run), but the migration's ``rglob`` does not: the run is neither rewritten
    nor listed as left ("0 event file(s) rewritten, 0 left"), and its integer columns stay
    text beside the newer runs' numbers."""
    from tensorboard.backend.event_processing import io_wrapper

    from trainer.hparams import migrate

    cfg = make_cfg("trainer.max_steps=2")
    real = tmp_path / "elsewhere" / "run"
    event = _older_run(real, cfg)
    _save_config(real, cfg)
    outputs = tmp_path / "outputs"
    outputs.mkdir()
    os.symlink(real, outputs / "linked")
    shown = list(io_wrapper.GetLogdirSubdirectories(str(outputs)))
    assert any("linked" in d for d in shown), shown  # (TensorBoard lists it)
    changed, left = migrate(outputs)
    assert changed or left, "a run TensorBoard shows was neither migrated nor listed"
    assert _records(event)["start"]["seed"] == "number_value"


def test_a_migrated_python_built_record_has_the_group_columns_of_a_newer_one(tmp_path) -> None:
    """A run built from Python before 2026-12-07 listed no config groups (README: "until
    2026-12-07 it listed none, and where TensorBoard took its record the command-line runs'
    choices were in no column"); one written now lists them (empty text columns, the
    regularizers' names read off the config). The migration completes the older record's
    kinds and metrics but not its columns: where TensorBoard picks the migrated record, the
    command-line runs' choices (``model``, ``data``, ...) are still in no column, and its
    ``regularizer`` (``l2``) is missing."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from tensorboard.plugins.hparams import metadata

    from trainer.hparams import GROUPS, migrate, run_hparams, start_summaries

    cfg = make_cfg("trainer.max_steps=2", "regularizer=l2")
    hp = run_hparams(cfg)  # (built in Python: no choices)
    older = {k: v for k, v in hp.values.items() if k not in GROUPS}  # (as it was written)
    run = tmp_path / "py"
    event = older_python_run(run, cfg, older)
    assert migrate(tmp_path) == ([event], [])

    def columns(summary) -> set:
        return {i.name for i in metadata.parse_experiment_plugin_data(
            summary.value[0].metadata.plugin_data.content).hparam_infos}  # fmt: skip

    newer = columns(start_summaries(hp)[0])
    migrated = next(columns(e.summary) for e in EventFileLoader(str(event)).Load()
                    if any(v.tag == metadata.EXPERIMENT_TAG for v in e.summary.value))  # fmt: skip
    assert set(GROUPS) <= newer
    assert sorted(newer - migrated) == []
    records = _records(event)
    assert records["start"]["regularizer"] == "string_value"
    from tensorboard.plugins.hparams import plugin_data_pb2

    start = next(
        plugin_data_pb2.HParamsPluginData.FromString(v.metadata.plugin_data.content)
        for e in EventFileLoader(str(event)).Load() for v in e.summary.value
        if v.tag == metadata.SESSION_START_INFO_TAG
    ).session_start_info.hparams  # fmt: skip
    assert start["regularizer"].string_value == "l2"  # (as a run written today lists it)
    assert not (set(GROUPS) - {"regularizer"}) & set(start)  # (None: left out, as today)
    assert migrate(tmp_path) == ([], [])  # (a second pass changes nothing)


def older_run_with_an_empty_config(run: Path) -> Path:
    """An older run (:func:`_older_run`) whose ``.hydra/config.yaml`` is empty, its config in
    its checkpoint; returns its event file."""
    cfg = make_cfg("trainer.max_steps=2")
    event = _older_run(run, cfg)
    (run / ".hydra").mkdir()
    (run / ".hydra" / "config.yaml").write_text("")
    (run / "checkpoints").mkdir()
    torch.save({"config": OmegaConf.to_container(cfg, resolve=True)},
               run / "checkpoints" / "last.pt")  # fmt: skip
    return event


def test_an_empty_hydra_config_is_not_taken_as_the_runs_config(tmp_path) -> None:
    """A run whose ``.hydra/config.yaml`` is empty (a disk that filled up, a copy cut short)
    beside a checkpoint holding its config: the empty file loads as ``{}``, is taken as the
    run's config, every key is then absent from it, and the run is reported "rewritten"
    (its metrics completed) with its integers still text (``seed``: "0") -- neither migrated
    by its checkpoint's config nor listed as left, and a second pass says nothing of it."""
    from trainer.hparams import migrate

    event = older_run_with_an_empty_config(tmp_path / "run")
    changed, left = migrate(tmp_path)
    start = _records(event)["start"]
    assert (start["seed"], start["data.batch_size"]) == ("number_value", "number_value") or (
        event in [p for p, _ in left]
    ), (changed, left, start["seed"])


def test_the_scripts_unfinished_flag_migrates_a_run_without_its_metrics(tmp_path, capsys):
    """``scripts/migrate_hparams.py`` lists a run without ``metrics.json`` as left, and
    migrates it with ``--unfinished`` (a killed run's, once nothing writes it)."""
    import importlib.util

    from test_sweeps import MIGRATE

    spec = importlib.util.spec_from_file_location("migrate_hparams", MIGRATE)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    cfg = make_cfg("trainer.max_steps=2")
    run = tmp_path / "killed"
    event = _older_run(run, cfg)
    (run / "metrics.json").unlink()  # (killed: it never wrote them)
    _save_config(run, cfg)
    assert script.main([str(tmp_path)]) == 0
    assert capsys.readouterr().out.splitlines() == [
        f"left as written: {event}: no metrics.json: the run may still be writing this file (or "
        "was killed); once no process writes it, run again with --unfinished",
        "0 event file(s) rewritten, 1 left",
    ]  # fmt: skip
    assert script.main([str(tmp_path), "--unfinished"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        f"rewritten: {event}", "1 event file(s) rewritten, 0 left"]  # fmt: skip
    assert _records(event)["start"]["seed"] == "number_value"
