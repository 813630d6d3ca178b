"""trainer.hparams.migrate's leaving of files a process may still be writing, by the events'
own times, and a symlinked event file (a review's findings, 2026-12-08)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from conftest import StopAt, make_cfg, train
from omegaconf import OmegaConf
from test_sweeps import _older_run, _records


def _steps(run: Path, tag: str) -> list[int]:
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    return sorted(e.step for p in run.rglob("events.out.tfevents.*")
                  for e in EventFileLoader(str(p)).Load()
                  for v in e.summary.value if v.tag == tag)  # fmt: skip


def test_migrate_leaves_a_run_resumed_right_after_its_interrupted_attempt(tmp_path) -> None:
    """A real run stopped at step 1 (metrics.json: interrupted) and resumed at once by a
    process from before the upgrade (old-style HPARAMS records in a new event file, created
    after that metrics.json): the process is writing the file, yet it was written within
    SETTLED_S of the earlier attempt's metrics.json, so migrate takes it as settled, replaces
    it under its writer, and the writer's later events (step 3's train/loss) are lost."""
    from test_tensorboard_server import _older_record

    from trainer.hparams import migrate, run_hparams
    from trainer.logger import TensorBoardLogger, event_dir

    run = tmp_path / "run"
    with pytest.raises(SystemExit):  # (stopped: interrupted, checkpointed)
        train(run, "trainer.max_steps=3", "trainer.device=cpu", callbacks=[StopAt(1)])
    assert (run / "metrics.json").is_file()
    cfg = make_cfg("trainer.max_steps=3", "trainer.device=cpu")
    # the resumed process (old code): its own new event file in the run's event folder
    logger = TensorBoardLogger(event_dir(run), purge_step=2)
    for s in _older_record(run_hparams(cfg, {"model": "mlp"}).values):
        logger.add_summary(s, 0)
    logger.add_floats({"train/loss": 1.5}, 2)
    logger.flush()  # (on disk; the process still training)
    event = logger.file.path
    changed, left = migrate(tmp_path)
    logger.add_floats({"train/loss": 2.5}, 3)
    logger.close()
    assert 3 in _steps(run, "train/loss"), (
        f"the resumed writer's step 3 was lost: migrate rewrote its file under it "
        f"(changed={changed}, left={left})"
    )
    assert Path(event) in [p for p, _ in left]


def test_migrate_through_a_symlinked_event_file_rewrites_its_target(tmp_path) -> None:
    """An event file that is a symlink to a run's file kept elsewhere (TensorBoard reads it
    through the link): migrate reports it "rewritten", but it replaces the link by a new
    regular file and leaves the real file as it was (its integers still text); a folder link
    is rewritten in place, through the link."""
    from trainer.hparams import migrate

    cfg = make_cfg("trainer.max_steps=2")
    target = _older_run(tmp_path / "elsewhere" / "run", cfg)
    run = tmp_path / "outputs" / "run"
    (run / "tb" / "run").mkdir(parents=True)
    link = run / "tb" / "run" / target.name
    os.symlink(target, link)
    (run / "metrics.json").write_text('{"status": "completed"}')
    (run / ".hydra").mkdir()
    OmegaConf.save(cfg, run / ".hydra" / "config.yaml")
    changed, left = migrate(tmp_path / "outputs")
    assert changed == [link] and left == []
    assert os.path.islink(link), "the symlink was replaced by a copy"
    assert _records(target)["start"]["seed"] == "number_value"


def test_a_file_the_earlier_migration_rewrote_is_not_taken_for_a_resumed_run(
    tmp_path, monkeypatch
) -> None:
    """A run with an empty ``.hydra/config.yaml`` beside its checkpoint: the migration before
    108e2be took the empty file as its config and rewrote the event file (metrics completed,
    integers left text; emulated here by that pass's ``_run_config``), an hour after the run
    ended. By the file's mtime, now that rewrite's, the run was taken for one resumed and
    still written -- no process has written it since the run ended; only the migration did:
    its events' own times say so."""
    from test_migrate_unfinished_and_linked_runs import older_run_with_an_empty_config

    import trainer.hparams as hparams

    run = tmp_path / "run"
    event = older_run_with_an_empty_config(run)
    with monkeypatch.context() as m:  # the earlier pass: the empty file taken as {}
        m.setattr(hparams, "_run_config", lambda path: ({}, ""))
        assert hparams.migrate(tmp_path) == ([event], [])
    later = (run / "metrics.json").stat().st_mtime + 3600  # (that pass, an hour after)
    os.utime(event, (later, later))
    assert _records(event)["start"]["seed"] == "string_value"
    changed, left = hparams.migrate(tmp_path)
    assert (changed, left) == ([event], []), left
    assert _records(event)["start"]["seed"] == "number_value"
