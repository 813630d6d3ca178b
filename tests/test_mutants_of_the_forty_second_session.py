"""A mutation round on 2026-12-07's changes (regularizer patterns, the in-place GRADS check,
own weightings' checks, run numbers): tests that kill the mutants the other tests let live."""

from __future__ import annotations

import math

import pytest
import torch
from test_own_regularizer_checks_review import _Square
from torch import nn
from torch.nn.utils import prune

from trainer.backward import WeightError
from trainer.regularizers import Regularizer
from trainer.weighting import Weighting

# --- regularizer patterns -----------------------------------------------------------------


def _two() -> nn.Sequential:
    return nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 3))


def test_a_pattern_losing_its_match_mid_run_is_refused_even_where_allowed() -> None:
    """allow_unmatched is for a shared preset's pattern naming other models' parameters; a
    pattern that matched and lost its match mid-run (prune renames 1.weight to 1.weight_orig)
    is refused whatever it says, and the selection before it is kept."""
    m = _two()
    r = Regularizer("l2", 1.0, exclude=["1.weight"], allow_unmatched=True).bind(m)
    assert r.names == ["0.weight"]
    prune.l1_unstructured(m[1], "weight", amount=0.5)
    with pytest.raises(ValueError) as info:
        r.bind(m, empty_ok=True)
    said = str(info.value)
    assert said.startswith(
        "regularizer.l2.exclude: ['1.weight'] matches no parameter of the model since the "
        "model's parameters changed mid-run"
    ), said
    assert "allow_unmatched" not in said  # (no way out offered: the refusal is unconditional)
    assert r.names == ["0.weight"]  # the selection before the refused one


def test_an_allowed_pattern_bound_again_to_another_model_is_warned_not_refused(caplog) -> None:
    """The same regularizer (a shared preset) bound by hand to a model with the parameter,
    then to one without: not mid-run (empty_ok false), so allowed, named in a warning."""
    r = Regularizer("l2", 1.0, exclude=["1.weight"], allow_unmatched=True).bind(_two())
    other = nn.Sequential(nn.Linear(4, 3))
    with caplog.at_level("WARNING", logger="trainer.regularizers"):
        r.bind(other)
    assert r.names == ["0.weight"]
    assert [rec.getMessage().split(" (fnmatch")[0] for rec in caplog.records] == [
        "regularizer.l2.exclude: ['1.weight'] matches no parameter of the model"
    ]


def _clamping_grads(p):
    """2p after clamping p in place to ±1e6: the small weights keep their values, but the
    write is in place (on the live weights it would clip them each logging step)."""
    p.clamp_(-1e6, 1e6)
    return 2 * p


class SquareClampingInPlace(Regularizer):
    KINDS = {**Regularizer.KINDS, "sq": lambda *ps, coef: _Square.apply(coef, *ps)}
    GRADS = {**Regularizer.GRADS, "sq": _clamping_grads}


def test_a_grads_writing_in_place_values_unchanged_is_refused() -> None:
    """The version counter sees the in-place write even where the values it writes are the
    ones there (the values alone would pass it)."""
    r = SquareClampingInPlace("sq", 0.5).bind(_two())
    with pytest.raises(ValueError, match=r"^regularizer sq \(SquareClampingInPlace\): "
                       r"GRADS\['sq'\] writes its input in place \(on 0.weight\)"):  # fmt: skip
        r.check_gradient()


# --- own weightings -------------------------------------------------------------------------


def _call(w: Weighting, losses):
    targets = torch.zeros(losses.shape, dtype=torch.long)
    return w(losses, None, targets, torch.arange(losses.shape[0]))


class _InfHostTotal(Weighting):
    """float64 weights of 1e308 whose host-known total (4e308) overflows a Python float."""

    def raw(self, losses, logits, targets, indices):
        return torch.full_like(losses, 1e308)

    def batch_total(self, r):
        return 1e308 * r.numel()


def test_an_own_host_total_that_overflows_is_refused() -> None:
    assert math.isinf(1e308 * 4)
    with pytest.raises(WeightError, match=r"_InfHostTotal: raw\(\) must return finite weights "
                       r">= 0; got weights whose sum overflows torch.float64"):  # fmt: skip
        _call(_InfHostTotal(), torch.rand(4, dtype=torch.float64))


class _Negative(Weighting):
    def raw(self, losses, logits, targets, indices):
        return -torch.ones_like(losses)


def test_an_own_strategy_with_normalize_none_is_held_to_weights_ge_0() -> None:
    """normalize=none returns r as it is: a negative r trained as gradient ascent."""
    with pytest.raises(WeightError, match=r"_Negative: raw\(\) must return finite weights >= 0"):
        _call(_Negative(normalize="none"), torch.rand(4))


