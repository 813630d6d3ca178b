"""Presets, sweepers, launchers, failure isolation and HPARAMS, through the real CLI.

Every experiment and debug preset runs as a user would start it (a subprocess of
``scripts/train.py``) with a tiny step budget; a 3-trial Optuna sweep and a 2-job joblib sweep
run on the CPU; a sweep with failing jobs keeps the others' outputs and exits non-zero.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import ROOT, in_background, make_cfg, train
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import api_pb2, metadata
from test_data_vision import _write_cifar, _write_mnist

from trainer.logger import event_dir
from trainer.loop import Callback

EXPERIMENTS = sorted(p.stem for p in (ROOT / "configs" / "experiment").glob("*.yaml"))
DEBUG = sorted(p.stem for p in (ROOT / "configs" / "debug").glob("*.yaml"))
VISION = {"fashion_mnist_cnn", "cifar10_resnet18"}


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    flags = [a for a in args if a.startswith("-")]
    overrides = [a for a in args if not a.startswith("-")]
    return subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "train.py"), *flags, "trainer.device=cpu",
         *overrides],
        cwd=ROOT, capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip


def jobs(sweep: Path) -> dict[int, Path]:
    """The sweep's job dirs by job number, in order."""
    return dict(sorted((int(d.name), d) for d in sweep.iterdir() if d.name.isdigit()))


def status(job: Path) -> dict:
    return json.loads((job / "metrics.json").read_text())


def test_the_presets_are_the_ones_documented() -> None:
    assert set(EXPERIMENTS) >= {"digits_scalar", "digits_vector", "digits_imbalanced_uniform",
                                "digits_imbalanced_class_balanced", "digits_imbalanced_focal",
                                *VISION}  # fmt: skip
    assert DEBUG == ["anomaly", "fast", "overfit"]


def _presets(path: Path):
    digits = [e for e in EXPERIMENTS if e not in VISION]
    sweep, debug = path / "sweep", path / "debug"  # one multirun each, a job per preset
    experiments = cli("-m", f"hydra.sweep.dir={sweep}", "trainer.max_steps=3",
                      "experiment=" + ",".join(digits))  # fmt: skip
    debugs = cli("-m", f"hydra.sweep.dir={debug}", "trainer.max_steps=3",
                 "debug=" + ",".join(DEBUG))  # fmt: skip
    return digits, (experiments, sweep), (debugs, debug)


@in_background(_presets)
def test_every_digits_experiment_and_debug_preset_runs_through_the_cli(background) -> None:
    digits, (proc, sweep), (debug_proc, debug) = background
    assert proc.returncode == 0, proc.stderr[-3000:]
    done = jobs(sweep)
    assert len(done) == len(digits)
    config = {}
    for job in done.values():
        assert status(job)["status"] == "completed" and status(job)["step"] == 3
        choice = yaml.safe_load((job / ".hydra" / "overrides.yaml").read_text())[-1]
        config[choice.split("=")[1]] = yaml.safe_load((job / ".hydra" / "config.yaml").read_text())
    assert config["digits_scalar"]["loss"]["mode"] == "scalar"
    assert config["digits_vector"]["loss"]["mode"] == "vector"
    assert config["digits_imbalanced_focal"]["weighting"]["gamma"] == 2.0
    assert config["digits_imbalanced_class_balanced"]["data"]["imbalance_ratio"] == 10
    assert debug_proc.returncode == 0, debug_proc.stderr[-3000:]
    assert [status(j)["status"] for j in jobs(debug).values()] == ["completed"] * len(DEBUG)


SKIP_CIFAR_MD5 = """\
# CIFAR-10's loader checks each file's md5 against the official archive's, which these tiny
# files cannot match; only that check becomes "the file exists" (see test_data_vision.py).
import os
import torchvision.datasets.cifar as tv_cifar
tv_cifar.check_integrity = lambda fpath, md5=None: os.path.isfile(fpath)
"""


def _vision(path: Path):
    root = path / "data"
    rng = np.random.default_rng(0)
    _write_mnist(root, "FashionMNIST", rng)
    _write_cifar(root, rng)
    shim = path / "shim"
    shim.mkdir()
    (shim / "sitecustomize.py").write_text(SKIP_CIFAR_MD5)
    env = {**__import__("os").environ, "PYTHONPATH": str(shim)}
    done = {}
    for name in ("fashion_mnist_cnn", "cifar10_resnet18"):  # single runs: the data group
        # differs, so a multirun's shared base config could not take data.root
        # float32: bfloat16 convolutions on a CPU without bf16 units take 3x as long (22 s)
        proc = cli(f"experiment={name}", f"hydra.run.dir={path / name}", f"data.root={root}",
                   "trainer.max_steps=2", "data.num_workers=0", "data.batch_size=8",
                   "trainer.precision=32", env=env)  # fmt: skip
        done[name] = (proc, path / name)
    return done


@in_background(_vision)
def test_the_vision_experiments_run_on_tiny_files_in_the_real_formats(background) -> None:
    done = {}
    for name, (proc, run_dir) in background.items():
        done[name] = run_dir
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert status(done[name])["status"] == "completed" and status(done[name])["step"] == 2
    cifar = yaml.safe_load((done["cifar10_resnet18"] / ".hydra" / "config.yaml").read_text())
    assert cifar["data"]["name"] == "cifar10" and "resnet" in cifar["model"]["_target_"].lower()
    assert cifar["data"]["augment"] is True
    assert make_cfg("experiment=cifar10_resnet18").trainer.precision == "bf16"  # the preset's


def test_overfit_drives_the_loss_of_one_batch_to_zero(tmp_path) -> None:
    cfg = make_cfg("debug=overfit", "trainer.max_epochs=150", "logging.progress=false")
    assert cfg.data.train_subset == cfg.data.batch_size == 64
    from trainer.run import run

    metrics = run(cfg, tmp_path)
    assert metrics["step"] == 150  # one batch per epoch
    assert metrics["train/loss"] < 0.02  # from ~2.3 (log 10)


def test_anomaly_preset_turns_on_detection_and_every_instrument(tmp_path) -> None:
    seen = []

    class Probe(Callback):
        def on_train_batch_start(self, trainer, batch) -> None:
            seen.append(torch.is_anomaly_enabled())

    cfg = make_cfg("debug=anomaly", "trainer.max_steps=2")
    assert cfg.trainer.detect_anomaly and cfg.logging.every_n_steps == 1
    for q in ("norms", "histograms", "per_sample", "curvature"):
        assert cfg.instrument[q].every_n_steps == 1, q
    train(tmp_path, "debug=anomaly", "trainer.max_steps=2", callbacks=[Probe()])
    assert seen == [True, True]
    assert not torch.is_anomaly_enabled()  # switched off again after the run


