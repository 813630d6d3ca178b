"""A review's findings on the 2026-12-07 fixes (a OneCycleLR inside a SequentialLR, lazy
models' dry run), broken with inputs a researcher writes; each failed before its fix."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import final_params, read_scalars, train
from torch import nn
from torch.optim.lr_scheduler import (
    ChainedScheduler,
    ConstantLR,
    LinearLR,
    OneCycleLR,
    SequentialLR,
)
from torch.utils.data import Dataset

from trainer.config import ConfigError, ContractError
from trainer.data.base import DataModule

HERE = __name__

# ---------------------------------------------------------------- schedulers (14 steps)

SCHED_COMMON = ("data=synthetic", "data.num_train=200", "data.num_val=40", "data.batch_size=32",
                "data.shape=[8]", "data.num_classes=3", "model.hidden=[8]", "optimizer=sgd",
                "trainer.max_epochs=2", "instrument=none", "logging.progress=false",
                "~scheduler")  # fmt: skip


def cycle_of_five(optimizer):
    """A listed part built by a factory of the user's: a OneCycleLR of its own length."""
    return OneCycleLR(optimizer, max_lr=0.1, total_steps=5)


def warmup_then_cycle(optimizer, total_steps):
    """A factory that takes the run's length and gets the cycle's segment one step short."""
    return SequentialLR(optimizer, [LinearLR(optimizer, 0.1, total_iters=4),
                                    OneCycleLR(optimizer, max_lr=0.1, total_steps=total_steps - 5)],
                        milestones=[4])  # fmt: skip


def chained_warmup_cycle(optimizer):
    """A ChainedScheduler whose first part is a SequentialLR (warm-up, then a 5-step cycle
    from step 4): torch steps it at every step, the cycle restarting at the milestone."""
    seq = SequentialLR(optimizer, [ConstantLR(optimizer, 0.5, total_iters=2),
                                   OneCycleLR(optimizer, max_lr=0.1, total_steps=5)],
                       milestones=[4])  # fmt: skip
    return ChainedScheduler([seq, ConstantLR(optimizer, 1.0, total_iters=1)], optimizer=optimizer)


def test_a_listed_factory_parts_short_cycle_is_refused_naming_the_part_and_a_fix_that_works(
    tmp_path,
) -> None:
    """A SequentialLR part given by a factory (called with the optimizer alone: the trainer
    passes no part a length) whose cycle is shorter than its segment: the refusal named the
    outer SequentialLR's _target_ and told to have the factory take total_steps "(the trainer
    passes the run's length)", which it does not for a part (following it, the part fails to
    build: total_steps missing)."""
    with pytest.raises(ConfigError) as caught:
        train(tmp_path, *SCHED_COMMON,
              "+scheduler._target_=torch.optim.lr_scheduler.SequentialLR",
              "+scheduler._partial_=true",
              "+scheduler.schedulers=[{_target_: torch.optim.lr_scheduler.ConstantLR, _partial_: "
              f"true, total_iters: 2}}, {{_target_: {HERE}.cycle_of_five, _partial_: "
              "true}]", "+scheduler.milestones=[4]")  # fmt: skip
    assert str(caught.value).startswith(
        "scheduler.schedulers[1]._target_ (test_lazy_and_nested_schedules.cycle_of_five): "
        "OneCycleLR's schedule is 5 steps and its segment of the SequentialLR runs 10 steps of "
        "this run's 14 (from optimizer step 4); past its step 5 OneCycleLR stops the run with "
        "an error. Either make the factory's OneCycleLR at least 10 steps, or shorten the run"
    )


def test_a_factory_taking_total_steps_is_not_told_to_take_it(tmp_path) -> None:
    """A factory that takes total_steps (the trainer passes it 14) and sizes its cycle one step
    short of its segment: the refusal's only fix was "have the factory take total_steps",
    which it already does."""
    with pytest.raises(ConfigError) as caught:
        train(tmp_path, *SCHED_COMMON, f"+scheduler._target_={HERE}.warmup_then_cycle",
              "+scheduler._partial_=true")  # fmt: skip
    assert str(caught.value).startswith(
        "scheduler._target_ (test_lazy_and_nested_schedules.warmup_then_cycle): OneCycleLR's "
        "schedule is 9 steps and its segment of the SequentialLR runs 10 steps of this run's 14 "
        "(from optimizer step 4); past its step 9 OneCycleLR stops the run with an error. "
        "Either make the factory's OneCycleLR at least 10 steps, or shorten"
    )


