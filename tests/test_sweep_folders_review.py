"""A review of 2026-12-07's sweep-folder and allow_unmatched changes."""

from __future__ import annotations

import logging

import pytest
from test_sweep_folders import _job, _sweep
from torch import nn
from torch.nn.utils import prune

from trainer import report
from trainer.regularizers import Regularizer


def test_job_folders_nested_below_a_numbered_folder_are_found(tmp_path) -> None:
    """``hydra.sweep.subdir=${seed}/lr${optimizer.lr}`` over ``seed=0,1``: each job's folder
    is ``<seed>/lr0.001``, below a folder named by a plain number (what a real sweep leaves:
    ``scripts/train.py -m 'hydra.sweep.subdir=${seed}/lr${optimizer.lr}' seed=0,1``). The
    sweep dir's numbered subfolders are taken as job folders and never looked into: both
    completed jobs are listed as ``missing`` ("no metrics.json yet"), and the sweep's summary
    says "2 of 2 jobs did not complete (2 missing)" and exits 1."""
    root = tmp_path / "sweep"
    _sweep(root, "this", ["seed=0,1"])
    (root / "multirun.yaml").write_text(
        (root / "multirun.yaml")
        .read_text()
        .replace("${hydra.job.num}", "${seed}/lr${optimizer.lr}")
    )
    for seed in ("0", "1"):
        job = [f"seed={seed}"]
        _job(root, f"{seed}/lr0.001",
             {"status": "completed", "step": 1, "epoch": 0, "wall_s": 1.0, "monitor": "val/acc",
              "val/acc": 0.2, "val/loss": 2.2, "train/loss": 2.3, "overrides": job,
              "sweep_id": "this"}, job)  # fmt: skip
    runs = report.collect_runs(root, curves=False)
    rows, count = report.not_started(root, runs)
    assert [(r.name, r.status) for r in [*runs, *rows]] == [
        ("0/lr0.001", "completed"),
        ("1/lr0.001", "completed"),
    ]
    assert count == 0


def _model() -> nn.Sequential:
    return nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))


def test_allow_unmatched_does_not_let_a_pattern_that_matched_lose_its_match_mid_run() -> None:
    """``exclude=["2.weight", "*norm*"]`` with ``allow_unmatched=true`` (for the preset's
    ``*norm*``, which this model has none of): ``2.weight`` matched when the run started;
    pruning registered mid-run renames it ``2.weight_orig`` and the trainer selects again
    (``empty_ok=True``). Without allow_unmatched that is refused (the head meant to be left
    out was regularized from there, a review's); with it, the lost match is a warning and the
    head is regularized from there on, though allow_unmatched is for a shared preset's
    pattern that names other models' parameters, not for a pattern that matched this one."""
    m = _model()
    r = Regularizer("l2", 1.0, exclude=["2.weight", "*norm*"], allow_unmatched=True).bind(m)
    assert r.names == ["0.weight"]
    prune.identity(m[2], "weight")
    with pytest.raises(ValueError, match=r"\['2.weight'\] matches no parameter of the model "
                       r"since the model's parameters changed mid-run"):  # fmt: skip
        r.bind(m, empty_ok=True)
    assert r.names == ["0.weight"]


def test_a_pattern_that_never_matched_is_not_said_to_be_lost_to_a_mid_run_rename(caplog) -> None:
    """A preset's ``exclude=["*norm*"]`` allowed on a model without norm layers: it matched
    nothing when the run started. When the trainer selects again mid-run (a layer unfrozen,
    nothing renamed), the warning says it matches nothing "since the model's parameters
    changed mid-run (renamed: prune's weight_orig, ...)": a rename that did not happen."""
    m = _model()
    r = Regularizer("l2", 1.0, exclude=["*norm*"], allow_unmatched=True).bind(m)
    m[0].weight.requires_grad_(False)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="trainer.regularizers"):
        r.bind(m, empty_ok=True)
    said = [rec.getMessage() for rec in caplog.records]
    assert len(said) == 1 and said[0].startswith("regularizer.l2.exclude: ['*norm*'] matches")
    assert "changed mid-run" not in said[0], said[0]


