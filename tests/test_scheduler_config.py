"""Scheduler files refused naming their key, a length left null, a resume past the run's
last step (a probe's findings, 2026-12-07)."""

from __future__ import annotations

import pytest
import torch
from conftest import make_cfg

from trainer.config import ConfigError, validate
from trainer.run import build_scheduler

PLATEAU = ["~scheduler", "+scheduler._target_=torch.optim.lr_scheduler.ReduceLROnPlateau",
           "+scheduler._partial_=true"]  # fmt: skip


@pytest.mark.parametrize(
    "overrides, match",
    [
        (  # (torch's "StepLR.__init__() missing 1 required positional argument: 'step_size'",
            # with Hydra's traceback, naming no key)
            ["~scheduler", "+scheduler._target_=torch.optim.lr_scheduler.StepLR",
             "+scheduler._partial_=true"],
            r"scheduler.*step_size",
        ),
        (  # (the outer scheduler of a SequentialLR: its constructor's TypeError, raw)
            ["~scheduler", "+scheduler._target_=torch.optim.lr_scheduler.SequentialLR",
             "+scheduler._partial_=true",
             "+scheduler.schedulers=[{_target_: torch.optim.lr_scheduler.LinearLR, "
             "_partial_: true, total_iters: 3}]"],
            r"scheduler.*milestones",
        ),
        (  # (torch's "mode maximum is unknown!", raw)
            [*PLATEAU, "+scheduler.mode=maximum"],
            r"scheduler.mode",
        ),
        (  # (torch's ValueError from ChainedScheduler's constructor, raw: the loop would
            # have to call step(metrics) on the part)
            ["~scheduler", "+scheduler._target_=torch.optim.lr_scheduler.ChainedScheduler",
             "+scheduler._partial_=true",
             "+scheduler.schedulers=[{_target_: torch.optim.lr_scheduler.ReduceLROnPlateau, "
             "_partial_: true, mode: max}]"],
            r"scheduler.schedulers: .*index 0",
        ),
        (  # (LambdaLR's lr_lambda as a dotted path, not through hydra.utils.get_method as
            # the README says: torch's "'str' object is not callable", raw)
            ["~scheduler", "+scheduler._target_=torch.optim.lr_scheduler.LambdaLR",
             "+scheduler._partial_=true", "+scheduler.lr_lambda=math.cos"],
            r"scheduler.lr_lambda",
        ),
        (  # (the argument the trainer passes, set in the file: "got multiple values for
            # argument 'optimizer'", raw)
            ["~scheduler", "+scheduler._target_=torch.optim.lr_scheduler.StepLR",
             "+scheduler._partial_=true", "+scheduler.step_size=2", "+scheduler.optimizer=1"],
            r"scheduler.optimizer",
        ),
    ],
    ids=["step_without_step_size", "sequential_without_milestones", "plateau_mode_unknown",
         "plateau_inside_chained", "lambda_as_a_string", "optimizer_key_in_the_file"],
)  # fmt: skip
def test_a_scheduler_file_that_cannot_be_built_names_its_key(overrides, match) -> None:
    """README ("Bring your own"): "a required argument nobody sets is named". With
    ``_partial_: true`` (which every scheduler file needs) the required-argument check is
    skipped (trainer/components.py, check_component), and build_scheduler does not wrap the
    constructor's error: the run fails with Hydra's traceback and torch's message, no key."""
    cfg = make_cfg(*overrides)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.ones(2))], lr=0.1)
    with pytest.raises(ConfigError, match=match):
        validate(cfg)
        build_scheduler(cfg.scheduler, opt, total_steps=8)


def test_a_scheduler_length_left_null_is_filled_in_or_named_before_training() -> None:
    """``T_max: null`` in a scheduler file (the natural spelling of "the trainer sets it") is
    taken as the file's own length (trainer/run.py, run_length_keys: ``key not in cfg`` is
    False for a null value): CosineAnnealingLR is built with T_max=None, and the run fails at
    its first scheduler step, after one update, with torch's "unsupported operand type(s) for
    -: 'int' and 'NoneType'" (metrics.json: failed at step 1), naming no key. Filled in now, as
    a key left out is."""
    cfg = make_cfg("~scheduler", "+scheduler._target_=torch.optim.lr_scheduler.CosineAnnealingLR",
                   "+scheduler._partial_=true", "+scheduler.T_max=null")  # fmt: skip
    opt = torch.optim.SGD([torch.nn.Parameter(torch.ones(2))], lr=0.1)
    validate(cfg)
    scheduler = build_scheduler(cfg.scheduler, opt, total_steps=8)
    assert scheduler.T_max == 8  # (filled in, as for a key left out)
    opt.step()
    scheduler.step()  # (raised TypeError here)