class _HugeHostTotalF32(Weighting):
    """float32 weights of 3e38 (finite) whose total the strategy knows on the host: 1.2e39,
    finite as a Python float, past float32's largest value."""

    def raw(self, losses, logits, targets, indices):
        return torch.full_like(losses, 3e38)

    def batch_total(self, r):
        return 3e38 * r.numel()


def test_a_host_total_past_the_losses_dtype_is_refused_not_every_weight_0() -> None:
    """The same weights summed by the default batch_total are refused ("weights whose sum
    overflows torch.float32 ... every normalized weight would be 0"); the host's total is
    checked as a Python float (finite) and r / 1.2e39 in float32 is r / Inf: every weight 0,
    nothing trained, unsaid."""
    with pytest.raises(
        WeightError,
        match=r"raw\(\) must return finite weights >= 0; got "
        r"weights whose sum overflows torch.float32",
    ):
        _call(_HugeHostTotalF32(), torch.rand(4))  # fmt: skip


# --- run numbers ----------------------------------------------------------------------------


def test_next_run_number_counts_the_numbers_the_set_aside_runs_recorded(tmp_path) -> None:
    """previous/1 holding a run that recorded #5 (set aside where previous/5 was taken): a
    new run is #6, not #2."""
    from trainer.checkpoint import RUN_NUMBER, next_run_number

    (tmp_path / "previous" / "1").mkdir(parents=True)
    (tmp_path / "previous" / "1" / RUN_NUMBER).write_text("5\n")
    assert next_run_number(tmp_path) == 6


def test_a_run_set_aside_goes_to_its_own_number_with_its_number(tmp_path) -> None:
    """Runs #1, #2, #3; previous/2 deleted; a fourth run sets #3 aside into previous/3 (its
    own number, free), with its .run_number, and is #4."""
    import shutil

    from conftest import train

    from trainer.checkpoint import run_number

    fast = ("trainer.checkpoint.every_n_steps=2", "trainer.max_steps=2")
    for _ in range(3):
        train(tmp_path, *fast)
    shutil.rmtree(tmp_path / "previous" / "2")
    train(tmp_path, *fast)
    assert sorted(p.name for p in (tmp_path / "previous").iterdir()) == ["1", "3"]
    assert run_number(tmp_path / "previous" / "3") == 3
    assert run_number(tmp_path) == 4


def test_a_resumed_run_keeps_its_number(tmp_path) -> None:
    """Runs #1, #2, #3; previous/2 deleted; #3 resumed (by path, for more steps) keeps #3, not
    1 + the highest set-aside number left (2)."""
    import shutil

    from conftest import train

    from trainer.checkpoint import run_number

    fast = ("trainer.checkpoint.every_n_steps=2",)
    for _ in range(3):
        train(tmp_path, *fast, "trainer.max_steps=2")
    shutil.rmtree(tmp_path / "previous" / "2")
    assert run_number(tmp_path) == 3
    train(tmp_path, *fast, "trainer.max_steps=4",
          f"trainer.resume={tmp_path / 'checkpoints' / 'last.pt'}")  # fmt: skip
    assert sorted(p.name for p in (tmp_path / "previous").iterdir()) == ["1"]
    assert run_number(tmp_path) == 3


# --- a sweep's job folders ------------------------------------------------------------------


def test_a_job_folder_holding_only_its_continued_pointer_is_a_job(tmp_path) -> None:
    """A job that continued another folder's run (trainer.resume), with no .hydra/ of its own
    (hydra.output_subdir=null) and no result yet, holds continued.json alone: a job."""
    from trainer.report import CONTINUED, find_run_dirs

    (tmp_path / "a").mkdir()
    (tmp_path / "a" / CONTINUED).write_text('{"run_dir": "..", "job_dir": "."}')
    (tmp_path / "b" / "tb").mkdir(parents=True)
    assert find_run_dirs(tmp_path) == [tmp_path / "a", tmp_path / "b"]


def test_a_set_aside_run_below_a_folder_that_is_no_run_dir_is_no_job(tmp_path) -> None:
    """Job 1's folder (no .hydra/: hydra.output_subdir=null) holds only the run it set aside,
    previous/1, its own run killed before writing: previous/1 is the job's, not a job."""
    from trainer.report import find_run_dirs

    (tmp_path / "0" / "tb").mkdir(parents=True)
    (tmp_path / "1" / "previous" / "1" / "tb").mkdir(parents=True)
    assert find_run_dirs(tmp_path) == [tmp_path / "0", tmp_path / "1"]