def test_a_jobs_own_previous_folder_is_not_listed_as_a_job_of_the_sweep(tmp_path) -> None:
    """``hydra.sweep.subdir=lr${optimizer.lr}`` with ``hydra.output_subdir=null`` (no
    ``.hydra/``): job ``lr0.01`` resumed a checkpoint of another folder and is training
    there; its own folder holds ``continued.json``, its log and, in ``previous/1``, an
    earlier attempt's outputs that the job set aside (a failed result). The nested search
    descends into the job's folder, which it does not take for a run dir, and lists
    ``lr0.01/previous/1``, the set-aside attempt, as a job of the sweep, failed."""
    import json

    root = tmp_path / "sweep"
    _sweep(root, "this", ["optimizer.lr=0.01"])
    (root / "multirun.yaml").write_text(
        (root / "multirun.yaml").read_text().replace("${hydra.job.num}", "lr${optimizer.lr}")
    )
    folder = root / "lr0.01"
    (folder / "previous" / "1" / "tb").mkdir(parents=True)
    (folder / "previous" / "1" / "metrics.json").write_text(json.dumps(
        {"status": "failed", "error": "RuntimeError: an earlier attempt", "step": 3,
         "overrides": ["optimizer.lr=0.01"], "sweep_id": "this"}))  # fmt: skip
    home = tmp_path / "elsewhere"
    home.mkdir()
    (folder / "continued.json").write_text(
        json.dumps({"run_dir": str(home), "job_dir": str(folder)})
    )
    (folder / "train.log").write_text("")
    runs = report.collect_runs(root, curves=False)
    assert all("previous" not in r.name for r in runs), [(r.name, r.status) for r in runs]


def test_an_optuna_trial_refused_in_another_trials_folder_is_counted_as_failed(
    tmp_path, caplog
) -> None:
    """An Optuna sweep (in this process, the basic launcher) whose subdir gives two trials one
    folder: trial 1 is refused (``_refuse_another_jobs_folder``), and this process records
    it in ``_failed_here``, with its error, as it does for a basic sweep, whose summary says
    "1 of 2 jobs failed". Where the sweeper's plan lists no jobs (Optuna: counted from
    ``n_trials``) the refusal is not looked at: the summary says "1 of 2 jobs did not
    complete (1 not started)" for a trial that ran and was refused (what a real
    ``hparams_search=digits_optuna hydra.sweeper.n_trials=2 hydra.sweep.subdir=one`` sweep
    says), though the log line above it says it failed."""
    import json

    import yaml

    from trainer import sweep
    from trainer.report import _job as job_key

    root = tmp_path / "sweep"
    root.mkdir()
    optuna = "hydra_plugins.hydra_optuna_sweeper.optuna_sweeper.OptunaSweeper"
    hydra = {"mode": "MULTIRUN", "sweeper": {"_target_": optuna, "n_trials": 2},
             "overrides": {"task": []}, "sweep": {"subdir": "one"}}  # fmt: skip
    (root / "multirun.yaml").write_text(yaml.safe_dump({"hydra": hydra}))
    (root / ".sweep.json").write_text(json.dumps({"sweep_id": "this"}))
    first, second = ["optimizer.lr=0.002"], ["optimizer.lr=0.004"]
    _job(root, "one", {"status": "completed", "step": 1, "epoch": 0, "wall_s": 1.0,
                       "monitor": "val/acc", "val/acc": 0.2, "val/loss": 2.2,
                       "train/loss": 2.3, "overrides": first, "sweep_id": "this"},
         second)  # (Hydra wrote the refused trial's .hydra/)  # fmt: skip
    sweep._failed_here.clear()
    sweep._failed_here[job_key(second)] = (1, "ConfigError: hydra.sweep.subdir: job 1's ...")
    summary = sweep.SweepSummary()
    summary._planned = 2
    try:
        with caplog.at_level(logging.INFO), pytest.raises(SystemExit):
            summary._summarize(root, stopped=False)
    finally:
        sweep._failed_here.clear()
    said = [rec.getMessage() for rec in caplog.records if "sweep finished" in rec.getMessage()]
    assert len(said) == 1 and said[0].startswith("sweep finished: 1 of 2 jobs failed;"), said


def test_allow_unmatched_is_no_hyperparameter() -> None:
    """``allow_unmatched`` does not change what is trained (it is left out of the run's
    identity for that reason, and a resume may toggle it), but the HParams record lists it
    as a hyperparameter (``NOT_HPARAMS``: "config keys that do not change what is trained"
    has ``trainer.find_unused_parameters``, left out of the identity for the same reason, but
    not this key): every l2/l1/orthogonal run gets an ``allow_unmatched`` column, and a run
    that sets it gets ``regularizer.l2.allow_unmatched=true`` in its event folder's name and
    session group, as if it were another point of the sweep."""
    from trainer.hparams import is_hparam

    assert not is_hparam("regularizer.l2.allow_unmatched")