def test_a_resume_with_max_steps_below_the_checkpoints_step_is_refused(tmp_path, caplog) -> None:
    """A checkpoint at step 4 resumed with ``trainer.max_steps=2``: the run "completes" at
    step 4 (metrics.json: completed, step 4, with an extra validation at step 4 written into
    the run's events), and with scheduler=cosine it warns "this run stops at step 2, before
    it reaches eta_min" (trainer/run.py, _check_schedule_length: trainer.total_steps, the
    planned 2, against the checkpoint's T_max 6), a step the run is already past. Expected:
    refused before anything is written, naming trainer.max_steps and the checkpoint's step."""
    from conftest import StopAt, train

    common = ("data=synthetic", "data.num_train=200", "data.num_val=40", "data.batch_size=32",
              "data.shape=[8]", "data.num_classes=3", "model.hidden=[8]", "optimizer=sgd",
              "trainer.accumulate_grad_batches=3", "trainer.max_epochs=2", "scheduler=cosine",
              "instrument=none")  # fmt: skip
    with pytest.raises(SystemExit):
        train(tmp_path / "a", *common, callbacks=[StopAt(4)])
    ckpt = tmp_path / "a" / "checkpoints" / "step_000000004.pt"
    with pytest.raises(ConfigError, match=r"step_000000004.pt is at step 4, past this run's "
                       r"last step, 2 \(trainer.max_steps"):  # fmt: skip
        train(tmp_path / "b", *common, "trainer.max_steps=2", f"trainer.resume={ckpt}")


ONE_CYCLE = ["+scheduler._target_=torch.optim.lr_scheduler.OneCycleLR",
             "+scheduler._partial_=true", "+scheduler.max_lr=0.1"]  # fmt: skip
CHAINED = ["+scheduler._target_=torch.optim.lr_scheduler.ChainedScheduler",
           "+scheduler._partial_=true",
           "+scheduler.schedulers=[{_target_: torch.optim.lr_scheduler.ConstantLR, _partial_: "
           "true, total_iters: 2}, {_target_: torch.optim.lr_scheduler.OneCycleLR, _partial_: "
           "true, max_lr: 0.1, total_steps: %d}]"]  # fmt: skip
SEQUENTIAL = ["+scheduler._target_=torch.optim.lr_scheduler.SequentialLR",
              "+scheduler._partial_=true"]  # fmt: skip
CONSTANT = "{_target_: torch.optim.lr_scheduler.ConstantLR, _partial_: true, total_iters: 2}"
CYCLE = (
    "{_target_: torch.optim.lr_scheduler.OneCycleLR, _partial_: true, max_lr: 0.1, total_steps: %d}"
)


@pytest.mark.parametrize(
    "short, enough, match",
    [
        ([*ONE_CYCLE, "+scheduler.total_steps=5"], [*ONE_CYCLE, "+scheduler.total_steps=14"],
         r"scheduler.total_steps: OneCycleLR's schedule is 5 steps and this run trains 14"),
        ([*ONE_CYCLE, "+scheduler.epochs=2", "+scheduler.steps_per_epoch=3"],
         [*ONE_CYCLE, "+scheduler.epochs=2", "+scheduler.steps_per_epoch=7"],
         r"scheduler.epochs × scheduler.steps_per_epoch: OneCycleLR's schedule is 6 steps"),
        ([*CHAINED[:2], CHAINED[2] % 9], [*CHAINED[:2], CHAINED[2] % 14],
         r"scheduler.schedulers\[1\].total_steps: OneCycleLR's schedule is 9 steps and this "
         r"run trains 14 optimizer steps; .* Either set it to at least 14, or shorten"),
        # (a part after the milestone runs from step 4 to the run's 14th; the first to step 7)
        ([*SEQUENTIAL, f"+scheduler.schedulers=[{CONSTANT}, {CYCLE % 9}]",
          "+scheduler.milestones=[4]"],
         [*SEQUENTIAL, f"+scheduler.schedulers=[{CONSTANT}, {CYCLE % 10}]",
          "+scheduler.milestones=[4]"],
         r"scheduler.schedulers\[1\].total_steps: OneCycleLR's schedule is 9 steps and its "
         r"segment of the SequentialLR runs 10 steps of this run's 14 \(from optimizer step 4\)"),
        ([*SEQUENTIAL, f"+scheduler.schedulers=[{CYCLE % 6}, {CONSTANT}]",
          "+scheduler.milestones=[8]"],
         [*SEQUENTIAL, f"+scheduler.schedulers=[{CYCLE % 7}, {CONSTANT}]",
          "+scheduler.milestones=[8]"],
         r"scheduler.schedulers\[0\].total_steps: OneCycleLR's schedule is 6 steps and its "
         r"segment of the SequentialLR runs 7 steps of this run's 14 \(from optimizer step 0\)"),
    ],
    ids=["total_steps", "epochs_times_steps_per_epoch", "inside_chained", "sequential_after",
         "sequential_first"],
)  # fmt: skip
def test_a_one_cycle_schedule_of_the_files_own_shorter_than_the_run_is_refused(
    tmp_path, short, enough, match
) -> None:
    """A OneCycleLR whose file sets its own length shorter than the run (14 optimizer steps):
    the run trained 5 steps and failed at the 6th with torch's "Tried to step 6 times. The
    specified number of total steps is 5", naming no key (a session's finding). Refused
    before training now, naming the key; a length of the run's (14 steps) still trains."""
    from conftest import train

    common = ("data=synthetic", "data.num_train=200", "data.num_val=40", "data.batch_size=32",
              "data.shape=[8]", "data.num_classes=3", "model.hidden=[8]", "optimizer=sgd",
              "trainer.max_epochs=2", "instrument=none", "~scheduler")  # fmt: skip
    with pytest.raises(ConfigError, match=match):
        train(tmp_path / "short", *common, *short)
    assert not list((tmp_path / "short").rglob("step_*.pt"))  # (refused before training)
    train(tmp_path / "enough", *common, *enough)