def _failing_sweep(path: Path):
    sweep = path / "sweep"
    proc = cli("-m", f"hydra.sweep.dir={sweep}", "trainer.max_steps=4",
               "optimizer.lr=0.01,-1,1e30,0.02")  # fmt: skip
    rep = subprocess.run([sys.executable, "scripts/report.py", str(sweep)], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    return proc, sweep, rep


@in_background(_failing_sweep)
def test_a_sweep_with_failing_jobs_keeps_the_others_and_says_how_many_failed(background) -> None:
    """A bad value (lr < 0, refused before training) and a NaN (lr 1e30, stopped by the
    non-finite guard) among good jobs: the good ones complete, the sweep exits 1 with a count."""
    proc, sweep, rep = background
    assert proc.returncode == 1
    out = proc.stdout + proc.stderr
    assert out.count("2 of 4 jobs failed") == 1  # (SystemExit's message printed it twice)
    done = jobs(sweep)
    assert [status(done[i])["status"] for i in range(4)] == [
        "completed", "failed", "failed", "completed"]  # fmt: skip
    assert "optimizer.lr" in status(done[1])["error"]
    assert status(done[2])["error"].startswith("NonFiniteError")
    for i in (0, 3):
        assert list(event_dir(done[i]).glob("events.out.tfevents.*"))
        assert (done[i] / "checkpoints" / "last.pt").is_file()
    # the report lists the failed jobs with the last line of their error
    assert rep.returncode == 0, rep.stderr
    assert rep.stdout.count("failed") >= 2 and "NonFiniteError" in rep.stdout


def session_hparams(run_dir: Path) -> tuple[dict, list[str], int]:
    """(hparams, metric tags, end status) of a run, from its own event file."""
    acc = EventAccumulator(str(event_dir(run_dir)))
    acc.Reload()
    contents = acc.PluginTagToContent(metadata.PLUGIN_NAME)
    start = metadata.parse_session_start_info_plugin_data(contents[metadata.SESSION_START_INFO_TAG])
    experiment = metadata.parse_experiment_plugin_data(contents[metadata.EXPERIMENT_TAG])
    end = metadata.parse_session_end_info_plugin_data(contents[metadata.SESSION_END_INFO_TAG])
    values = {}
    for k, v in start.hparams.items():
        kind = v.WhichOneof("kind")
        values[k] = getattr(v, kind)
    # (a None is an empty cell, typed in the experiment: the optimizers' fused and foreach)
    assert set(values) <= {i.name for i in experiment.hparam_infos}
    assert {i.name for i in experiment.hparam_infos} - set(values) <= {
        "optimizer.fused", "optimizer.foreach"}  # fmt: skip
    return values, [m.name.tag for m in experiment.metric_infos], end.status


def _optuna(path: Path):
    sweep = path / "optuna"
    proc = cli("-m", "hparams_search=digits_optuna", "hydra.sweeper.n_trials=3",
               "trainer.max_steps=5", f"hydra.sweep.dir={sweep}")  # fmt: skip
    return proc, sweep


@in_background(_optuna)
def test_optuna_sweep_of_three_trials_maximizes_val_acc(background) -> None:
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    proc, sweep = background
    assert proc.returncode == 0, proc.stderr[-3000:]
    done = jobs(sweep)
    assert sorted(done) == [0, 1, 2]
    accs = [status(j)["val/acc"] for j in done.values()]
    result = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert result["best_value"] == pytest.approx(max(accs))
    # the HPARAMS tab: the same keys for every trial, each with its sampled values
    params = [session_hparams(done[i])[0] for i in range(3)]
    assert all(p.keys() == params[0].keys() for p in params)
    assert {"optimizer.lr", "optimizer.weight_decay", "data.batch_size"} <= params[0].keys()
    lrs = [p["optimizer.lr"] for p in params]
    configs = [yaml.safe_load((done[i] / ".hydra" / "config.yaml").read_text()) for i in range(3)]
    assert lrs == [c["optimizer"]["lr"] for c in configs]
    assert len(set(lrs)) == 3


def _seeded_tpe(sweep: Path, lrs: str):
    """Two trials of a seeded TPE over ``optimizer.lr=choice(<lrs>)`` (the grid sampler would
    pick the order at random, and its end of the grid after a failed last trial is a crash of
    the plugin's own)."""
    proc = cli("-m", "hydra/sweeper=optuna", "hydra/sweeper/sampler=tpe",
               "hydra.sweeper.sampler.seed=0", "hydra.sweeper.direction=maximize",
               "hydra.sweeper.n_trials=2", "trainer.max_steps=2", f"optimizer.lr=choice({lrs})",
               f"hydra.sweep.dir={sweep}")  # fmt: skip
    return proc, sweep


def _optuna_with_a_failing_trial(path: Path):
    return _seeded_tpe(path / "optuna_fail", "-1.0,0.01")  # (lr 0.01, then -1)


@in_background(_optuna_with_a_failing_trial)
def test_an_optuna_sweep_records_a_failed_trial_and_goes_on(background) -> None:
    """A trial refused before training (lr -1): recorded as failed, the other trial runs and
    is the study's best; the sweep then exits 1 with the count. (A NaN returned for the failed
    job stopped the whole sweep: hydra-optuna-sweeper told optuna the NaN again with the
    failed state, which optuna refuses.)"""
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    proc, sweep = background
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1 and "1 of 2 jobs failed" in out, out[-3000:]
    done = jobs(sweep)
    assert sorted(status(j)["status"] for j in done.values()) == ["completed", "failed"]
    (good,) = [status(j) for j in done.values() if status(j)["status"] == "completed"]
    result = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert result["best_value"] == good["val/acc"]
    assert result["best_params"] == {"optimizer.lr": 0.01}
    assert status(done[1])["status"] == "failed"  # the last trial (it crashed the sweep)


def _optuna_where_every_trial_fails(path: Path):
    return _seeded_tpe(path / "optuna_all_fail", "-1.0,-2.0")


@in_background(_optuna_where_every_trial_fails)
def test_an_optuna_sweep_whose_every_trial_failed_still_says_which_and_why(background) -> None:
    """With no trial completed the plugin itself raises ("No trials are completed yet") and
    Hydra skips its end-of-sweep hook: the failures and their causes were not summed up (a
    README audit's finding). They are, at the exit, and the status is 1."""
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    proc, sweep = background
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out[-3000:]
    assert "No trials are completed yet" in out
    assert "sweep stopped before its end by the error above: 2 of 2 jobs failed" in out, out[-3000:]
    assert out.count("failed: ConfigError: optimizer.lr: got -") == 2, out[-3000:]
    for n in (0, 1):  # each job's line says whose (parallel jobs' lines interleave)
        assert f"job {n}: failed, the sweep goes on" in out, out[-3000:]


@pytest.mark.parametrize("value", [math.nan, -math.inf, math.inf])
def test_a_job_without_a_monitored_value_gives_a_sweep_none(monkeypatch, value) -> None:
    """In a multirun a completed job whose monitored metric is NaN (nothing was counted) or
    ±Inf (diverged: −Inf would win a minimizing sweep) returns None, which the Optuna
    sweeper records as a failed trial; a single run returns the value."""
    import importlib

    import trainer.sweep as sweep

    result = {"monitor": "val/loss", "val/loss": value, "status": "completed"}
    monkeypatch.setattr(importlib.import_module("trainer.run"), "run", lambda cfg: result)
    monkeypatch.setattr(sweep, "in_multirun", lambda: True)
    assert sweep.run_job(None) is None
    monkeypatch.setattr(sweep, "in_multirun", lambda: False)
    single = sweep.run_job(None)
    assert math.isnan(single) if math.isnan(value) else single == value


def test_a_jobs_python_warnings_are_logged_unless_recorded(monkeypatch) -> None:
    """A ``warnings.warn`` during a job (torch's, a library's, a model's own) went to stderr
    alone: not into the run's ``train.log``, and through the progress bar (a probe's). In a
    process that shows warnings plainly (the CLI's), a job logs them (``py.warnings``, one
    line, labelled as the job's lines are), under Python's filters as they are (a filter a
    library sets during a job stays: one that was undone showed later jobs what it hid, a
    review's), and puts Python's way back after, also where it fails; under a recorder
    (``catch_warnings(record=True)``, ``pytest.warns``) the warning is recorded, as it was,
    not logged (a review's)."""
    import importlib
    import warnings

    import trainer.sweep as sweep

    result = {"monitor": "val/loss", "val/loss": 0.5, "status": "completed"}

    def job(cfg):
        warnings.filterwarnings("ignore", "a library's noise")  # (as a library's import does)
        warnings.warn("a library's noise", UserWarning, stacklevel=1)
        warnings.warn(f"a model's own warning ({cfg})", UserWarning, stacklevel=1)
        if cfg == "fail":
            raise RuntimeError("a job's failure")
        return result

    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    plain: list[warnings.WarningMessage] = []

    def _showwarnmsg_impl(msg) -> None:  # (Python's own, as a plain process has it)
        plain.append(msg)

    monkeypatch.setattr(importlib.import_module("trainer.run"), "run", job)
    monkeypatch.setattr(sweep, "in_multirun", lambda: True)
    monkeypatch.setattr(sweep, "_job_label", lambda: "job 3: ")
    logging.getLogger().addHandler(handler)
    try:
        with warnings.catch_warnings():
            monkeypatch.setattr(warnings, "_showwarnmsg_impl", _showwarnmsg_impl)
            monkeypatch.setattr(warnings, "showwarning", warnings._showwarning_orig)
            warnings.simplefilter("always")
            assert sweep.run_job("ok") == 0.5
            assert sweep.run_job("fail") is None
            assert warnings.showwarning is warnings._showwarning_orig
            warnings.warn("after the jobs", UserWarning, stacklevel=1)  # (Python's way)
            warnings.warn("a library's noise", UserWarning, stacklevel=1)  # (still ignored)
        with warnings.catch_warnings(record=True) as recorded:
            warnings.simplefilter("always")
            assert sweep.run_job("recorded") == 0.5
    finally:
        logging.getLogger().removeHandler(handler)
    said = [r.getMessage() for r in records if r.name == "py.warnings"]
    assert len(said) == 2, said  # (each job's; none of the recorded one, nor the noise)
    assert all(m.startswith("job 3: ") and "\n" not in m for m in said), said
    assert "UserWarning: a model's own warning (ok)" in said[0]
    assert "UserWarning: a model's own warning (fail)" in said[1]
    assert [str(m.message) for m in plain] == ["after the jobs"]
    assert [str(m.message) for m in recorded] == ["a model's own warning (recorded)"]


def test_a_ranks_lines_other_than_the_firsts_are_labelled(monkeypatch) -> None:
    """Every rank writes into the run's one ``train.log``: a rank other than the first labels
    its lines while its job runs (once a line, whatever the handlers); the first, and a run of
    one process, do not."""
    import trainer.sweep as sweep

    seen: list[list[str]] = [[], []]
    handlers = [logging.Handler(), logging.Handler()]
    for h, out in zip(handlers, seen, strict=True):
        h.emit = lambda r, out=out: out.append(r.getMessage())  # type: ignore[method-assign]
        logging.getLogger().addHandler(h)
    try:
        for rank, size in ((1, 2), (0, 2), (0, 1)):
            monkeypatch.setenv("RANK", str(rank))
            monkeypatch.setenv("WORLD_SIZE", str(size))
            with sweep._rank_labelled():
                logging.getLogger("trainer.test").warning("a line of rank %d", rank)
        logging.getLogger("trainer.test").warning("after")
    finally:
        for h in handlers:
            logging.getLogger().removeHandler(h)
    want = ["rank 1: a line of rank 1", "a line of rank 0", "a line of rank 0", "after"]
    assert seen == [want, want]


def test_a_single_runs_refusal_is_one_line_unless_hydra_full_error(
    monkeypatch, capsys, caplog
) -> None:
    """A single run refused by the trainer exits with status 1 and the message on one line;
    with ``HYDRA_FULL_ERROR=1`` the error itself is raised (its traceback shown); in a
    multirun the job returns None (a failed trial) and the sweep goes on."""
    import importlib

    import trainer.sweep as sweep
    from trainer.config import ConfigError, validate

    # (the trainer's own check standing in for run(): a stand-in of the test's own would be
    # one's own code, whose traceback is kept)
    monkeypatch.setattr(importlib.import_module("trainer.run"), "run", validate)
    bad = make_cfg("trainer.max_epochs=-3")
    monkeypatch.setattr(sweep, "in_multirun", lambda: False)
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    with pytest.raises(SystemExit) as exited:
        sweep.run_job(bad)
    assert exited.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith("Error: trainer.max_epochs: got -3, must be >= 1\n"), err
    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")
    with pytest.raises(ConfigError, match="trainer.max_epochs: got -3"):
        sweep.run_job(bad)
    monkeypatch.setattr(sweep, "in_multirun", lambda: True)
    monkeypatch.delenv("HYDRA_FULL_ERROR")
    with caplog.at_level(logging.ERROR, logger="trainer.sweep"):
        assert sweep.run_job(bad) is None
    # (the message alone: its traceback through OmegaConf's frames was 40 lines, a probe's)
    (record,) = [r for r in caplog.records if r.name == "trainer.sweep"]
    assert record.getMessage() == (
        "job failed, the sweep goes on (its metrics.json says why): ConfigError: "
        "trainer.max_epochs: got -3, must be >= 1"
    )
    assert record.exc_info is None


def _joblib(path: Path):
    sweep = path / "joblib"
    proc = cli("-m", "hydra/launcher=parallel", "optimizer.lr=0.01,0.02", "trainer.max_steps=4",
               "logging.every_n_steps=1", "logging.progress_every_n_steps=2",
               "data.loader=dataloader", "data.num_workers=2",
               f"hydra.sweep.dir={sweep}")  # fmt: skip
    return proc, sweep


@in_background(_joblib)
def test_joblib_sweep_runs_two_jobs_side_by_side_with_labelled_progress(background) -> None:
    """(With DataLoader workers: inside joblib's loky processes they failed to start, "'Process'
    object has no attribute 'env'", a review's finding.)"""
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    proc, sweep = background
    assert proc.returncode == 0, proc.stderr[-3000:]
    done = jobs(sweep)
    # (the sweep's id, recorded by each job, in its own process: the report tells an earlier
    # sweep's job folders in a reused dir by it)
    sweep_id = json.loads((sweep / ".sweep.json").read_text())["sweep_id"]
    assert len(sweep_id) == 32
    for i, job in done.items():
        assert status(job)["status"] == "completed"
        assert status(job)["sweep_id"] == sweep_id
        log = (job / "train.log").read_text()
        # plain lines, labelled with the job, at steps 2 and 4: no bar redraws
        assert f"job {i}: step 2/4" in log and f"job {i}: step 4/4" in log and "\r" not in log
        # the epoch line and the summary say whose they are too (the jobs' lines interleave)
        assert f"job {i}: epoch 1/" in log and f"job {i}: done: " in log, log
    assert "\r" not in proc.stdout + proc.stderr


def _hparams_sweep(path: Path):
    sweep = path / "sweep"
    proc = cli("-m", f"hydra.sweep.dir={sweep}", "trainer.max_steps=3", "model=mlp,cnn",
               "optimizer.lr=0.01,1e30")  # fmt: skip
    return proc, sweep


@in_background(_hparams_sweep)
def test_hparams_are_in_the_run_dir_with_the_same_keys_and_the_end_status(background) -> None:
    proc, sweep = background
    assert proc.returncode == 1  # the two lr=1e30 jobs fail (NaN) but are in HPARAMS too
    done = jobs(sweep)
    seen = [session_hparams(done[i]) for i in range(4)]
    for job, (values, metrics, end) in zip(done.values(), seen, strict=True):
        # one event folder, named after the job's overrides, and no extra sub-run in it
        assert list((job / "tb").iterdir()) == [event_dir(job)]
        assert not [d for d in event_dir(job).iterdir() if d.is_dir()]
        folder = event_dir(job).name.split(",")
        assert "trainer.max_steps=3" in folder and f"model={values['model']}" in folder
        assert metrics == ["val/acc", "val/loss", "train/loss", "val/mse", "val/ppl",
                           "val/token_acc"]  # fmt: skip
        cfg = yaml.safe_load((job / ".hydra" / "config.yaml").read_text())
        assert values["optimizer.lr"] == cfg["optimizer"]["lr"]
        assert values["model"] in ("mlp", "cnn") and values["loss.mode"] == "scalar"
        ok = status(job)["status"] == "completed"
        assert end == (api_pb2.STATUS_SUCCESS if ok else api_pb2.STATUS_FAILURE)
    # the same keys for the jobs with the same components; a model's own keys are its own
    by_model: dict[str, set] = {}
    for v, _, _ in seen:
        by_model.setdefault(v["model"], set()).add(tuple(sorted(v)))
    (mlp,), (cnn,) = by_model["mlp"], by_model["cnn"]
    assert "model.channels" in cnn and "model.channels" not in mlp
    assert {k for k in mlp if not k.startswith("model.")} == {
        k for k in cnn if not k.startswith("model.")}  # fmt: skip
    assert [e for _, _, e in seen].count(api_pb2.STATUS_SUCCESS) == 2


def test_hparams_leave_out_loading_plumbing_and_spell_booleans_as_typed(tmp_path) -> None:
    """How batches are loaded (``data.loader``, ``data.eval_batch_size``) is plumbing, as a
    resume treats it, not a hyperparameter; a boolean override is named as the command line
    types it (``true``), not as Python prints it, in the event folder and the session group."""
    from trainer.hparams import overrides_text, run_hparams, run_name

    overrides = ["data.loader=dataloader", "data.eval_batch_size=32",
                 "instrument.norms.agreement=true", "optimizer.lr=0.01"]  # fmt: skip
    cfg = make_cfg(*overrides)
    hp = run_hparams(cfg, {"data": "digits", "model": "mlp"}, overrides)
    assert "data.loader" not in hp.values and "data.eval_batch_size" not in hp.values
    assert hp.values["instrument.norms.agreement"] is True  # (a bool in TensorBoard's table)
    assert overrides_text(hp, ",") == "instrument.norms.agreement=true,optimizer.lr=0.01"
    folder = tmp_path / "sweep" / "3"
    tag = hashlib.sha1(str(folder.resolve()).encode()).hexdigest()[:6]
    assert run_name(folder, hp) == (
        f"sweep/3 instrument.norms.agreement=true optimizer.lr=0.01 ({tag})"
    )
    assert run_name(folder, hp, 2) == (  # (its second run: #2)
        f"sweep/3#2 instrument.norms.agreement=true optimizer.lr=0.01 ({tag})"
    )
    # two sweeps' jobs alike by these names are told apart by their folders' tags (they made
    # one session group, the mean of their metrics: a probe's)
    assert run_name(tmp_path / "a" / "sweep" / "3", hp) != run_name(
        tmp_path / "b" / "sweep" / "3", hp
    )
    # a folder named with a digit that is not ASCII is a run's own name, not a job's number
    assert run_name(tmp_path / "sweep" / "²", hp).startswith("² ")


def _config_leaves(node, prefix=""):
    for k, v in node.items():
        if isinstance(v, dict):
            yield from _config_leaves(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


def test_hparams_list_the_trained_settings_not_the_plumbing() -> None:
    """README: every setting of the composed config that changes what is trained, not
    ``logging.*``, checkpoint, resume or data-loading plumbing, nor a component's ``_target_``
    or ``_partial_`` (the way it is built); without Hydra's choices (a run built in Python)
    the groups listed with no value (text columns: a record without them, picked by
    TensorBoard for a logdir, lost the command-line runs' columns, a probe's), but the
    regularizers' names, read off the config, and nothing marked as overridden."""
    from omegaconf import OmegaConf

    from trainer.hparams import GROUPS, run_hparams

    cfg = make_cfg("trainer.resume=auto", "trainer.checkpoint.keep_last=3")
    hp = run_hparams(cfg)
    leaves = dict(_config_leaves(OmegaConf.to_container(cfg, resolve=True)))
    plumbing = ("logging.", "trainer.checkpoint.", "trainer.resume", "data.loader",
                "data.num_workers")  # fmt: skip
    built = ("_target_", "_partial_")
    assert [k for k in leaves if k.startswith(plumbing)]  # (there are some to leave out)
    assert [k for k in leaves if k.endswith(built)]
    assert {"seed", "optimizer.lr", "trainer.max_steps", "data.batch_size"} <= set(hp.values)
    assert not [k for k in hp.values if k.startswith(plumbing) or k.endswith(built)]
    assert {g: hp.values[g] for g in GROUPS} == {
        **dict.fromkeys(GROUPS), "regularizer": "none"} and hp.overridden == []  # fmt: skip
    assert {g: hp.kinds[g] for g in GROUPS if g != "regularizer"} == dict.fromkeys(
        [g for g in GROUPS if g != "regularizer"], str)  # fmt: skip


def test_override_keys_leave_out_deletions_and_repeats() -> None:
    """A key set twice on the command line is one override (the last value); a deletion
    (``~key``) sets nothing: neither is named twice nor as ``key=none`` in the event folder's
    and the session group's name."""
    from trainer.hparams import override_keys, overrides_text, run_hparams

    overrides = ["optimizer.lr=0.1", "~regularizer", "optimizer.lr=0.2", "hydra.job.chdir=false"]
    assert override_keys(overrides) == ["optimizer.lr"]
    hp = run_hparams(make_cfg("optimizer.lr=0.2"), {"model": "mlp"}, overrides)
    assert hp.overridden == ["optimizer.lr"]
    assert overrides_text(hp, ",") == "optimizer.lr=0.2"


def test_the_experiment_lists_the_overridden_keys_first_marked_as_differing() -> None:
    """The HPARAMS tab lists and ticks the overridden keys first: the experiment record, read
    back with tensorboard's own parser, has them first (then the rest, each part sorted), with
    ``differs`` set on those alone."""
    from tensorboard.plugins.hparams import metadata

    from trainer.hparams import RunHParams, start_summaries

    hp = RunHParams({"a.x": 1.0, "b.y": "2", "z": True, "c": 0.5}, overridden=["z", "b.y"])
    experiment_summary, _ = start_summaries(hp, ["val/acc"], name="run")
    (value,) = experiment_summary.value
    assert value.tag == metadata.EXPERIMENT_TAG
    experiment = metadata.parse_experiment_plugin_data(value.metadata.plugin_data.content)
    infos = [(i.name, i.differs) for i in experiment.hparam_infos]
    assert infos == [("b.y", True), ("z", True), ("a.x", False), ("c", False)]
    # its own metrics first, then every built-in task's (a logdir of several tasks' runs)
    assert [m.name.tag for m in experiment.metric_infos] == [
        "val/acc", "val/loss", "train/loss", "val/mse", "val/ppl", "val/token_acc"]  # fmt: skip


def test_a_key_holds_one_kind_of_value_in_every_run() -> None:
    """The HPARAMS tab's filters and sorting fail on a column holding two kinds of values (a
    whole table request refused), which integers as text beside floats (``loss.delta=1,0.5``
    of one's own), and None as "none" beside booleans (``optimizer.fused=null,false``) made
    (a probe's). Integers are numbers (exact: float64 up to 2⁵³; beyond, text), a None is
    left out of the session (an empty cell) and typed in the experiment by the schema's
    declaration (an untyped key's is left out there too)."""
    from tensorboard.plugins.hparams import api_pb2, metadata

    from trainer.hparams import run_hparams, start_summaries

    overrides = ["optimizer.fused=null", "data.batch_size=32", "seed=9007199254740993",
                 "+model.scale=null"]  # fmt: skip
    hp = run_hparams(make_cfg(*overrides), {"model": "mlp"}, overrides)
    assert hp.values["data.batch_size"] == 32 and hp.values["seed"] == "9007199254740993"
    assert hp.values["optimizer.fused"] is None and hp.values["model.scale"] is None
    assert hp.kinds == {"optimizer.fused": bool, "optimizer.foreach": bool}
    experiment_summary, start_summary = start_summaries(hp, ["val/acc"], name="run")
    experiment = metadata.parse_experiment_plugin_data(
        experiment_summary.value[0].metadata.plugin_data.content)  # fmt: skip
    types = {i.name: i.type for i in experiment.hparam_infos}
    assert types["optimizer.fused"] == api_pb2.DATA_TYPE_BOOL
    assert types["data.batch_size"] == types["optimizer.lr"] == api_pb2.DATA_TYPE_FLOAT64
    assert types["seed"] == api_pb2.DATA_TYPE_STRING and "model.scale" not in types
    start = metadata.parse_session_start_info_plugin_data(
        start_summary.value[0].metadata.plugin_data.content)  # fmt: skip
    assert start.hparams["data.batch_size"].WhichOneof("kind") == "number_value"
    assert start.hparams["data.batch_size"].number_value == 32.0
    assert "optimizer.fused" not in start.hparams and "model.scale" not in start.hparams
    assert start.hparams["model"].string_value == "mlp"


def test_a_jobs_sweep_id_is_its_sweep_dirs_from_where_the_sweep_started(
    tmp_path, monkeypatch
) -> None:
    """A sweep's job records its sweep dir's id, the dir taken relative to where the sweep
    started (with hydra.job.chdir=true every job found none: a review's); a single run in a
    sweep's job folder (a job continued by hand) records the id its folder's result records,
    so a later sweep in the dir leaves the folder out (it took the dir's current id: an
    earlier sweep's job continued, or a fresh folder, became the current sweep's, a
    review's); in a job folder with no result (killed before it wrote one), the dir's; a
    folder not named as a job's, or outside a sweep dir, none."""
    from types import SimpleNamespace

    from hydra.core.hydra_config import HydraConfig

    import trainer.sweep as sweep

    (tmp_path / "sw" / "1").mkdir(parents=True)
    (tmp_path / "sw" / "2").mkdir()
    (tmp_path / "sw" / ".sweep.json").write_text(json.dumps({"sweep_id": "abc"}))
    (tmp_path / "sw" / "1" / "metrics.json").write_text(json.dumps({"sweep_id": "old"}))
    elsewhere = tmp_path / "job_cwd"  # (the job's own working dir: chdir)
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    (tmp_path / "sw" / "final").mkdir()
    for multirun, output, want in ((True, tmp_path / "sw" / "1", "abc"),
                                   (False, tmp_path / "sw" / "1", "old"),
                                   (False, tmp_path / "sw" / "2", "abc"),
                                   (False, tmp_path / "sw" / "final", None),
                                   (False, tmp_path / "run", None)):  # fmt: skip
        hc = SimpleNamespace(runtime=SimpleNamespace(cwd=str(tmp_path), output_dir=str(output)),
                             sweep=SimpleNamespace(dir="sw"))  # fmt: skip
        monkeypatch.setattr(HydraConfig, "get", staticmethod(lambda hc=hc: hc))
        monkeypatch.setattr(sweep, "in_multirun", lambda multirun=multirun: multirun)
        assert sweep.job_sweep_id(output) == want, (multirun, output)


def test_migrate_rewrites_an_older_runs_records_by_its_own_config(tmp_path) -> None:
    """``migrate`` rewrites HPARAMS records written before 2026-12-07 (integers as text, a
    None as "none") by the run's own config, its ``.hydra/config.yaml`` or its checkpoint's:
    an integer's text becomes a number, a None is left out (of the experiment record too), a
    text that is text in the config ("none", "64", ``trainer.precision``'s "32") stays, and
    group choices stay. A run with neither config is left as written, never guessed. The
    other records are kept byte for byte, and a second pass changes nothing."""
    from omegaconf import OmegaConf
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from tensorboard.plugins.hparams import api_pb2, metadata
    from test_tensorboard_server import _older_record

    from trainer.hparams import _frames, migrate, run_hparams
    from trainer.logger import TensorBoardLogger

    cfg = make_cfg("+model.width=64", "+model.tag=none", "+model.name='64'",
                   "optimizer.fused=null")  # fmt: skip
    values = run_hparams(cfg, {"model": "mlp", "data": "digits"}).values
    assert values["model.tag"] == "none" and values["model.name"] == "64"
    assert values["trainer.precision"] == "32"
    for name in ("yaml", "checkpoint", "none"):
        logger = TensorBoardLogger(tmp_path / name / "tb" / "run")
        for s in _older_record(values):
            logger.add_summary(s, 0)
        logger.add_floats({"train/loss": 1.5}, 1)
        logger.close()
        (tmp_path / name / "metrics.json").write_text('{"status": "completed"}')  # (ended)
    (tmp_path / "yaml" / ".hydra").mkdir()
    OmegaConf.save(cfg, tmp_path / "yaml" / ".hydra" / "config.yaml")
    (tmp_path / "checkpoint" / "checkpoints").mkdir()
    plain = OmegaConf.to_container(cfg, resolve=True)
    torch.save({"config": plain, "step": 1}, tmp_path / "checkpoint" / "checkpoints" / "last.pt")
    files = {run: next((tmp_path / run).rglob("events.out.tfevents.*"))
             for run in ("yaml", "checkpoint", "none")}  # fmt: skip
    before = {run: f.read_bytes() for run, f in files.items()}
    script = Path(__file__).resolve().parent.parent / "scripts" / "migrate_hparams.py"
    done = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True,
                          text=True, check=True)  # fmt: skip
    assert done.stdout.splitlines() == [
        f"rewritten: {files['checkpoint']}", f"rewritten: {files['yaml']}",
        f"left as written: {files['none']}: no .hydra/config.yaml; no checkpoint",
        "2 event file(s) rewritten, 1 left",
    ]  # fmt: skip
    assert migrate(tmp_path) == ([], [(files["none"], "no .hydra/config.yaml; no checkpoint")])
    assert files["none"].read_bytes() == before["none"]

    def records(run: str):
        found = {}
        for e in EventFileLoader(str(files[run])).Load():
            for v in e.summary.value:
                content = v.metadata.plugin_data.content
                if v.tag == metadata.SESSION_START_INFO_TAG:
                    info = metadata.parse_session_start_info_plugin_data(content)
                    found["start"] = {k: getattr(x, x.WhichOneof("kind"))
                                      for k, x in info.hparams.items()}  # fmt: skip
                elif v.tag == metadata.EXPERIMENT_TAG:
                    infos = metadata.parse_experiment_plugin_data(content).hparam_infos
                    found["types"] = {i.name: i.type for i in infos}
        return found

    for run in ("yaml", "checkpoint"):
        got = records(run)
        start, types = got["start"], got["types"]
        assert start["model.width"] == 64.0 and start["data.batch_size"] == 64.0, run
        assert start["model.tag"] == "none" and start["model.name"] == "64", run
        assert start["trainer.precision"] == "32" and start["model"] == "mlp", run
        assert "optimizer.fused" not in start, run  # (a None: an empty cell, typed)
        assert types["optimizer.fused"] == api_pb2.DATA_TYPE_BOOL, run
        assert types["model.width"] == types["seed"] == api_pb2.DATA_TYPE_FLOAT64, run
        assert types["model.name"] == types["trainer.precision"] == api_pb2.DATA_TYPE_STRING

        # every record but the experiment and the session start, byte for byte
        def others(data: bytes) -> list[bytes]:
            kept = [data[a:b] for a, b in _frames(data)[0]]
            return [r for r in kept if metadata.SESSION_START_INFO_TAG.encode() not in r
                    and metadata.EXPERIMENT_TAG.encode() not in r]  # fmt: skip

        now = files[run].read_bytes()
        assert now != before[run] and others(now) == others(before[run])
        assert len(others(now)) == 2  # (the file version and train/loss)


def test_integers_at_float64s_edge_and_null_integers_keep_their_kind() -> None:
    """Integers are numbers up to 2⁵³ in magnitude (float64 holds them exactly: 2⁵³ itself
    is 9007199254740992.0) and text beyond, on either side of zero (-(2⁵³ + 1) as a number
    would be rounded to -2⁵³); a None of a key the schema declares an integer
    (``data.stride`` of ``data=chars``) is typed as a number, the column of every run that
    sets it; a group this run did not choose is "none" (every job has the same keys); a
    None override is spelled ``null`` in the event folder's and the group's name, as the
    command line types it (Python's "None" is no value Hydra reads back)."""
    from tensorboard.plugins.hparams import api_pb2, metadata

    from trainer.hparams import overrides_text, run_hparams, start_summaries

    overrides = ["data=chars", "seed=9007199254740992", "+model.low=-9007199254740992",
                 "+model.lower=-9007199254740993", "optimizer.fused=null"]  # fmt: skip
    hp = run_hparams(make_cfg(*overrides), {"data": "chars", "model": "mlp"}, overrides)
    assert hp.values["seed"] == 2**53 and hp.values["model.low"] == -(2**53)
    assert hp.values["model.lower"] == "-9007199254740993"
    assert hp.values["data.stride"] is None and hp.kinds["data.stride"] is float
    assert hp.values["experiment"] == "none" and hp.values["data"] == "chars"
    assert overrides_text(hp, " ") == (
        "data=chars seed=9007199254740992 model.low=-9007199254740992 "
        "model.lower=-9007199254740993 optimizer.fused=null"
    )
    experiment_summary, start_summary = start_summaries(hp, ["val/token_acc"], name="run")
    experiment = metadata.parse_experiment_plugin_data(
        experiment_summary.value[0].metadata.plugin_data.content)  # fmt: skip
    types = {i.name: i.type for i in experiment.hparam_infos}
    assert types["seed"] == types["model.low"] == types["data.stride"] == api_pb2.DATA_TYPE_FLOAT64
    assert types["model.lower"] == types["experiment"] == api_pb2.DATA_TYPE_STRING
    start = metadata.parse_session_start_info_plugin_data(
        start_summary.value[0].metadata.plugin_data.content)  # fmt: skip
    assert start.hparams["seed"].number_value == 9007199254740992.0
    assert start.hparams["model.low"].number_value == -9007199254740992.0
    assert start.hparams["model.lower"].string_value == "-9007199254740993"
    assert start.hparams["experiment"].string_value == "none"
    assert "data.stride" not in start.hparams


def test_an_optimizer_of_ones_own_without_a_listed_key_leaves_its_cell_empty() -> None:
    """``optimizer.weight_decay`` is listed for every run; an optimizer of one's own whose
    config has no such key (``~optimizer +optimizer._target_=...``) gives it None: left out
    of the session and, with no declared kind (the schema's lookup of a key the config
    lacks fails, which is no reason to fail the run's records), of the experiment too."""
    from tensorboard.plugins.hparams import metadata

    from trainer.hparams import run_hparams, start_summaries

    overrides = ["~optimizer", "+optimizer._target_=torch.optim.SGD", "+optimizer.lr=0.1"]
    hp = run_hparams(make_cfg(*overrides), {"model": "mlp"}, overrides)
    assert hp.values["optimizer.weight_decay"] is None and hp.values["optimizer.lr"] == 0.1
    assert "optimizer.weight_decay" not in hp.kinds
    experiment_summary, start_summary = start_summaries(hp, ["val/acc"], name="run")
    experiment = metadata.parse_experiment_plugin_data(
        experiment_summary.value[0].metadata.plugin_data.content)  # fmt: skip
    assert "optimizer.weight_decay" not in {i.name for i in experiment.hparam_infos}
    start = metadata.parse_session_start_info_plugin_data(
        start_summary.value[0].metadata.plugin_data.content)  # fmt: skip
    assert "optimizer.weight_decay" not in start.hparams
    assert start.hparams["optimizer.lr"].number_value == 0.1


MIGRATE = Path(__file__).resolve().parent.parent / "scripts" / "migrate_hparams.py"


def _older_run(run: Path, cfg) -> Path:
    """A run's folder holding an HPARAMS record as the code before 2026-12-07 wrote it
    (integers as text, None as "none", its own task's metrics) and a scalar; returns its
    event file."""
    from test_tensorboard_server import _older_record

    from trainer.hparams import run_hparams
    from trainer.logger import TensorBoardLogger

    logger = TensorBoardLogger(run / "tb" / "run")
    for s in _older_record(run_hparams(cfg, {"model": "mlp"}).values):
        logger.add_summary(s, 0)
    logger.add_floats({"train/loss": 1.5}, 1)
    logger.close()
    (run / "metrics.json").write_text('{"status": "completed"}')  # (ended: its last record)
    return next(run.rglob("events.out.tfevents.*"))


def _records(path: Path) -> dict:
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from tensorboard.plugins.hparams import metadata

    found = {}
    for e in EventFileLoader(str(path)).Load():
        for v in e.summary.value:
            content = v.metadata.plugin_data.content
            if v.tag == metadata.SESSION_START_INFO_TAG:
                info = metadata.parse_session_start_info_plugin_data(content)
                found["start"] = {k: x.WhichOneof("kind") for k, x in info.hparams.items()}
            elif v.tag == metadata.EXPERIMENT_TAG:
                found["metrics"] = [
                    m.name.tag for m in metadata.parse_experiment_plugin_data(content).metric_infos
                ]
    return found


def test_model_hidden_has_one_kind_in_an_mlp_and_a_cnn_run() -> None:
    """``model.hidden`` is a list for ``model=mlp`` ("[256, 128]", text) and an integer for
    ``model=cnn`` (128, a number since 2026-12-07): a logdir of both has a column of two
    kinds, and TensorBoard answers 500 to sorting by it, 400 to filtering (a review's)."""
    from trainer.hparams import run_hparams

    mlp = run_hparams(make_cfg(), {"model": "mlp"}).values["model.hidden"]
    cnn = run_hparams(make_cfg("model=cnn"), {"model": "cnn"}).values["model.hidden"]
    number = (int, float)
    assert isinstance(mlp, number) == isinstance(cnn, number), (mlp, cnn)


def test_migrate_resolves_a_config_with_an_interpolation_it_cannot_resolve(tmp_path) -> None:
    """A sweep's ``seed=${hydra:job.num}`` is kept as such in ``.hydra/config.yaml``; the
    migration's resolving then fails and it falls back to the whole config unresolved, so
    every interpolated integer (``seed``, ``instrument.norms.every_n_steps``, which is
    ``${logging.every_n_steps}``) stays text, silently (neither rewritten nor listed as
    left), and the logdir's columns keep two kinds. The checkpoint beside it holds the
    resolved config."""
    from omegaconf import OmegaConf

    from trainer.hparams import migrate

    cfg = make_cfg("trainer.max_steps=2")
    run = tmp_path / "job"
    event = _older_run(run, cfg)
    (run / ".hydra").mkdir()
    text = OmegaConf.to_yaml(cfg).replace("seed: 0\n", "seed: ${hydra:job.num}\n", 1)
    (run / ".hydra" / "config.yaml").write_text(text)
    (run / "checkpoints").mkdir()
    torch.save({"config": OmegaConf.to_container(cfg, resolve=True)},
               run / "checkpoints" / "last.pt")  # fmt: skip
    changed, left = migrate(tmp_path)
    start = _records(event)["start"]
    assert event in changed
    assert start["data.batch_size"] == "number_value"
    assert start["instrument.norms.every_n_steps"] == "number_value"
    assert start["seed"] == "number_value"


def test_a_migrated_record_lists_every_tasks_metrics(tmp_path) -> None:
    """TensorBoard shows one experiment record for a whole logdir; after the migration an
    older run's record still lists only its own task's metrics (val/acc, val/loss,
    train/loss), and where it is the one picked a regression or sequence run's val/mse,
    val/ppl are in no column (a real server picked a migrated diabetes_mse record: val/acc
    was in no column), where a newer record lists every built-in task's (TASK_METRICS)."""
    from omegaconf import OmegaConf

    from trainer.hparams import TASK_METRICS, migrate

    cfg = make_cfg("trainer.max_steps=2")
    event = _older_run(tmp_path / "old", cfg)
    (tmp_path / "old" / ".hydra").mkdir()
    OmegaConf.save(cfg, tmp_path / "old" / ".hydra" / "config.yaml")
    assert migrate(tmp_path)[0] == [event]
    assert set(TASK_METRICS) <= set(_records(event)["metrics"])


def test_a_checkpoint_that_does_not_load_is_named(tmp_path) -> None:
    """A run built from Python (no ``.hydra/``) whose checkpoint does not load is listed as
    having no checkpoint at all ("no .hydra/config.yaml or checkpoint of its run"), the load
    error swallowed: the message should say which checkpoint did not load."""
    cfg = make_cfg("trainer.max_steps=2")
    _older_run(tmp_path / "py", cfg)
    (tmp_path / "py" / "checkpoints").mkdir()
    (tmp_path / "py" / "checkpoints" / "last.pt").write_bytes(b"not a checkpoint")
    done = subprocess.run([sys.executable, str(MIGRATE), str(tmp_path)], capture_output=True,
                          text=True)  # fmt: skip
    out = done.stdout + done.stderr
    assert "last.pt" in out, out


def test_one_runs_unreadable_config_does_not_stop_the_others(tmp_path) -> None:
    """A run whose ``.hydra/config.yaml`` does not parse aborts the whole migration with a
    YAML traceback: the runs after it (in path order) are never migrated, and those before
    it were rewritten but not reported. Expected: that run named with its error, the others
    migrated."""
    from omegaconf import OmegaConf

    cfg = make_cfg("trainer.max_steps=2")
    events = {}
    for name in ("a_bad", "b_good"):
        events[name] = _older_run(tmp_path / name, cfg)
        (tmp_path / name / ".hydra").mkdir()
        OmegaConf.save(cfg, tmp_path / name / ".hydra" / "config.yaml")
    (tmp_path / "a_bad" / ".hydra" / "config.yaml").write_text("a: [unclosed\n")
    done = subprocess.run([sys.executable, str(MIGRATE), str(tmp_path)], capture_output=True,
                          text=True)  # fmt: skip
    assert "Traceback" not in done.stderr, done.stderr[-600:]
    assert f"rewritten: {events['b_good']}" in done.stdout
    assert "a_bad" in done.stdout + done.stderr


def test_migrate_leaves_out_a_listed_key_the_runs_config_lacks(tmp_path) -> None:
    """An older run whose optimizer of its own has no ``weight_decay`` wrote
    ``optimizer.weight_decay`` (a :data:`KEY_VALUES` key, listed for every run) as "none";
    a newer run leaves it out (an empty cell). The migration keeps the "none" (the key is
    absent from the config, not None in it), and a logdir with an AdamW run has a column of
    text and numbers: TensorBoard answers 500 to sorting by it, 400 to filtering (a review's
    real logdir, /tmp/probe400/logs)."""
    from omegaconf import OmegaConf

    from trainer.hparams import migrate, run_hparams

    cfg = make_cfg("~optimizer", "+optimizer._target_=torch.optim.Adagrad",
                   "+optimizer.lr=0.01", "+optimizer._partial_=true")  # fmt: skip
    assert run_hparams(cfg).values["optimizer.weight_decay"] is None  # (what is written now)
    event = _older_run(tmp_path / "old", cfg)
    (tmp_path / "old" / ".hydra").mkdir()
    OmegaConf.save(cfg, tmp_path / "old" / ".hydra" / "config.yaml")
    migrate(tmp_path)
    assert "optimizer.weight_decay" not in _records(event)["start"]


def older_python_run(run: Path, cfg, values: dict) -> Path:
    """A run built in Python before 2026-12-07 (no ``.hydra/``): its HPARAMS records of
    ``values`` as the code then wrote them, its ``metrics.json`` (ended) and its config in
    its checkpoint; returns its event file."""
    from omegaconf import OmegaConf
    from test_tensorboard_server import _older_record

    from trainer.logger import TensorBoardLogger

    logger = TensorBoardLogger(run / "tb" / "run")
    for s in _older_record(values):
        logger.add_summary(s, 0)
    logger.close()
    (run / "metrics.json").write_text('{"status": "completed"}')
    (run / "checkpoints").mkdir()
    torch.save({"config": OmegaConf.to_container(cfg, resolve=True)},
               run / "checkpoints" / "last.pt")  # fmt: skip
    return next(run.rglob("events.out.tfevents.*"))


def test_a_migrated_python_built_record_types_its_none_columns_as_a_newer_one(tmp_path) -> None:
    """A run built in Python has no group choices in its record; its newer experiment record
    types ``optimizer.fused`` (None: left out of the session) from the config's schema
    (bool), but the migration looks the kind up by the record's chosen option, finds none,
    and drops the column: where TensorBoard picks that record, the column is missing for
    every run (a review's real runs, /tmp/probe400/logs/old_py_cnn against new_py_cnn)."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from tensorboard.plugins.hparams import metadata

    from trainer.hparams import migrate, run_hparams, start_summaries

    cfg = make_cfg("trainer.max_steps=2")
    run = tmp_path / "py"
    event = older_python_run(run, cfg, run_hparams(cfg).values)  # (no choices)
    assert migrate(tmp_path) == ([event], [])

    def names(summary) -> set:
        return {i.name for i in metadata.parse_experiment_plugin_data(
            summary.value[0].metadata.plugin_data.content).hparam_infos}  # fmt: skip

    newer = names(start_summaries(run_hparams(cfg))[0])
    migrated = next(names(e.summary) for e in EventFileLoader(str(event)).Load()
                    if any(v.tag == metadata.EXPERIMENT_TAG for v in e.summary.value))  # fmt: skip
    assert "optimizer.fused" in newer
    assert newer - migrated == set()
