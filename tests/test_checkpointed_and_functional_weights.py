"""Memory-saving and weight-handling techniques in models of one's own (activation
checkpointing, functional weights, shared submodules), measured by the instruments and
checked against independent references: a probe's findings, 2026-12-07, each failing before
its fix."""

from __future__ import annotations

import logging
import math
import re

import pytest
import torch
import torch.nn.functional as F
from conftest import final_params, train
from test_per_sample import D, float_batch, measure
from torch import nn
from torch.func import functional_call


def _left_out(text: str) -> set[str]:
    """The parameter names the warnings say are left out."""
    names: set[str] = set()
    for group in re.findall(r"its parameters left out: ([^\]]*)\]", text):
        names |= {n.strip() for n in group.split(",")}
    return names


def _jacobian_rows_over(model: nn.Module, x, y, left_out: set[str]) -> torch.Tensor:
    """‖∇θ ℓᵢ‖ over the parameters not in ``left_out`` (an unused one contributes 0)."""
    kept = [p for n, p in model.named_parameters() if n not in left_out]
    losses = F.cross_entropy(model(x), y, reduction="none")
    return torch.stack([
        torch.sqrt(sum(g.pow(2).sum() for g in torch.autograd.grad(
            losses[i], kept, retain_graph=True, allow_unused=True, materialize_grads=True)))
        for i in range(x.shape[0])
    ])  # fmt: skip


class HyperNetwork(nn.Module):
    """A hypernetwork: ``inner``'s weight generated from a code ``z`` by ``gen`` and given to
    ``inner`` through ``torch.func.functional_call`` (its own registered weight unused)."""

    def __init__(self) -> None:
        super().__init__()
        self.z = nn.Parameter(torch.randn(4))
        self.gen = nn.Linear(4, D * D)
        self.inner = nn.Linear(D, D)
        self.head = nn.Linear(D, 3)

    def forward(self, x):
        w = self.gen(self.z).view(D, D)
        h = functional_call(self.inner, {"weight": w, "bias": self.inner.bias}, (x,))
        return self.head(torch.tanh(h))


class TiedTransposeByFunctionalCall(nn.Module):
    """Output weights tied to the input projection's transpose, given to the bias-free
    ``out`` through ``functional_call`` (its own registered weight unused)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Linear(3, D, bias=False)
        self.inp = nn.Linear(D, D)
        self.out = nn.Linear(D, 3, bias=False)

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        return functional_call(self.out, {"weight": self.emb.weight.T}, (h,))


class AnothersWeights(nn.Module):
    """``a``'s forward run with ``b``'s parameters (weight sharing through functional_call)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.head = nn.Linear(D, D), nn.Linear(D, D), nn.Linear(D, 3)

    def forward(self, x):
        h = torch.tanh(self.b(x))
        h = torch.tanh(functional_call(self.a, dict(self.b.named_parameters()), (h,)))
        return self.head(h)


@pytest.mark.parametrize(
    "build", [HyperNetwork, TiedTransposeByFunctionalCall, AnothersWeights],
    ids=["hypernetwork", "tied_transpose", "anothers_weights"],
)  # fmt: skip
def test_a_unit_called_with_substituted_weights_is_not_measured_as_its_own(build, caplog):
    """``functional_call(self.inner, {"weight": w, ...}, x)`` runs inner's forward (its hooks
    fire) with a weight that is not inner's parameter: the per-sample gradient of the
    substituted ``w`` was filed under ``inner.weight`` (whose true gradient is 0) and counted
    as covered (a hypernetwork 5 % off at coverage 0.24, a tied transpose 81 % off at
    coverage 0.8, another unit's weights 30 % off at coverage 0.58). Either the unit is left
    out and named, or its rows are its own parameters'."""
    torch.manual_seed(0)
    model = build().double()
    x, y = float_batch()
    with caplog.at_level(logging.WARNING):
        last, staged = measure(model, x, y)
    out = _left_out(caplog.text)
    reference = _jacobian_rows_over(model, x, y, out)
    total = sum(p.numel() for p in model.parameters())
    kept = sum(p.numel() for n, p in model.named_parameters() if n not in out)
    assert staged["per_sample/coverage"] == pytest.approx(kept / total)
    torch.testing.assert_close(last["per_sample/grad_norm"].double(), reference, rtol=1e-5, atol=0)


class Gain(nn.Module):
    """A module of one's own (a learned gain): a generic unit, recomputed by torch.func."""

    def __init__(self) -> None:
        super().__init__()
        self.g = nn.Parameter(torch.linspace(0.5, 1.5, D))

    def forward(self, h):
        return h * self.g


class CheckpointedGain(nn.Module):
    """A module of one's own inside a non-reentrant activation checkpoint."""

    def __init__(self) -> None:
        super().__init__()
        self.inp, self.gain, self.head = nn.Linear(D, D), Gain(), nn.Linear(D, 3)

    def block(self, h):
        return torch.tanh(self.gain(h))

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        return self.head(torch.utils.checkpoint.checkpoint(self.block, h, use_reentrant=False))