def test_a_sequential_inside_a_factorys_chained_scheduler_is_checked_before_training(
    tmp_path,
) -> None:
    """README: a OneCycleLR shorter than the steps it is stepped ("a factory's own, naming its
    _target_"; "in a SequentialLR, than the steps of its segment") is refused before training.
    Nested one level deeper (a SequentialLR as a ChainedScheduler's part, which torch steps
    every step) it was not checked: the run trained 9 steps and failed with torch's "Tried
    to step 6 times"."""
    with pytest.raises(ConfigError, match=r"^scheduler._target_ \(test_lazy_and_nested_schedules"
                       r".chained_warmup_cycle\): OneCycleLR's schedule is 5 steps and its "
                       r"segment of the SequentialLR runs 10 steps .* Either have the factory "
                       r"take total_steps \(the trainer passes the run's length\) and make its "
                       r"OneCycleLR at least 10 steps"):  # fmt: skip
        train(tmp_path, *SCHED_COMMON,
              "+scheduler._target_=test_lazy_and_nested_schedules.chained_warmup_cycle",
              "+scheduler._partial_=true")  # fmt: skip
    assert not list(tmp_path.rglob("step_*.pt"))


# ---------------------------------------------------------------- lazy models

LAZY_COMMON = ("data=synthetic", "data.num_train=96", "data.num_val=32", "data.batch_size=16",
               "data.shape=[8]", "data.num_classes=3", "optimizer=sgd", "trainer.max_steps=6",
               "logging.every_n_steps=2", "logging.progress=false", "~model")  # fmt: skip


def _trains_as_its_sized_twin(tmp_path, model: str) -> None:
    """The lazy model ``model`` (of this file) and its sized twin end bit for bit equal: every
    parameter and buffer, every logged number."""
    target = f"+model._target_={HERE}.{model}"
    train(tmp_path / "sized", *LAZY_COMMON, target, "+model.lazy=false")
    train(tmp_path / "lazy", *LAZY_COMMON, target)
    lazy, sized = final_params(tmp_path / "lazy"), final_params(tmp_path / "sized")
    assert lazy.keys() == sized.keys()
    for name in sized:
        assert torch.equal(lazy[name], sized[name]), name
    assert read_scalars(tmp_path / "lazy") == read_scalars(tmp_path / "sized")


class BatchStats(nn.Module):
    """Linear, batch norm normalizing with each batch's statistics (no running ones: its
    eval mode normalizes with the batch's too), linear; lazy or sized."""

    def __init__(self, in_shape, out_dim, lazy: bool = True) -> None:
        super().__init__()
        n = math.prod(in_shape)
        self.body = nn.Sequential(
            nn.Flatten(),
            nn.LazyLinear(16) if lazy else nn.Linear(n, 16),
            nn.LazyBatchNorm1d(track_running_stats=False) if lazy
            else nn.BatchNorm1d(16, track_running_stats=False),
            nn.ReLU(),
            nn.LazyLinear(out_dim) if lazy else nn.Linear(16, out_dim),
        )  # fmt: skip

    def forward(self, x):
        return self.body(x)


def test_a_lazy_model_with_batch_statistics_trains_as_its_sized_twin(tmp_path) -> None:
    """The dry run's batch of one cannot pass a batch norm without running statistics (torch:
    "Expected more than 1 value per channel when training", in eval mode): the lazy model was
    refused while its sized twin trains with batches of 16."""
    _trains_as_its_sized_twin(tmp_path, "BatchStats")


class TrainingOnlyBranch(nn.Module):
    """A lazy adapter the forward calls in training mode only (feature noise, an auxiliary
    branch): the forward calls it at every training step."""

    def __init__(self, in_shape, out_dim) -> None:
        super().__init__()
        self.enc = nn.LazyLinear(16)
        self.adapter = nn.LazyLinear(16)
        self.head = nn.LazyLinear(out_dim)

    def forward(self, x):
        h = torch.relu(self.enc(x.flatten(1)))
        if self.training:
            h = h + 0.1 * self.adapter(h)
        return self.head(h)


