"""Models with lazy modules (``nn.LazyLinear``, ``nn.LazyBatchNorm1d``): shapes taken at the
first forward. Until 2026-12-07 such a model failed when the Trainer was built, in torch's
words ("Attempted to use an uninitialized parameter in <method 'numel'>", a session's
"noticed"): ``trainer.run`` now initializes them by torch's dry run before the optimizer is
built, and a Trainer built by hand refuses them, naming the parameters."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import StopAt, final_params, read_scalars, train
from torch import nn

from trainer.config import ContractError


class Net(nn.Module):
    """Linear, batch norm, dropout, linear: lazy (``lazy=True``) or the same layers given their
    sizes. LazyLinear draws its initial values at the dry run as Linear does when built (the
    same calls, in the same order), batch norm draws none: both models start equal, and train
    equal where the dry run draws nothing (dropout) and moves no running statistics."""

    def __init__(self, in_shape, out_dim, lazy: bool = True, width: int = 16) -> None:
        super().__init__()
        n = math.prod(in_shape)
        self.body = nn.Sequential(
            nn.Flatten(),
            nn.LazyLinear(width) if lazy else nn.Linear(n, width),
            nn.LazyBatchNorm1d() if lazy else nn.BatchNorm1d(width),
            nn.ReLU(),
            nn.Dropout(0.25),
            nn.LazyLinear(out_dim) if lazy else nn.Linear(width, out_dim),
        )

    def forward(self, x):
        return self.body(x)


class Unreached(nn.Module):
    """A lazy head its forward never calls."""

    def __init__(self, in_shape, out_dim) -> None:
        super().__init__()
        self.used = nn.Linear(math.prod(in_shape), out_dim)
        self.spare = nn.LazyLinear(out_dim)

    def forward(self, x):
        return self.used(x.flatten(1))


COMMON = ("data=synthetic", "data.num_train=96", "data.num_val=32", "data.batch_size=16",
          "data.shape=[8]", "data.num_classes=3", "optimizer=sgd", "trainer.max_steps=12",
          "logging.every_n_steps=2", "logging.progress=false", "~model",
          "+model._target_=test_lazy_models.Net")  # fmt: skip


def test_a_lazy_model_trains_as_the_same_model_built_with_its_sizes(tmp_path) -> None:
    """The lazy model's run equals its sized twin's bit for bit: parameters, batch norm's
    running statistics, every logged number. A dry run in train mode would have moved the
    running statistics by the first sample and drawn a dropout mask (the twin's trajectory
    then differs); one drawing the initial values elsewhere would start elsewhere."""
    train(tmp_path / "lazy", *COMMON)
    train(tmp_path / "sized", *COMMON, "+model.lazy=false")
    lazy, sized = final_params(tmp_path / "lazy"), final_params(tmp_path / "sized")
    assert lazy.keys() == sized.keys()
    for name in lazy:
        assert torch.equal(lazy[name], sized[name]), name
    assert read_scalars(tmp_path / "lazy") == read_scalars(tmp_path / "sized")


def test_a_stopped_lazy_run_resumes_bit_for_bit(tmp_path) -> None:
    """A resumed run builds the model again (its dry run draws new initial values) and loads
    the checkpoint over it: it ends where the uninterrupted run does."""
    train(tmp_path / "whole", *COMMON)
    with pytest.raises(SystemExit):
        train(tmp_path / "a", *COMMON, callbacks=[StopAt(5)])
    train(tmp_path / "a", *COMMON, "trainer.resume=auto",
          f"trainer.checkpoint.search_dir={tmp_path / 'a'}")  # fmt: skip
    whole, resumed = final_params(tmp_path / "whole"), final_params(tmp_path / "a")
    for name in whole:
        assert torch.equal(whole[name], resumed[name]), name
    assert read_scalars(tmp_path / "whole") == read_scalars(tmp_path / "a")


def test_the_dry_run_puts_each_module_back_in_its_mode() -> None:
    """The dry run runs in eval mode; a module the user had left in eval (a frozen batch
    norm) stays there, the others go back to training."""
    from types import SimpleNamespace

    from trainer.run import materialize_lazy

    model = Net([8], 3)
    model.body[2].eval()
    before = {name: m.training for name, m in model.named_modules()}
    materialize_lazy(model, SimpleNamespace(first_input=torch.ones(8)))
    assert {name: m.training for name, m in model.named_modules()} == before
    assert model.body[1].weight.shape == (16, 8) and model.body[5].weight.shape == (3, 16)
    assert torch.equal(model.body[2].running_mean, torch.zeros(16))  # (not moved)


def test_a_lazy_module_the_forward_never_calls_is_refused_naming_it(tmp_path) -> None:
    with pytest.raises(ContractError, match=r"model: spare.weight, spare.bias still "
                       r"uninitialized after the trainer's dry run"):  # fmt: skip
        train(tmp_path, *COMMON[:-1], "+model._target_=test_lazy_models.Unreached")


def test_a_trainer_built_by_hand_with_a_lazy_model_not_yet_run_is_refused() -> None:
    """By hand the optimizer is the user's, built before the Trainer: the dry run is theirs
    to do first (as torch's documentation asks). Refused, naming the parameters and the fix,
    instead of torch's error from inside the Trainer."""
    from trainer.data.synthetic import SyntheticData
    from trainer.loop import Trainer

    data = SyntheticData(num_train=32, num_val=8, num_classes=3, shape=[8], batch_size=8)
    data.setup(torch.device("cpu"), 0)
    torch.manual_seed(0)  # (the dry run draws the initial values: not the process's state)
    model = Net([8], 3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)

    def build() -> Trainer:
        return Trainer(model, optimizer, data.train_loader, data.val_loader,
                       criterion=nn.CrossEntropyLoss(reduction="none"),
                       device=torch.device("cpu"))  # fmt: skip

    with pytest.raises(ContractError, match=r"model: body.1.weight, body.1.bias, body.2.weight "
                       r"… not initialized yet .* run the model once on a batch before building "
                       r"its optimizer and the Trainer"):  # fmt: skip
        build()
    model(torch.ones(2, 8))  # (the dry run; the optimizer holds the same tensors, initialized)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    build().fit()
    moved = {n for n, p in model.named_parameters() if not torch.equal(before[n], p)}
    # every parameter trained but the first Linear's bias: the batch norm after it takes each
    # feature's batch mean away, so its gradient is zero but for rounding (it moved, or not,
    # by the initial values: 15 seeds in 40)
    assert moved >= set(before) - {"body.1.bias"}, moved


def test_a_model_without_lazy_modules_is_not_run_before_training() -> None:
    """The dry run is for lazy modules only: a model given its sizes is not run by it (a data
    module without a first input trains it; a forward drawing random numbers draws nothing
    before the first step). A mutation test's: run regardless, it was refused."""
    from types import SimpleNamespace

    from trainer.run import materialize_lazy

    calls = []
    model = Net([8], 3, lazy=False)
    model.register_forward_pre_hook(lambda m, a: calls.append(a))
    materialize_lazy(model, SimpleNamespace(first_input=None))
    materialize_lazy(model, SimpleNamespace(first_input=torch.ones(8)))
    assert calls == []


def test_a_lazy_model_with_no_first_input_is_refused_naming_the_data_module() -> None:
    from types import SimpleNamespace

    from trainer.run import materialize_lazy

    with pytest.raises(ContractError, match=r"^model: body.1.weight, body.1.bias, body.2.weight "
                       r"… are lazy .* SimpleNamespace gives no first training input"):  # fmt: skip
        materialize_lazy(Net([8], 3), SimpleNamespace(first_input=None))


class FailsAtForward(nn.Module):
    """A lazy model whose forward has a bug of its own (a reshape to the wrong width)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.LazyLinear(3)

    def forward(self, x):
        return self.lin(x.reshape(len(x), 5))


def test_an_error_in_the_dry_run_says_the_dry_run_raised_it() -> None:
    """The dry run's forward is the trainer's, before any step: its error carries a note saying
    so (what ran, on what, in which mode), torch's own message kept (a mutation test's: the
    note could go unnoticed)."""
    from types import SimpleNamespace

    from trainer.run import materialize_lazy

    with pytest.raises(RuntimeError, match=r"shape '\[2, 5\]' is invalid") as caught:
        materialize_lazy(FailsAtForward(), SimpleNamespace(first_input=torch.ones(8)))
    assert caught.value.__notes__ == [
        "(the trainer's dry run, one forward of SimpleNamespace's first training sample twice "
        "over as a batch of two in eval mode, initializing the lazy modules lin.weight, "
        "lin.bias, raised it)"
    ]


def test_the_dry_run_runs_on_the_device_the_model_was_built_on() -> None:
    """A model built on another device than the data's first sample (a factory building it on
    its device; here the meta device, which any CPU runs): the dry run's batch goes to the
    model, and the lazy parameters are initialized there (a mutation test's: without the move
    torch raised "Tensor on device meta is not on the expected device cpu")."""
    from types import SimpleNamespace

    from trainer.run import materialize_lazy

    model = nn.Sequential(nn.Flatten(), nn.LazyLinear(3, device="meta"))
    materialize_lazy(model, SimpleNamespace(first_input=torch.ones(8)))
    assert model[1].weight.shape == (3, 8) and model[1].weight.device.type == "meta"


def test_a_trainer_built_by_hand_with_one_lazy_parameter_is_refused() -> None:
    """One lazy parameter (a LazyLinear without bias) is refused as several are."""
    from trainer.data.synthetic import SyntheticData
    from trainer.loop import Trainer

    data = SyntheticData(num_train=32, num_val=8, num_classes=3, shape=[8], batch_size=8)
    data.setup(torch.device("cpu"), 0)
    model = nn.Sequential(nn.Flatten(), nn.LazyLinear(3, bias=False))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ContractError, match=r"^model: 1.weight not initialized yet"):
        Trainer(model, optimizer, data.train_loader, data.val_loader,
                criterion=nn.CrossEntropyLoss(reduction="none"),
                device=torch.device("cpu"))  # fmt: skip
