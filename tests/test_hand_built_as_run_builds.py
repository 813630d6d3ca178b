"""A ``Trainer`` built by hand against what ``trainer.run``'s ``build_trainer`` prepares or
checks before (and after) it builds one (a probe's findings, 2026-12-08: each now refused or
said by the Trainer itself).

``build_trainer`` wraps the model in DistributedDataParallel for a data-parallel world, builds
the loaders and the Trainer with one ``World``, refuses per-sample norms next to the
input-gradient penalty (``TrainConfig.__post_init__``), refuses a ``monitor`` that is none of
the run's metrics and a training split of no batch, and warns of ``scale_grad_by_freq``
embeddings split over ranks or micro-batches. A hand-built Trainer got none of it: each case
below either trains what the run trains / what an independent reference computes, or is
refused (or said) before training.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from test_distributed import join_group, ranks_of
from test_weighting_hand_built import CPU, B, K, N, _data, _Grads, _net
from torch import nn
from torch.func import functional_call, grad, vmap

from trainer.config import ContractError
from trainer.data.base import DeviceLoader, InMemoryLoader, TensorSplit
from trainer.distributed import World
from trainer.instrument.per_sample import PerSampleNorms
from trainer.loop import Trainer
from trainer.losses import CrossEntropy
from trainer.regularizers import InputGradPenalty


def _rank(rank: int, world: int, port: int, overrides, run_dir: str) -> None:
    """A hand-built data-parallel Trainer, ``overrides[0]`` saying which piece is not the
    world's: ``no_ddp`` (world given, no DistributedDataParallel wrapper), ``trainer_single``
    (the loaders and DDP data-parallel, the Trainer's world left SINGLE), ``loaders_single``
    (the loaders unsharded), ``consistent`` (the three alike, as trainer.run builds them);
    ``ddp_other`` (a DistributedDataParallel of another model than the Trainer's),
    ``loaders_other_rank`` (the loaders sharded for the other rank of the same world) and
    ``compiled`` (DDP inside a compiled wrapper, as torch.compile gives it)."""
    from trainer.distributed import SINGLE, World

    torch.set_num_threads(1)
    join_group(rank, world, port)
    torch.distributed.init_process_group("gloo")
    w = World(rank, world, rank)
    case = overrides[0]
    split = TensorSplit(*_data())
    model = _net()
    ddp = nn.parallel.DistributedDataParallel(_net() if case == "ddp_other" else model)
    forward_model = {"no_ddp": None, "compiled": _CompiledLike(ddp)}.get(case, ddp)
    lw = {"loaders_single": SINGLE, "loaders_other_rank": World(1 - rank, world, 1 - rank)}.get(
        case, w
    )
    grads = _Grads()
    out: dict = {}
    try:
        trainer = Trainer(
            model, torch.optim.SGD(model.parameters(), lr=0.0),
            InMemoryLoader(split, B, CPU, False, world=lw),
            InMemoryLoader(split, B, CPU, False, world=lw),
            criterion=CrossEntropy(), device=CPU, world=SINGLE if case == "trainer_single" else w,
            forward_model=forward_model, log_every_n_steps=1, callbacks=[grads],
        )  # fmt: skip
        trainer.fit()
        out["grads"] = grads.g
    except Exception as e:  # noqa: BLE001 (a refusal is an acceptable outcome)
        out["refused"] = f"{type(e).__name__}: {e}"
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    (Path(run_dir) / "out.json").write_text(json.dumps(out))
    torch.distributed.destroy_process_group()


def _reference() -> list[list[torch.Tensor]]:
    """The gradient of the mean cross-entropy over each global batch of 8, one process."""
    x, y = _data()
    model = _net()
    steps = []
    for s in range(0, N, 2 * B):
        model.zero_grad()
        F.cross_entropy(model(x[s : s + 2 * B]), y[s : s + 2 * B]).backward()
        steps.append([p.grad.clone() for p in model.parameters()])
    return steps


REFUSALS = {
    "no_ddp": "ContractError: Trainer: world is data-parallel (rank {r} of 2), and forward_model "
    "is not given: give forward_model=DistributedDataParallel(model)",
    "trainer_single": "ContractError: Trainer: forward_model is a DistributedDataParallel, and "
    "world is a single process",
    "loaders_single": "ContractError: Trainer: train_loader is sharded for rank 0 of 1, and the "
    "Trainer's world is rank {r} of 2",
}


@pytest.mark.parametrize("case", [*REFUSALS, "consistent"])
def test_a_hand_built_data_parallel_trainer_trains_the_global_batch_or_is_refused(
    tmp_path, case
) -> None:
    """A data-parallel world without DDP: each rank stepped on its own part's mean gradient
    (0.98 off the global batch's, the replicas drifting apart); DDP and the loaders sharded
    with a single-process world: every gradient half the global batch's; the loaders
    unsharded: each rank the whole batch. Each is refused before training; the three alike
    train the global batch's gradient exactly."""
    dirs = [tmp_path / "0", tmp_path / "1"]
    assert ranks_of(_rank, (case,), dirs) == [0, 0]
    want = _reference()
    for r, d in enumerate(dirs):
        out = json.loads((d / "out.json").read_text())
        if case in REFUSALS:
            assert out.get("refused", "").startswith(REFUSALS[case].format(r=r)), out
            continue
        got = out["grads"]
        assert len(got) == len(want) == 2
        for step, (g_step, w_step) in enumerate(zip(got, want, strict=True), 1):
            for g, w in zip(g_step, w_step, strict=True):
                g = torch.tensor(g, dtype=torch.float64)
                # float64 throughout: a few roundings of values of order |w|
                err = float((g - w).abs().max() / w.abs().max())
                assert err <= 1e-12, (case, r, step, err)


def test_per_sample_norms_next_to_the_input_gradient_penalty_are_refused_by_hand_too():
    """TrainConfig refuses instrument.per_sample with regularizer.input_grad_penalty (the
    penalty's double backward flows through the measured layers). By hand, the norms logged
    were 52 % off ‖∇θ ℓᵢ‖ (README, Instrumentation), unsaid; refused now. Without the
    penalty's weight (coef 0, the same graph) they are the data loss's, to float32."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 5, generator=g, dtype=torch.float64)
    y = torch.randint(K, (8,), generator=g)
    model = _net()
    params = {k: v.detach().clone() for k, v in model.named_parameters()}

    def loss(p, xi, yi):
        return F.cross_entropy(functional_call(model, p, (xi[None],)), yi[None])

    per_sample = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)
    want = torch.sqrt(sum(v.flatten(1).square().sum(1) for v in per_sample.values()))
    split = TensorSplit(x, y)

    def fit(regularizers) -> PerSampleNorms:
        cb = PerSampleNorms(1)
        Trainer(
            model, torch.optim.SGD(model.parameters(), lr=0.0),
            InMemoryLoader(split, 8, CPU, False), InMemoryLoader(split, 8, CPU, False),
            criterion=CrossEntropy(), device=CPU, regularizers=regularizers,
            callbacks=[cb], log_every_n_steps=1,
        ).fit()  # fmt: skip
        return cb

    from trainer.config import ConfigError

    with pytest.raises(ConfigError) as e:
        fit([InputGradPenalty(coef=10.0)])
    assert str(e.value) == (
        "per-sample gradient norms (PerSampleNorms) read the data loss's gradient flowing "
        "through each layer; the regularizer input_grad_penalty's double backward (an "
        "input-gradient penalty) flows through the same layers and would mix into them: use "
        "one of the two"
    )
    got = fit([]).last["per_sample/grad_norm"].double()
    err = float((got - want).abs().max() / want.max())
    # the instrument computes in float32 from float64 gradients: float32 rounding
    assert err <= 8 * torch.finfo(torch.float32).eps, (
        f"per_sample/grad_norm {got.tolist()} is not the data loss's per-sample gradient norm "
        f"{want.tolist()} (relative error {err:.3g}): the input-gradient penalty's double "
        "backward is mixed into it, unsaid"
    )


def _small(**kw) -> tuple[Trainer, torch.optim.Optimizer]:
    g = torch.Generator().manual_seed(0)
    split = TensorSplit(torch.randn(8, 5, generator=g), torch.randint(K, (8,), generator=g))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, K))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    train = kw.pop("train", None)  # (not ``or``: a loader of no batch is falsy)
    train = InMemoryLoader(split, 4, CPU, False) if train is None else train
    sched = kw.pop("scheduler", None)
    trainer = Trainer(model, opt, train, InMemoryLoader(split, 4, CPU, False),
                      criterion=CrossEntropy(), device=CPU, max_epochs=2,
                      scheduler=sched(opt) if sched else None, **kw)  # fmt: skip
    return trainer, opt


def test_a_monitor_that_is_none_of_the_runs_metrics_is_refused_before_training() -> None:
    """README: a ReduceLROnPlateau steps on ``trainer.monitor``; ``trainer.run`` refuses a
    monitor the run does not report before building anything. By hand: a bare
    ``KeyError: 'val/accuracy'`` after the first epoch's training."""
    trainer, _ = _small(
        scheduler=lambda o: torch.optim.lr_scheduler.ReduceLROnPlateau(o, mode="max")
    )
    trainer.monitor = "val/accuracy"  # (the run reports val/acc)
    from trainer.config import ConfigError

    with pytest.raises(ConfigError) as e:
        trainer.fit()
    assert trainer.global_step == 0, (
        f"fit trained {trainer.global_step} steps, then failed with {type(e.value).__name__}: "
        f"{e.value} (a monitor none of the run's metrics: refused by trainer.run before "
        "anything is built)"
    )
    assert str(e.value) == (  # (naming the metrics the run reports)
        "monitor: got 'val/accuracy', which the ReduceLROnPlateau scheduler steps on, but this "
        "run reports val/loss, val/acc, train/loss (loss: CrossEntropy, task classification); "
        "set trainer.monitor to one of them"
    )


def test_a_training_loader_of_no_batch_is_refused() -> None:
    """``trainer.run`` refuses ``data.batch_size`` larger than the training split with
    ``drop_last``; by hand, fit "completed" its epochs at step 0, train/loss NaN, unsaid."""
    g = torch.Generator().manual_seed(0)
    split = TensorSplit(torch.randn(8, 5, generator=g), torch.randint(K, (8,), generator=g))
    empty_epochs = InMemoryLoader(split, 16, CPU, False, drop_last=True)
    assert len(empty_epochs) == 0
    with pytest.raises(ValueError) as e:
        _small(train=empty_epochs)
    assert str(e.value) == (
        "Trainer: train_loader has no batch (8 samples, batches of 16, drop_last=True): "
        "nothing would train"
    )


class _Bag(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.e = nn.Embedding(6, 4, scale_grad_by_freq=True)
        self.out = nn.Linear(4, K)

    def forward(self, x):
        return self.out(self.e(x).mean(1))


def test_scale_grad_by_freq_over_micro_batches_is_said_by_hand_too(caplog) -> None:
    """``trainer.run`` says an embedding's ``scale_grad_by_freq`` splits over micro-batches
    (``check_frequency_scaling``): the step's gradient is then not the window's. A hand-built
    Trainer with ``accumulate_grad_batches=2`` trained it unsaid; the gradients differ."""
    x = torch.tensor([[0, 0, 1], [0, 2, 3], [0, 4, 5], [1, 1, 0]])
    y = torch.tensor([0, 1, 2, 0])
    model = _Bag()
    split = TensorSplit(x, y)
    trainer = Trainer(
        model, torch.optim.SGD(model.parameters(), lr=0.0),
        InMemoryLoader(split, 2, CPU, False), InMemoryLoader(split, 4, CPU, False),
        criterion=CrossEntropy(), device=CPU, accumulate_grad_batches=2,
        callbacks=[grads := _Grads()],
    )  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="trainer"):
        trainer.fit()
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    one_batch = model.e.weight.grad
    split_grad = torch.tensor(grads.g[0][0])
    assert not torch.equal(split_grad, one_batch)  # (the premise: the gradients differ)
    said = [r.getMessage() for r in caplog.records if "scale_grad_by_freq" in r.getMessage()]
    assert said == [
        "e: scale_grad_by_freq divides the gradient by each index's count in each micro-batch "
        "(2 a step), not in the step's whole batch, so this run's gradients are not those of "
        "one process on one batch (turn scale_grad_by_freq off to have them)"
    ], said


def _device_loader(split: TensorSplit, world: World) -> DeviceLoader:
    return DeviceLoader(split, B, CPU, False, num_workers=0, pin_memory=False, world=world)


def test_device_loaders_sharded_for_another_world_are_refused_like_in_memory_ones() -> None:
    """README (Data parallel): a hand-built Trainer refuses "loaders sharded for another
    world". DeviceLoader (what DataModule.setup builds with num_workers > 0) kept its world
    in its sampler only, so the check (getattr(loader, "world")) passed it: a single-process
    Trainer trained on rank 0's half of every batch and validated on half the split, its
    val/* presented as the whole split's, unsaid."""
    split = TensorSplit(*_data())
    model = _net()
    half = World(0, 2, 0)
    with pytest.raises(ContractError, match="train_loader is sharded for rank 0 of 2"):
        Trainer(
            model, torch.optim.SGD(model.parameters(), lr=0.0),
            _device_loader(split, half), _device_loader(split, half),
            criterion=CrossEntropy(), device=CPU,
        ).fit()  # fmt: skip


def _one_rank(rank: int, world: int, port: int, overrides, run_dir: str) -> None:
    """torchrun --nproc_per_node=1 and the README's recipe: World(rank, size, local_rank),
    the process group joined, forward_model=DistributedDataParallel(model)."""
    torch.set_num_threads(1)
    join_group(rank, world, port)  # (RANK=0, WORLD_SIZE=1, as torchrun sets them)
    store = torch.distributed.FileStore(str(Path(run_dir).parent / "store"), 1)
    torch.distributed.init_process_group("gloo", store=store, rank=0, world_size=1)
    w = World(rank, world, rank)
    split = TensorSplit(*_data())
    model = _net()
    out: dict = {}
    try:
        grads = _Grads()
        Trainer(
            model, torch.optim.SGD(model.parameters(), lr=0.0),
            InMemoryLoader(split, B, CPU, False, world=w),
            InMemoryLoader(split, B, CPU, False, world=w),
            criterion=CrossEntropy(), device=CPU, world=w,
            forward_model=nn.parallel.DistributedDataParallel(model), callbacks=[grads],
        ).fit()  # fmt: skip
        out["grads"] = grads.g
    except Exception as e:  # noqa: BLE001
        out["refused"] = f"{type(e).__name__}: {e}"
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    (Path(run_dir) / "out.json").write_text(json.dumps(out))
    torch.distributed.destroy_process_group()


def test_ddp_in_a_one_process_group_with_its_world_trains(tmp_path) -> None:
    """A script that always wraps the model in DDP, run by torchrun with one process: the
    group has one rank, DDP averages over it, the gradients are exactly one process's. The
    Trainer refused it ("world is a single process: give the Trainer the World its loaders and
    process group share"), though the World given is the one they share (a review's); it
    trains, bit for bit one process."""
    d = tmp_path / "0"
    assert ranks_of(_one_rank, (), [d]) == [0]
    out = json.loads((d / "out.json").read_text())
    assert "refused" not in out, out["refused"]
    x, y = _data()
    model = _net()
    for step, got in enumerate(out["grads"]):
        model.zero_grad()
        F.cross_entropy(
            model(x[step * B : (step + 1) * B]), y[step * B : (step + 1) * B]
        ).backward()
        for g, p in zip(got, model.parameters(), strict=True):
            assert torch.equal(torch.tensor(g, dtype=torch.float64), p.grad), step


# (a mutation round's, 2026-12-08: each of these failed with one small change to
# check_monitor, and passed without)


def test_a_plateau_scheduler_may_step_on_train_loss() -> None:
    """check_monitor takes train/loss, which the run reports too, as a plateau's monitor."""
    trainer, _ = _small(
        scheduler=lambda o: torch.optim.lr_scheduler.ReduceLROnPlateau(o, mode="min")
    )
    trainer.monitor = "train/loss"
    metrics = trainer.fit()
    assert trainer.global_step == 4 and "train/loss" in metrics, metrics


def test_a_monitor_none_of_the_metrics_is_taken_without_a_plateau_scheduler() -> None:
    """Only a ReduceLROnPlateau steps on the monitor: without one, fit trains (trainer.run
    refuses such a monitor as it builds; a Trainer built by hand is not refused for it)."""
    trainer, _ = _small()
    trainer.monitor = "val/accuracy"
    trainer.fit()
    assert trainer.global_step == 4


class _CompiledLike(nn.Module):
    """What torch.compile returns around a module: the module as ``_orig_mod``."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self._orig_mod = inner

    def forward(self, x):
        return self._orig_mod(x)


MORE_REFUSALS = {
    "ddp_other": "ContractError: Trainer: world is data-parallel (rank {r} of 2), and "
    "forward_model is a DistributedDataParallel of another module",
    "loaders_other_rank": "ContractError: Trainer: train_loader is sharded for rank {o} of 2, "
    "and the Trainer's world is rank {r} of 2",
}


@pytest.mark.parametrize("case", [*MORE_REFUSALS, "compiled"])
def test_a_hand_built_data_parallel_trainer_checks_which_module_and_rank(tmp_path, case) -> None:
    """(a mutation round's, 2026-12-08) DDP wrapping another module than the Trainer's (its
    model's gradients never averaged) and loaders sharded for the other rank (each rank
    trained the other's part, validated likewise) are refused; DDP inside a compiled wrapper
    (``_orig_mod``) is the data-parallel model and trains the global batch's gradient."""
    dirs = [tmp_path / "0", tmp_path / "1"]
    assert ranks_of(_rank, (case,), dirs) == [0, 0]
    want = _reference()
    for r, d in enumerate(dirs):
        out = json.loads((d / "out.json").read_text())
        if case in MORE_REFUSALS:
            assert out.get("refused", "").startswith(MORE_REFUSALS[case].format(r=r, o=1 - r)), out
            continue
        assert "refused" not in out, out["refused"]
        for g_step, w_step in zip(out["grads"], want, strict=True):
            for g, w in zip(g_step, w_step, strict=True):
                g = torch.tensor(g, dtype=torch.float64)
                err = float((g - w).abs().max() / w.abs().max())
                assert err <= 1e-12, (case, r, err)
