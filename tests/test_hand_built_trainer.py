"""A Trainer built by hand from Python, with parameter groups, a per-step scheduler, a loss of
one's own and a state_dict round trip (a probe's findings, 2026-12-07)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from trainer.config import ContractError
from trainer.data.base import InMemoryLoader, TensorSplit
from trainer.instrument import Norms
from trainer.loop import Trainer
from trainer.losses import CrossEntropy

CPU = torch.device("cpu")


class _Recorder:
    """A logger keeping every scalar by tag and step."""

    def __init__(self) -> None:
        self.s: dict[str, dict[int, float]] = {}

    def add_floats(self, floats, step, wall_time=None) -> None:
        for t, v in floats.items():
            self.s.setdefault(t, {})[step] = v

    def log_scalars(self, values, step):
        from trainer.logger import to_floats

        floats = to_floats(values)
        self.add_floats(floats, step)
        return floats

    def log_histogram_raw(self, *a, **k) -> None: ...

    def add_summary(self, *a, **k) -> None: ...

    def flush(self) -> None: ...

    def close(self) -> None: ...

    def restart_at(self, step) -> None: ...


def _split() -> TensorSplit:
    g = torch.Generator().manual_seed(0)
    return TensorSplit(torch.randn(32, 4, generator=g), torch.randint(3, (32,), generator=g))


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3))


def _trainer(model, optimizer, **kw) -> Trainer:
    split = _split()
    return Trainer(model, optimizer, InMemoryLoader(split, 8, CPU, shuffle=False),
                   InMemoryLoader(split, 8, CPU, shuffle=False), criterion=kw.pop("criterion",
                   CrossEntropy()), device=CPU, log_every_n_steps=1, **kw)  # fmt: skip


def test_a_scheduler_built_on_another_optimizer_is_refused() -> None:
    """A scheduler whose optimizer is not the Trainer's (a notebook that built the optimizer
    again and kept the old scheduler) is stepped every step and changes nothing the run
    trains with: the schedule (here: lr to 0 from the first step) is silently not applied.
    It should be refused when the Trainer is built (or at fit), naming both optimizers."""
    model = _net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    other = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(other, lambda s: 0.0)
    with pytest.raises(
        ContractError,
        match=r"^scheduler: LambdaLR is built on another "
        r"optimizer \(SGD at 0x[0-9a-f]+\) than the run's \(SGD at 0x[0-9a-f]+\): "
        r"it would set the learning rate of an optimizer the run does not step",
    ):
        _trainer(model, opt, scheduler=sched, max_steps=2)  # fmt: skip
    _trainer(model, opt, scheduler=torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0))


def test_tensors_the_optimizer_updates_beyond_the_model_are_named(caplog) -> None:
    """A loss with a learnable parameter of its own (a temperature, an ArcFace/contrastive
    head kept in the loss), given to the optimizer as a parameter group: it gets a gradient
    and is updated every step, but ``grad_norm/total`` leaves it out and ``grad_clip`` does
    not clip it, unsaid. Warned now, naming it and what leaves it out; the total is the
    model's parameters' (the norm of every gradient stepped but that one)."""
    model = _net()
    temp = nn.Parameter(torch.tensor(0.5))

    def loss(out, y):
        return F.cross_entropy(out / temp, y, reduction="none")

    seen: dict[int, float] = {}

    opt = torch.optim.SGD([{"params": model.parameters()}, {"params": [temp], "lr": 1.0}],
                          lr=0.1)  # fmt: skip

    def pre_hook(optimizer, args, kwargs) -> None:  # the model's gradients the optimizer steps
        grads = [p.grad for p in optimizer.param_groups[0]["params"] if p.grad is not None]
        seen[len(seen) + 1] = float(torch.nn.utils.get_total_norm(grads))

    rec = _Recorder()
    trainer = _trainer(model, opt, criterion=loss, max_steps=2, logger=rec,
                       callbacks=[Norms(1)])  # fmt: skip
    # (clipping off: the gradients stepped are the ones measured)
    opt.register_step_pre_hook(pre_hook)
    with caplog.at_level("WARNING", logger="trainer.loop"):
        trainer.fit()
    logged = rec.s["grad_norm/total"]
    assert logged[1] == seen[1] and logged[2] == seen[2]
    said = [r.getMessage() for r in caplog.records if "not the model's" in r.getMessage()]
    assert said == [
        "1 tensor(s) the optimizer updates are not the model's parameters (group 1: ()): the "
        "gradient norms (grad_norm/total and per parameter), the clipping (grad_clip), the "
        "non-finite guard and the histograms cover the model's parameters only and leave them "
        "out, and a checkpoint keeps their values only where their holder's state_dict does; "
        "an nn.Parameter of a module of the model is measured, clipped, guarded and kept"
    ]


def test_loading_a_state_whose_groups_hold_other_tensors_is_refused_naming_it() -> None:
    """``Trainer.load_state_dict`` ("strict: every key and shape must match") takes an
    optimizer state whose groups have the same sizes but other tensors (the groups of one's
    script reordered between the save and the resume): AdamW's moments of 0.weight (8, 4)
    land on 4.weight (3, 8), and the first step fails with torch's bare "The size of tensor a
    (4) must match the size of tensor b (8)" (with equal shapes, it would train each tensor
    with another's moments and lr, silently). It should be refused when loaded, naming the
    group and the shapes."""

    def groups(m, order):
        first, second = [{"params": [m[0].weight], "lr": 0.1},
                         {"params": [m[4].weight], "lr": 0.01}][::order]  # fmt: skip
        rest = [m[0].bias, m[2].weight, m[2].bias, m[4].bias]
        return [first, second, {"params": rest, "lr": 1e-3}]

    a = _net()
    ta = _trainer(a, torch.optim.AdamW(groups(a, 1)), max_steps=2)
    ta.fit()
    state = ta.state_dict()
    b = _net()
    tb = _trainer(b, torch.optim.AdamW(groups(b, -1)), max_steps=4)
    with pytest.raises(
        ValueError,
        match=r"^its optimizer's group 0 holds 0.weight, this run's "
        r"4.weight: the groups are not built as they were \(reordered, or other "
        r"tensors in them\); build them in the checkpoint's order$",
    ):
        tb.load_state_dict(state)
    # a checkpoint keeping no names (from before 2026-12-07): by the state's shapes
    del state["optimizer_names"]
    with pytest.raises(
        ValueError,
        match=r"^its optimizer state's exp_avg of shape \(8, 4\) "
        r"would go to 4.weight, of shape \(3, 8\): the groups are not built",
    ):
        tb.load_state_dict(state)
    # built as they were: it continues
    c = _net()
    tc = _trainer(c, torch.optim.AdamW(groups(c, 1)), max_steps=4)
    tc.load_state_dict(ta.state_dict())
    tc.fit()
