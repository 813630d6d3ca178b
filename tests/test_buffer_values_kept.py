"""A review of d7a2e8f: ``buffer_values_kept`` writes every buffer back with a copy,
which torch refuses for a buffer whose elements share memory (an ``expand``ed one, stride
0). Before that commit such a model trained under instrument.curvature and under
regularizer=input_grad_penalty; after it, the first measured / logging step stops with
torch's bare "more than one element of the written-to tensor refers to a single memory
location", naming neither the instrument nor the buffer."""

from __future__ import annotations

import math

import torch
from conftest import final_params, train
from torch import nn


class ExpandedBuffer(nn.Module):
    """A constant gain held as an expanded buffer (one element seen 16 times, stride 0)."""

    def __init__(self, in_shape, out_dim) -> None:
        super().__init__()
        self.inp = nn.Linear(math.prod(in_shape), 16)
        self.head = nn.Linear(16, out_dim)
        self.register_buffer("gain", torch.full((1,), 0.5).expand(16))

    def forward(self, x):
        return self.head(torch.tanh(self.inp(x.flatten(1))) * self.gain)


MODEL = ["~model", f"+model._target_={__name__}.ExpandedBuffer", "trainer.max_steps=2",
         "data.batch_size=16", "instrument=none"]  # fmt: skip


def _same(a, b) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_curvature_on_a_model_with_an_expanded_buffer_leaves_the_trajectory(tmp_path) -> None:
    on = ["instrument.curvature.every_n_steps=1", "instrument.curvature.power_iters=2",
          "instrument.curvature.trace_probes=1"]  # fmt: skip
    train(tmp_path / "none", *MODEL)
    train(tmp_path / "on", *MODEL, *on)
    _same(final_params(tmp_path / "none"), final_params(tmp_path / "on"))


def test_the_input_penalty_logging_every_step_with_an_expanded_buffer(tmp_path) -> None:
    penalty = ["regularizer=input_grad_penalty"]
    train(tmp_path / "every", *MODEL, *penalty, "logging.every_n_steps=1")
    train(tmp_path / "rarely", *MODEL, *penalty, "logging.every_n_steps=100")
    _same(final_params(tmp_path / "every"), final_params(tmp_path / "rarely"))


class PlainTensorEMA(nn.Module):
    """A running mean kept as a plain tensor attribute (not a registered buffer), updated in
    place by the training forward and subtracted from its input."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.mean = torch.zeros(d)

    def forward(self, h):
        if self.training:
            self.mean.mul_(0.9).add_(0.1 * h.detach().mean(0))
        return h - self.mean


class CheckpointedPlainEMA(nn.Module):
    """That running mean inside a non-reentrant activation checkpoint: each backward through
    the block runs its forward again, and moves the mean again."""

    def __init__(self, in_shape, out_dim) -> None:
        super().__init__()
        self.inp = nn.Linear(math.prod(in_shape), 16)
        self.block = nn.Sequential(nn.Linear(16, 16), PlainTensorEMA(16), nn.Tanh())
        self.head = nn.Linear(16, out_dim)

    def forward(self, x):
        h = torch.tanh(self.inp(x.flatten(1)))
        return self.head(torch.utils.checkpoint.checkpoint(self.block, h, use_reentrant=False))


def test_the_logging_cadence_leaves_a_checkpointed_plain_tensor_state_under_the_penalty(
    tmp_path,
) -> None:
    """The penalty's extra backward on logging steps (for grad_norm/reg) puts back the
    registered buffers only; instrument.curvature, whose products recompute the same block,
    puts back the modules' plain tensor attributes too (attributes_kept) and leaves such a
    model's trajectory as an unmeasured run's. Under the penalty, how often the run logs
    changes the model: every parameter differs after 3 steps."""
    model = ["~model", f"+model._target_={__name__}.CheckpointedPlainEMA",
             "trainer.max_steps=3", "data.batch_size=16", "instrument=none",
             "regularizer=input_grad_penalty"]  # fmt: skip
    train(tmp_path / "every", *model, "logging.every_n_steps=1")
    train(tmp_path / "rarely", *model, "logging.every_n_steps=100")
    _same(final_params(tmp_path / "every"), final_params(tmp_path / "rarely"))