def test_a_unit_of_ones_own_under_a_non_reentrant_checkpoint_is_measured(caplog) -> None:
    """docs/instrumentation.md: a non-reentrant activation checkpoint's layers are measured
    exactly. With a module of one's own inside it, the mixing check's by-value reruns of that
    unit (with gradients, inside the checkpoint's forward) saved tensors its recomputation
    (hooks removed) does not: torch's CheckpointError failed the check and every unit of the
    model was left out, coverage 0, on every step (without the checkpoint: coverage 1)."""
    torch.manual_seed(0)
    model = CheckpointedGain().double()
    x, y = float_batch()
    with caplog.at_level(logging.WARNING):
        last, staged = measure(model, x, y)
    assert "leave out" not in caplog.text, caplog.text
    assert staged["per_sample/coverage"] == 1.0
    reference = _jacobian_rows_over(model, x, y, set())
    torch.testing.assert_close(last["per_sample/grad_norm"].double(), reference, rtol=1e-5, atol=0)


class NormalizedBlockCheckpointed(nn.Module):
    """A block with a BatchNorm under a non-reentrant activation checkpoint (as checkpointed
    ResNet blocks are): its recomputation in a backward runs the BatchNorm in training mode
    again."""

    def __init__(self, in_shape, out_dim) -> None:
        super().__init__()
        self.inp = nn.Linear(math.prod(in_shape), 16)
        self.block = nn.Sequential(nn.Linear(16, 16), nn.BatchNorm1d(16), nn.Tanh())
        self.head = nn.Linear(16, out_dim)

    def forward(self, x):
        h = torch.tanh(self.inp(x.flatten(1)))
        return self.head(torch.utils.checkpoint.checkpoint(self.block, h, use_reentrant=False))


def test_curvature_leaves_the_running_statistics_of_a_checkpointed_batchnorm(tmp_path) -> None:
    """Curvature's forward runs on copies of the buffers ("BatchNorm running statistics are
    not updated"; the model's buffers are left as they are "also where its backwards run
    parts of the forward again (an activation checkpoint's)"). Its gradient and Hessian-
    vector products recompute the checkpointed block after that forward, on the model's own
    buffers: the BatchNorm's running statistics moved on every product (num_batches_tracked
    49 against 4 after 2 steps on a probe), so validation and the checkpoint differ from an
    uninstrumented run's."""
    model = ["~model", f"+model._target_={__name__}.NormalizedBlockCheckpointed",
             "trainer.max_steps=2", "data.batch_size=16"]  # fmt: skip
    on = ["instrument.curvature.every_n_steps=1", "instrument.curvature.power_iters=2",
          "instrument.curvature.trace_probes=1"]  # fmt: skip
    train(tmp_path / "none", *model, "instrument=none")
    train(tmp_path / "on", *model, "instrument=none", *on)
    plain, measured = final_params(tmp_path / "none"), final_params(tmp_path / "on")
    assert plain.keys() == measured.keys()
    for name in plain:
        assert torch.equal(plain[name], measured[name]), (name, plain[name], measured[name])


class ReentrantCheckpointed(nn.Module):
    """A block under a reentrant activation checkpoint (``use_reentrant=True``)."""

    def __init__(self, in_shape, out_dim) -> None:
        super().__init__()
        self.inp = nn.Linear(math.prod(in_shape), 16)
        self.block = nn.Sequential(nn.Linear(16, 16), nn.Tanh())
        self.head = nn.Linear(16, out_dim)

    def forward(self, x):
        h = torch.tanh(self.inp(x.flatten(1)))
        return self.head(torch.utils.checkpoint.checkpoint(self.block, h, use_reentrant=True))


def test_the_input_gradient_penalty_under_a_reentrant_checkpoint_names_itself(tmp_path):
    """Curvature under a reentrant checkpoint stops "with an error naming the fix" and the
    instrument. ``regularizer=input_grad_penalty`` (``autograd.grad`` with create_graph, and
    the step's backward with ``inputs=``) stopped the first step with torch's bare "incompatible
    with .grad() or passing an `inputs` parameter to .backward()", which names neither the
    regularizer nor how to turn it off: the user's code calls neither."""
    model = ["~model", f"+model._target_={__name__}.ReentrantCheckpointed",
             "trainer.max_steps=1", "data.batch_size=16", "instrument=none"]  # fmt: skip
    with pytest.raises(RuntimeError, match=r"^input_grad_penalty: ∇ₓL needs torch.autograd."
                       r"grad through the model, which torch.utils.checkpoint\(..., "
                       r"use_reentrant=True\) in its forward refuses; pass "
                       r"use_reentrant=False"):  # fmt: skip
        train(tmp_path / "run", *model, "regularizer=input_grad_penalty")


def test_the_logging_cadence_leaves_a_checkpointed_batchnorm_under_the_input_penalty(tmp_path):
    """With ``regularizer=input_grad_penalty``, a logging step takes the penalty's gradient
    once more (``autograd.grad`` for grad_norm/reg, trainer/objective.py), which recomputes a
    non-reentrant checkpointed block: its BatchNorm's running statistics moved once more on
    every logging step (num_batches_tracked 16 against 13 after 4 steps), so how often a run
    logs changed the model it validates and saves."""
    model = ["~model", f"+model._target_={__name__}.NormalizedBlockCheckpointed",
             "trainer.max_steps=4", "data.batch_size=16", "instrument=none",
             "regularizer=input_grad_penalty"]  # fmt: skip
    train(tmp_path / "every", *model, "logging.every_n_steps=1")
    train(tmp_path / "rarely", *model, "logging.every_n_steps=100")
    every, rarely = final_params(tmp_path / "every"), final_params(tmp_path / "rarely")
    for name in every:
        assert torch.equal(every[name], rarely[name]), (name, every[name], rarely[name])