def test_what_a_job_folder_holds_below_it_is_the_jobs(tmp_path) -> None:
    """A job's folder (a run dir) holding a folder of its own with a metrics.json (an
    evaluation's output): the job, not that folder."""
    from trainer.report import find_run_dirs

    (tmp_path / "0" / "eval").mkdir(parents=True)
    (tmp_path / "0" / "metrics.json").write_text("{}")
    (tmp_path / "0" / "eval" / "metrics.json").write_text("{}")
    assert find_run_dirs(tmp_path) == [tmp_path / "0"]


# --- a sweep's refusals and summary ---------------------------------------------------------


def _in_sweep(monkeypatch, task: list[str], sweep_id: str = "S") -> None:
    from types import SimpleNamespace

    from hydra.core.hydra_config import HydraConfig

    import trainer.sweep

    monkeypatch.setattr(trainer.sweep, "in_multirun", lambda: True)
    monkeypatch.setattr(trainer.sweep, "job_sweep_id", lambda run_dir: sweep_id)
    monkeypatch.setattr(trainer.sweep, "subdir_as_written", lambda hc: "x")
    hc = SimpleNamespace(overrides=SimpleNamespace(task=task), job=SimpleNamespace(num=1))
    monkeypatch.setattr(HydraConfig, "get", staticmethod(lambda: hc))


def test_a_job_in_a_folder_holding_its_own_earlier_result_is_not_refused(tmp_path, monkeypatch):
    """A job requeued in its own folder (its result there, same sweep, same overrides) goes
    on; another job's result there is refused."""
    import json

    from trainer.config import ConfigError
    from trainer.run import _refuse_another_jobs_folder

    (tmp_path / "metrics.json").write_text(json.dumps(
        {"overrides": ["optimizer.lr=0.1", "seed=0"], "sweep_id": "S"}))  # fmt: skip
    _in_sweep(monkeypatch, ["optimizer.lr=0.1", "seed=0"])
    _refuse_another_jobs_folder(tmp_path)
    _in_sweep(monkeypatch, ["optimizer.lr=0.1", "seed=1"])
    with pytest.raises(ConfigError, match=r"^hydra.sweep.subdir: job 1's folder "):
        _refuse_another_jobs_folder(tmp_path)


def test_a_sweep_start_forgets_an_earlier_sweeps_failures(tmp_path) -> None:
    from omegaconf import OmegaConf

    from trainer import sweep

    sweep._failed_here[("seed=0",)] = (0, "ConfigError: an earlier sweep's")
    s = sweep.SweepSummary()
    cfg = OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path), "subdir": "${hydra.job.num}"},
                                      "runtime": {"cwd": str(tmp_path)},
                                      "overrides": {"task": []}, "mode": "MULTIRUN"}})  # fmt: skip
    try:
        s.on_multirun_start(cfg)
    finally:
        s._ended = True  # (no summary at exit)
    assert sweep._failed_here == {}


def test_a_refused_job_whose_folder_holds_an_earlier_runs_result_is_counted_failed(
    tmp_path, caplog
) -> None:
    """Job 1 (seed=1) refused in its folder, which holds an earlier run's result (seed=5, an
    earlier sweep's): the report finds the folder's result missing; this process saw the job
    fail, and the summary says so, with its error."""
    from test_sweep_folders import _job as job_folder
    from test_sweep_folders import _sweep

    from trainer import sweep
    from trainer.report import _job

    root = tmp_path / "sweep"
    _sweep(root, "S", ["seed=0,1"])
    done = {"status": "completed", "val/loss": 1.0, "monitor": "val/loss"}
    job_folder(root, "0", {**done, "sweep_id": "S", "overrides": ["seed=0"]}, ["seed=0"])
    job_folder(root, "1", {**done, "sweep_id": "E", "overrides": ["seed=5"]}, ["seed=1"])
    sweep._failed_here.clear()
    sweep._failed_here[_job(["seed=1"])] = (1, "ConfigError: refused")
    s = sweep.SweepSummary()
    s._ended = True
    with caplog.at_level("ERROR", logger="trainer.sweep"), pytest.raises(SystemExit):
        s._summarize(root, stopped=False)  # (status 1: a job failed)
    sweep._failed_here.clear()
    said = [r.getMessage() for r in caplog.records]
    assert said == [
        "job 1 failed: ConfigError: refused",
        f"sweep finished: 1 of 2 jobs failed; the others' outputs are in {root} "
        f"(python scripts/report.py {root})",
    ]