def test_a_cosine_schedule_rising_to_eta_min_above_the_learning_rate_is_warned(caplog) -> None:
    """``scheduler=cosine scheduler.eta_min=0.1`` with ``optimizer.lr=1e-3``: the "decay"
    raised the learning rate to 0.1 over the run, unsaid (a session's finding). Warned,
    naming both values; an eta_min below the learning rate is not."""
    import logging

    from trainer.run import _warn_rising_cosine

    p = torch.nn.Parameter(torch.ones(2))
    said = {}
    for eta_min in (0.1, 1e-4):
        opt = torch.optim.SGD([p], lr=1e-3)
        cfg = make_cfg("scheduler=cosine", f"scheduler.eta_min={eta_min}")
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="trainer.run"):
            _warn_rising_cosine(build_scheduler(cfg.scheduler, opt, total_steps=8))
        said[eta_min] = [r.getMessage() for r in caplog.records if "eta_min" in r.getMessage()]
    assert said[1e-4] == []
    assert len(said[0.1]) == 1
    assert said[0.1][0].startswith("scheduler.eta_min (0.1) is above the learning rate (0.001)")


def test_a_sequential_part_whose_milestone_lies_past_the_run_is_checked_against_the_run(
    tmp_path,
) -> None:
    """A SequentialLR's first part runs to the step before its milestone or to the run's end,
    whichever comes first: a cycle of the run's 14 steps before a milestone at step 20 (never
    reached) is stepped 14 times, and trains (a mutation test's: its segment counted to the
    milestone, it was refused as 19 steps long)."""
    from conftest import train

    common = ("data=synthetic", "data.num_train=200", "data.num_val=40", "data.batch_size=32",
              "data.shape=[8]", "data.num_classes=3", "model.hidden=[8]", "optimizer=sgd",
              "trainer.max_epochs=2", "instrument=none", "~scheduler")  # fmt: skip
    train(tmp_path, *common, *SEQUENTIAL, f"+scheduler.schedulers=[{CYCLE % 14}, {CONSTANT}]",
          "+scheduler.milestones=[20]")  # fmt: skip
    assert (tmp_path / "checkpoints" / "last.pt").exists()


def test_a_one_cycle_files_own_short_length_is_told_it_may_be_left_out(tmp_path) -> None:
    """The file's own ``total_steps`` on the outer scheduler: the trainer would set the run's
    length were it left out, and the refusal says so (a mutation test's: the fix said only
    "set it to at least 14")."""
    from conftest import train

    common = ("data=synthetic", "data.num_train=200", "data.num_val=40", "data.batch_size=32",
              "data.shape=[8]", "data.num_classes=3", "model.hidden=[8]", "optimizer=sgd",
              "trainer.max_epochs=2", "instrument=none", "~scheduler")  # fmt: skip
    with pytest.raises(ConfigError, match=r"^scheduler.total_steps: OneCycleLR's schedule is 5 "
                       r"steps and this run trains 14 optimizer steps; past its step 5 OneCycleLR "
                       r"stops the run with an error. Either leave the length out \(the trainer "
                       r"sets it to the run's\) or set it to at least that, or shorten "
                       r"the run"):  # fmt: skip
        train(tmp_path, *common, *ONE_CYCLE, "+scheduler.total_steps=5")