def test_a_lazy_module_called_in_training_mode_only_is_refused_saying_so(tmp_path) -> None:
    """The forward calls this one at every training step; the eval-mode dry run does not, and
    the refusal said "a lazy module the forward does not call" (a review's): it says eval
    mode now, and the fix (a second dry run in training mode would draw dropout masks and move
    running statistics)."""
    with pytest.raises(ContractError, match=r"^model: adapter.weight, adapter.bias still "
                       r"uninitialized after the trainer's dry run, one forward in eval mode of "
                       r"a training batch: a lazy module the forward does not call in eval mode "
                       r"\(one called in training only\) never gets its shape there; give it its "
                       r"sizes"):  # fmt: skip
        train(tmp_path, *LAZY_COMMON,
              "+model._target_=test_lazy_and_nested_schedules.TrainingOnlyBranch")  # fmt: skip


class Float64Split(Dataset):
    """Features as NumPy float64 rows (np.random's default), labels as ints."""

    def __init__(self, n: int) -> None:
        r = np.random.default_rng(0)
        self.x, self.y = r.normal(size=(n, 8)), r.integers(0, 3, n)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], int(self.y[i])


class Float64Data(DataModule):
    num_classes = 3

    def __init__(self, **common) -> None:
        super().__init__(**common)

    def load(self):
        return Float64Split(64), Float64Split(16)


@pytest.mark.parametrize("lazy", [False, True])
def test_float64_inputs_are_refused_naming_the_data_lazy_or_not(tmp_path, lazy) -> None:
    """float64 inputs to a float32 model: the sized model's first forward is refused naming
    the inputs' dtype and the fix (x.float()); the lazy twin's dry run let torch's "mat1 and
    mat2 must have the same dtype" through, naming neither."""
    with pytest.raises(ContractError, match=r"failed on the data's inputs \(torch.float64"):
        train(tmp_path, "~data", f"+data._target_={HERE}.Float64Data", "optimizer=sgd",
              "trainer.max_steps=2", "logging.progress=false", "~model",
              "+model._target_=test_lazy_models.Net",
              f"+model.lazy={str(lazy).lower()}")  # fmt: skip


class LazyBuffersOnly(nn.Module):
    """Linear, a batch norm without affine parameters (its running statistics its only lazy
    tensors: buffers, no parameter), linear; lazy or sized."""

    def __init__(self, in_shape, out_dim, lazy: bool = True) -> None:
        super().__init__()
        self.fc = nn.Linear(math.prod(in_shape), 16)
        self.norm = (nn.LazyBatchNorm1d(affine=False) if lazy
                     else nn.BatchNorm1d(16, affine=False))  # fmt: skip
        self.head = nn.Linear(16, out_dim)

    def forward(self, x):
        return self.head(torch.relu(self.norm(self.fc(x.flatten(1)))))


def test_a_model_whose_only_lazy_tensors_are_buffers_trains_as_its_sized_twin(tmp_path) -> None:
    """Lazy buffers (a LazyBatchNorm1d(affine=False)'s running statistics) are initialized by
    the dry run as lazy parameters are (a mutation test's: looking for lazy parameters alone,
    the run failed before its first step in torch's "Attempted to use an uninitialized
    parameter in <method 'numel'>", from the free-space check)."""
    _trains_as_its_sized_twin(tmp_path, "LazyBuffersOnly")


def test_a_factorys_total_steps_given_in_its_file_is_named_with_a_fix_that_works(
    tmp_path,
) -> None:
    """A factory taking total_steps, which its file sets (to 14, over the run's): the refusal
    told it to "take total_steps (the trainer passes the run's length)", which it does (the
    file's value goes over the run's; a mutation round's). It names the file's key now."""
    with pytest.raises(ConfigError, match=r"^scheduler.total_steps, given to scheduler._target_ "
                       rf"\({HERE}.warmup_then_cycle\): OneCycleLR's schedule is 9 steps .* "
                       r"Either leave scheduler.total_steps out \(the trainer passes the "
                       r"run's length\) and make the factory's OneCycleLR at least 10 "
                       r"steps"):  # fmt: skip
        train(tmp_path, *SCHED_COMMON, f"+scheduler._target_={HERE}.warmup_then_cycle",
              "+scheduler._partial_=true", "+scheduler.total_steps=14")  # fmt: skip
