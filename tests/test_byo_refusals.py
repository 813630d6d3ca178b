"""Components a researcher brings that do not fit are refused before training, with an error
that names the cause and the fix (a probe's findings: each failed late, or with torch's own
message, or shifted other logged values)."""

from __future__ import annotations

import decimal
import functools
import json
import logging
import math
import re

import numpy as np
import pytest
import torch
from conftest import final_params, read_scalars, train
from omegaconf import OmegaConf
from torch import nn
from torch.nn import functional as F

from trainer.callbacks import Callback
from trainer.config import ConfigError
from trainer.data.base import DataModule, TensorSplit
from trainer.data.digits import DigitsData
from trainer.losses import CrossEntropy, Loss
from trainer.models.mlp import MLP

TINY = ["data.batch_size=16", "trainer.max_steps=2", "logging.every_n_steps=1",
        "instrument=none"]  # fmt: skip


class Labels(DigitsData):
    """Two classes of 4-d inputs (the digits config's keys accepted, unused), int64 labels,
    num_classes 2."""

    dtype, classes = torch.int64, 2

    def __init__(self, **digits) -> None:
        super().__init__(**digits)
        self.input_shape = None  # (from the first sample)
        self.num_classes = self.classes

    def load(self):
        g = torch.Generator().manual_seed(0)
        x = torch.randn(80, 4, generator=g)
        y = (x[:, 0] > 0).to(self.dtype)
        return TensorSplit(x[:64], y[:64]), TensorSplit(x[64:], y[64:])


class Int32Labels(Labels):
    dtype = torch.int32


class NoClassCount(Labels):
    """num_classes not set: the model's out_dim is the size of one target, 1."""

    classes = None


def labels(cls: str) -> list[str]:
    return [f"data._target_={__name__}.{cls}", *TINY]


def test_int32_labels_are_refused_naming_the_cast(tmp_path) -> None:
    with pytest.raises(ConfigError, match=r"int64 class labels; the data's are torch.int32.*"
                       r"\.long\(\)"):  # fmt: skip
        train(tmp_path, *labels("Int32Labels"))


def test_labels_beyond_the_models_outputs_are_refused_naming_num_classes(tmp_path) -> None:
    with pytest.raises(ConfigError, match=r"labels span \[0, 1\], but the model is built with "
                       r"out_dim=1.*set num_classes"):  # fmt: skip
        train(tmp_path, *labels("NoClassCount"))


class Pairs(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 8

    def __getitem__(self, i: int):
        return {"x": torch.zeros(4), "y": 0}


class DictData(DigitsData):
    def load(self):
        self.input_shape = None
        return Pairs(), Pairs()


def test_a_dataset_of_dicts_is_refused_naming_the_pairs(tmp_path) -> None:
    with pytest.raises(TypeError, match=r"samples must be \(input, target\) pairs; Pairs\[0\] "
                       r"is dict"):  # fmt: skip
        train(tmp_path, f"data._target_={__name__}.DictData", *TINY)


class StructuredInputs(torch.utils.data.Dataset):
    """(input, label) pairs whose input is a dict of tensors or a tuple of them."""

    def __init__(self, kind: str) -> None:
        self.kind = kind

    def __len__(self) -> int:
        return 8

    def __getitem__(self, i: int):
        ids, mask = torch.zeros(4), torch.ones(4)
        return ({"ids": ids, "mask": mask} if self.kind == "dict" else (ids, mask)), 0


class DictInputs(DigitsData):
    kind = "dict"

    def load(self):
        self.input_shape = None
        return StructuredInputs(self.kind), StructuredInputs(self.kind)


class TupleInputs(DictInputs):
    kind = "tuple"


@pytest.mark.parametrize("kind", ["dict", "tuple"])
def test_a_structured_input_is_refused_naming_what_the_trainer_takes(tmp_path, kind) -> None:
    """A dict or a tuple of tensors as a sample's input failed with torch's "Could not infer
    dtype of dict" (a tuple: "only integer tensors of a single element ..."), naming neither
    the data nor the fix."""
    with pytest.raises(TypeError, match=rf"input must be one tensor .*StructuredInputs\[0\]'s is "
                       rf"a {kind}, .* go into one tensor"):  # fmt: skip
        data = {"dict": "DictInputs", "tuple": "TupleInputs"}[kind]
        train(tmp_path, f"data._target_={__name__}.{data}", *TINY)


def summed_loss(output, target, scale: float = 1.0):
    """A loss function that returns the batch's sum, one number, not a loss per sample."""
    return scale * F.cross_entropy(output, target, reduction="sum")


def test_a_loss_function_of_ones_own_is_named_by_its_own_name(tmp_path) -> None:
    """A function given with ``_partial_: true`` that returns one number was named
    "loss CallableLoss returned shape ()", the wrapper's name, not the function to fix (a
    walkthrough's)."""
    with pytest.raises(ValueError, match=rf"loss CallableLoss\({__name__}\.summed_loss\) "
                       r"returned shape \(\)"):  # fmt: skip
        train(tmp_path, "~loss", f"+loss._target_={__name__}.summed_loss", "+loss._partial_=true",
              "+loss.scale=2.0", *TINY)  # fmt: skip


class Rounded(Loss):
    """Cross-entropy losses cast to int64 (``detach``: detached instead)."""

    task = "classification"

    def __init__(self, detach: bool = False) -> None:
        self.detach = detach

    def forward(self, output, target):
        losses = F.cross_entropy(output, target, reduction="none")
        return losses.detach() if self.detach else (losses * 100).long()


@pytest.mark.parametrize("mode", ["scalar", "vector"])
@pytest.mark.parametrize(("detach", "match"), [(False, "of dtype torch.int64"),
                                               (True, "that do not require grad")])  # fmt: skip
def test_losses_without_a_gradient_are_refused_naming_the_loss(tmp_path, mode, detach, match):
    with pytest.raises(ValueError, match=f"loss Rounded returned losses {match}"):
        train(tmp_path, "~loss", f"+loss._target_={__name__}.Rounded", f"+loss.detach={detach}",
              f"loss.mode={mode}", *TINY)  # fmt: skip


class Pair(nn.Module):
    """Returns (logits, an auxiliary term)."""

    def __init__(self, in_shape, out_dim: int) -> None:
        super().__init__()
        self.fc = nn.Linear(math.prod(in_shape), out_dim)

    def forward(self, x):
        logits = self.fc(x.flatten(1))
        return logits, logits.square().mean()


class PairLoss(Loss):
    task = "classification"

    def forward(self, output, target):
        logits, aux = output
        return F.cross_entropy(logits, target, reduction="none") + 0.0 * aux


@pytest.mark.parametrize("loss", [(), ("~loss", f"+loss._target_={__name__}.PairLoss")])
def test_a_model_returning_a_tuple_is_refused_at_the_first_step(tmp_path, loss) -> None:
    """With the built-in loss (torch's own message before) or a loss that unpacks it but keeps
    Loss.val_sums (which crashed after an epoch's training)."""
    with pytest.raises(TypeError, match=r"the model returned a tuple, not a tensor.*override "
                       r"val_sums"):  # fmt: skip
        train(tmp_path, "~model", f"+model._target_={__name__}.Pair", *loss, *TINY)
    assert not (tmp_path / "checkpoints" / "last.pt").exists()


class StagesWrongSizes(Callback):
    def __init__(self, values: torch.Tensor, key) -> None:
        self.values, self.key = values, key

    def on_train_step_end(self, trainer, out) -> None:
        trainer.stage_scalars({self.key: self.values})


@pytest.mark.parametrize(
    ("key", "values", "match"),
    [
        (("u/a", "u/b"), torch.tensor([1.0, 2.0, 3.0]), r"\('u/a', 'u/b'\) is 2 tags, staged "
         r"with a tensor of 3 value\(s\)"),
        (("u/a", "u/b"), torch.tensor(1.0), "is 2 tags, staged with a tensor of 1 value"),
        ("u/a", torch.ones(3), "'u/a' is one tag, staged with a tensor of 3 value"),
    ],
)  # fmt: skip
def test_a_tuple_of_tags_staged_with_another_count_of_values_is_refused(
    tmp_path, key, values, match
) -> None:
    """The step's one transfer is cut by the tags' counts: three values for two tags moved the
    third into train/loss's slot (logged 3.0 at every step, a probe's finding)."""
    with pytest.raises(ValueError, match=match):
        train(tmp_path, *TINY, callbacks=[StagesWrongSizes(values, key)])


class ReturnsAFloat(Callback):
    def on_train_step_end(self, trainer, out) -> None:
        trainer.stage_on_host(torch.ones(2), lambda v: v[0])
        trainer.stage_scalars({"u/kept": torch.tensor(float(out.step))})


def test_a_host_function_returning_no_dict_is_named_and_the_rest_is_written(tmp_path) -> None:
    with pytest.raises(ValueError, match=r"step 1: stage_on_host's function .*<lambda> returned "
                       r"float, not a dict"):  # fmt: skip
        train(tmp_path, *TINY, callbacks=[ReturnsAFloat()])
    assert read_scalars(tmp_path)["u/kept"] == [(1, 1.0)]


class Stages(Callback):
    """Stages ``values`` (a function of the trainer) in ``on_before_optimizer_step``."""

    def __init__(self, values) -> None:
        self.values = values

    def on_before_optimizer_step(self, trainer, optimizer) -> None:
        trainer.stage_scalars(self.values(trainer))


@pytest.mark.parametrize(
    ("values", "error", "match"),
    [
        (lambda t: {"grad_norm/total": torch.tensor(123.0)}, ValueError,
         "'grad_norm/total' is the trainer's own tag"),
        (lambda t: {"train/loss": -1.0}, ValueError, "'train/loss' is the trainer's own tag"),
        (lambda t: {("u/a", "val/acc"): torch.ones(2)}, ValueError, "'val/acc' is the trainer's"),
        (lambda t: {"lr/group_0": 1.0}, ValueError, "'lr/group_0' is the trainer's own tag"),
        (lambda t: {"reg/l2": 1.0}, ValueError, "'reg/l2' is the trainer's own tag"),
        (lambda t: {"_hparams_/x": 1.0}, ValueError, "'_hparams_/x' is the trainer's own tag"),
        (lambda t: {"u/s": "abc"}, TypeError, "'u/s' staged with a str; stage a number"),
        (lambda t: {("u/a", "u/b"): [1.0, 2.0]}, TypeError, r"\('u/a', 'u/b'\) staged with a list"),
        # (a tuple of tags takes a tensor of their values, not one number for all of them)
        (lambda t: {("u/a", "u/b"): 1.0}, TypeError, r"\('u/a', 'u/b'\) staged with a float"),
        (lambda t: {3: torch.ones(())}, TypeError, "a tag must be a string"),
    ],
)  # fmt: skip
def test_a_staged_tag_of_the_trainers_or_a_value_of_no_number_is_refused_where_staged(
    tmp_path, values, error, match
) -> None:
    """A callback's ``grad_norm/total`` replaced the trainer's at every step (progress line
    too), ``train/loss`` -1 was written on steps that do not log, and a string failed at the
    next logging step with float()'s message, losing that step's other values (a probe)."""
    with pytest.raises(error, match=match):
        train(tmp_path, *TINY, callbacks=[Stages(values)])


def test_a_tag_staged_twice_in_a_step_is_refused(tmp_path) -> None:
    """Two callbacks staging one tag: the later value replaced the earlier without a word."""
    one = Stages(lambda t: {"u/x": torch.tensor(1.0)})
    two = Stages(lambda t: {("u/y", "u/x"): torch.ones(2)})
    with pytest.raises(ValueError, match="'u/x' was staged twice for this step"):
        train(tmp_path, *TINY, callbacks=[one, two])


def StagesIn(hook: str, tag: str) -> Callback:  # noqa: N802 (a class, made per hook)
    """A callback staging ``{tag: 7.0}`` in the hook ``hook``."""

    def stage(self, trainer, *args) -> None:
        trainer.stage_scalars({tag: 7.0})

    return type("StagesIn", (Callback,), {hook: stage})()


@pytest.mark.parametrize(
    ("first", "second", "tag", "every"),
    [
        ("on_train_step_end", "on_rest_point", "u/x", 3),
        ("on_train_step_end", "on_validation_end", "u/x", 1),
        # an instrument's tag, staged again after its step: two points on its curve
        (None, "on_validation_end", "grad_norm/net.1.weight", 1),
    ],
)
def test_a_tag_staged_in_two_hooks_of_one_step_is_refused(
    tmp_path, first, second, tag, every
) -> None:
    """Hooks after a step (validation, the rest point) stage for that step again: a tag
    staged in two of them was written twice at the step, on steps that log and on those that
    do not (a probe: two values at every step)."""
    callbacks = [StagesIn(second, tag)] if first is None else [StagesIn(first, tag),
                                                              StagesIn(second, tag)]  # fmt: skip
    one_batch = ["data.batch_size=2000", "instrument.norms.every_n_steps=1"]  # (epochs of 1 step)
    # (by two callbacks, an instrument among them: refused as another stager's, where staged)
    refused = f"'{tag}' is staged by (StagesIn|Norms) .* and by (StagesIn|Norms)"
    with pytest.raises(ValueError, match=refused):
        train(tmp_path, *TINY, *one_batch, f"logging.every_n_steps={every}",
              "trainer.max_steps=3", callbacks=callbacks)  # fmt: skip
    # one hook a step, at every step: no complaint
    train(tmp_path / "once", *TINY, *one_batch, callbacks=[StagesIn(second, "u/y")])
    assert [s for s, _ in read_scalars(tmp_path / "once")["u/y"]] == [1, 2]


class StagesGradSlice(Callback):
    """Stages a gradient's element (a view) and its copy, before clipping."""

    def on_before_optimizer_step(self, trainer, optimizer) -> None:
        g = trainer.params[-1].grad  # (the output layer's bias: no gradient of 0)
        trainer.stage_scalars({"u/view": g[0], "u/copy": g[0].clone()})
        self.before = float(g[0])


def test_a_staged_view_is_the_value_when_staged_not_after_clipping(tmp_path) -> None:
    """A view shares its base's version counter, so its change in place (clipping, later in the
    step) went unseen and the clipped value was written (1.51e-4 for 3.81e-3, a probe)."""
    rec = StagesGradSlice()
    train(tmp_path, *TINY, "trainer.max_steps=1", "trainer.grad_clip=1e-4", callbacks=[rec])
    got = read_scalars(tmp_path)
    assert got["u/view"] == got["u/copy"] == [(1, rec.before)]
    assert abs(rec.before) > 1e-3  # (clipping to a total of 1e-4 changes it)


class SharesTooFew(Callback):
    def on_before_optimizer_step(self, trainer, optimizer) -> None:
        grads = [p.grad for p in trainer.params if p.grad is not None]
        trainer.share_grad_norms(grads, torch.stack(torch._foreach_norm(grads))[:2])


def test_shared_norms_fewer_than_the_gradients_are_refused(tmp_path) -> None:
    """Two norms for six gradients: grad_norm/total (and the clipping) took their total."""
    with pytest.raises(ValueError, match="share_grad_norms: 6 gradients and 2 norms"):
        train(tmp_path, *TINY, callbacks=[SharesTooFew()])


class SharesOneTooFew(Callback):
    def on_before_optimizer_step(self, trainer, optimizer) -> None:
        grads = [p.grad for p in trainer.params if p.grad is not None]
        trainer.share_grad_norms(grads, torch._foreach_norm(grads)[:-1])


def test_shared_norms_one_fewer_than_the_gradients_are_refused(tmp_path) -> None:
    """One norm short (five for six gradients, as the list ``torch._foreach_norm`` returns):
    refused as two for six is; the last gradient's norm would be missing from the total."""
    with pytest.raises(ValueError, match="share_grad_norms: 6 gradients and 5 norms"):
        train(tmp_path, *TINY, callbacks=[SharesOneTooFew()])


class HostFunctions(Callback):
    """A host function per step: ``bad(step)`` decides what it does; and a kept value."""

    def __init__(self, bad) -> None:
        self.bad = bad

    def on_train_step_end(self, trainer, out) -> None:
        step = out.step

        def fn(values):
            return self.bad(step) or {"u/host": values[0]}

        trainer.stage_on_host(torch.full((2,), float(step)), fn)
        trainer.stage_scalars({"u/kept": torch.tensor(float(step))})


def fails_at_3(step):
    if step == 3:
        raise ZeroDivisionError("boom")


@pytest.mark.parametrize(
    ("bad", "match"),
    [
        (fails_at_3, r"step 3: stage_on_host's function .*fn raised ZeroDivisionError: boom"),
        (lambda s: {"u/h": "abc"} if s == 3 else None, r"step 3: .*returned str for 'u/h'"),
        (lambda s: {"train/loss": 9.0} if s == 3 else None, "'train/loss' is the trainer's own"),
        (lambda s: {"u/kept": 9.0} if s == 3 else None, "'u/kept' was staged twice"),
    ],
)  # fmt: skip
def test_a_failing_host_function_loses_nothing_else(tmp_path, bad, match) -> None:
    """One host function raising at step 3 of a 4-step read lost every value of steps 1-4
    (train/loss included: the event file had no scalars); a string it returned failed with
    float()'s message and lost steps 3-4 (a probe). Now its step's other values and the
    other steps are written, and the error names the step, the function and the tag."""
    with pytest.raises(ValueError, match=match):
        train(tmp_path, *TINY, "trainer.max_steps=4", "logging.every_n_steps=4",
              callbacks=[HostFunctions(bad)])  # fmt: skip
    got = read_scalars(tmp_path)
    assert got["u/kept"] == [(s, float(s)) for s in (1, 2, 3, 4)]
    assert got["u/host"] == [(s, float(s)) for s in (1, 2, 4)]
    assert [s for s, _ in got["train/loss"]] == [4]


class StagesHistogram(Callback):
    def on_train_step_end(self, trainer, out) -> None:
        v = torch.tensor([1.0, 2.0, math.nan, math.inf, 3.0, -math.inf, 4.0])
        trainer.stage_histogram("u/h", v)
        trainer.stage_histogram("u/quiet", v, count_nonfinite=False)


def test_a_staged_histograms_nonfinite_values_are_counted(tmp_path) -> None:
    """NaN and ±Inf are left out of the histogram and its _mean and _max: they were left
    out without a trace (num 4 of 7, an Inf invisible); now ``<tag>_nonfinite`` counts them."""
    train(tmp_path, *TINY, "trainer.max_steps=1", callbacks=[StagesHistogram()])
    got = read_scalars(tmp_path)
    assert got["u/h_nonfinite"] == [(1, 3.0)]
    assert got["u/h_mean"] == [(1, 2.5)] and got["u/h_max"] == [(1, 4.0)]
    assert "u/quiet_nonfinite" not in got and got["u/quiet_mean"] == [(1, 2.5)]


class QuietOnSomeSteps(Callback):
    """Stages one histogram with a NaN each step, its NaN not counted on ``quiet`` steps."""

    def __init__(self, quiet: tuple[int, ...]) -> None:
        self.quiet = quiet

    def on_train_step_end(self, trainer, out) -> None:
        v = torch.tensor([1.0, math.nan, 3.0])
        trainer.stage_histogram("u/h", v, count_nonfinite=out.step not in self.quiet)


class RefusedThenStaged(Callback):
    """A histogram staged with a list (refused: a TypeError, caught), then as a tensor."""

    def on_train_step_end(self, trainer, out) -> None:
        with pytest.raises(TypeError, match="not a tensor"):
            trainer.stage_histogram("u/h", [1.0, math.nan], count_nonfinite=False)
        trainer.stage_histogram("u/h", torch.tensor([1.0, math.nan]))


def test_a_refused_histogram_call_leaves_its_tag_counted(tmp_path) -> None:
    """``count_nonfinite=False`` of a call refused for its values held for the call staged
    after it in the same step (a review's): only a staged call's flag counts."""
    train(tmp_path, *TINY, "trainer.max_steps=1", callbacks=[RefusedThenStaged()])
    assert read_scalars(tmp_path)["u/h_nonfinite"] == [(1, 1.0)]


@pytest.mark.parametrize("quiet", [(1,), (2,)])
def test_a_histograms_nan_uncounted_on_one_step_is_counted_on_the_others(tmp_path, quiet):
    """``count_nonfinite=False`` is the call's: it held for the tag for the rest of the run,
    and for the earlier steps still waiting to be written (staged at step 1, which does not
    log, and silenced by step 2's call), so a resumed run's counts differed (a probe's)."""
    train(tmp_path, *TINY, "trainer.max_steps=4", "logging.every_n_steps=2",
          callbacks=[QuietOnSomeSteps(quiet)])  # fmt: skip
    expected = [(s, 1.0) for s in (1, 2, 3, 4) if s not in quiet]
    assert read_scalars(tmp_path)["u/h_nonfinite"] == expected


class Empty(nn.Module):
    """An MLP with a zero-size parameter (a layer of width 0 in a sweep over widths)."""

    def __init__(self, in_shape, out_dim) -> None:
        super().__init__()
        self.fc = nn.Linear(math.prod(in_shape), out_dim)
        self.unused = nn.Parameter(torch.zeros(0))

    def forward(self, x):
        return self.fc(x.flatten(1)) + self.unused.sum()


def test_a_zero_size_parameter_trains_with_the_default_instruments(tmp_path) -> None:
    """Parameter histograms (step 1 under the defaults) crashed: aminmax of an empty tensor."""
    train(tmp_path, "data.batch_size=16", "trainer.max_steps=2", "~model",
          f"+model._target_={__name__}.Empty", "instrument.histograms.every_n_steps=1")  # fmt: skip
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from trainer.logger import event_dir

    acc = EventAccumulator(str(event_dir(tmp_path)), size_guidance={"histograms": 0})
    acc.Reload()
    assert "weight_hist/fc.weight" in acc.Tags()["histograms"]
    assert not any("unused" in t for t in acc.Tags()["histograms"])


def test_a_misspelled_histogram_range_is_refused_from_python() -> None:
    import importlib

    histograms = importlib.import_module("trainer.instrument.histograms")
    with pytest.raises(ValueError, match="got 'symetric', must be one of minmax, symmetric"):
        histograms.Histograms(1, range="symetric")


class LabelPairs(torch.utils.data.Dataset):
    """A Dataset without ``.targets``: (4-d input, label of ``dtype``) pairs."""

    def __init__(self, dtype: torch.dtype) -> None:
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(32, 4, generator=g)
        self.y = (self.x[:, 0] > 0).to(dtype)

    def __len__(self) -> int:
        return 32

    def __getitem__(self, i: int):
        return self.x[i], self.y[i]


class DatasetLabels(DigitsData):
    """LabelPairs splits; ``classes``: num_classes (None: not set)."""

    dtype, classes = torch.int64, 2

    def __init__(self, **digits) -> None:
        super().__init__(**digits)
        self.input_shape, self.num_classes = None, self.classes

    def load(self):
        return LabelPairs(self.dtype), LabelPairs(self.dtype)


class Int16DatasetLabels(DatasetLabels):
    dtype = torch.int16


class DatasetLabelsNoCount(DatasetLabels):
    classes = None


class EmptyTrain(Labels):
    def load(self):
        train, val = super().load()
        return TensorSplit(train.x[:0], train.y[:0]), val


@pytest.mark.parametrize(
    ("cls", "error", "match"),
    [
        ("Int16DatasetLabels", ConfigError, r"int64 class labels; the data's are torch.int16"),
        ("DatasetLabelsNoCount", ConfigError, r"output has shape \(16, 1\): one score per "
         r"sample.*set num_classes"),
        ("EmptyTrain", ValueError, r"data: the training split is empty"),
    ],
)  # fmt: skip
def test_labels_a_dataset_without_targets_holds_are_checked_too(tmp_path, cls, error, match):
    """A Dataset without ``.targets`` skipped the label checks: int16 labels failed at the
    first step with torch's message, labels without num_classes with an IndexError; an empty
    TensorSplit failed with an IndexError (a probe)."""
    with pytest.raises(error, match=match):
        train(tmp_path, *labels(cls))
    assert not list(tmp_path.rglob("step_*.pt"))


class FloatValLabels(DatasetLabels):
    """Class labels for training, a validation Dataset (without .targets) of float ones."""

    def load(self):
        return LabelPairs(torch.int64), LabelPairs(torch.float32)


class RegressionPairs(torch.utils.data.Dataset):
    """A Dataset without ``.targets`` of (4-d input, ``width``-d float target) pairs."""

    def __init__(self, width: int) -> None:
        self.x, self.y = torch.randn(32, 4), torch.randn(32, width)

    def __len__(self) -> int:
        return 32

    def __getitem__(self, i: int):
        return self.x[i], self.y[i]


class RegressionWidths(DatasetLabels):
    """Targets of 3 values to train on, of 2 to validate on."""

    classes = None

    def load(self):
        return RegressionPairs(3), RegressionPairs(2)


class ScalarPairs(RegressionPairs):
    """One float target per sample, as a Python float (``column``: as a (1,) tensor)."""

    def __init__(self, column: bool) -> None:
        super().__init__(1)
        self.column = column

    def __getitem__(self, i: int):
        return self.x[i], (self.y[i] if self.column else float(self.y[i, 0]))


class ScalarThenColumn(DatasetLabels):
    """Scalar targets to train on, (1,) ones to validate on: the same values per sample."""

    classes = None

    def load(self):
        return ScalarPairs(column=False), ScalarPairs(column=True)


def test_targets_of_one_value_per_sample_in_either_shape_train(tmp_path) -> None:
    """() and (1,) per sample are one value each, which the squared error flattens alike:
    refused once validation targets were checked before training (a review's finding)."""
    metrics = train(tmp_path, *labels("ScalarThenColumn"), "loss=mse")
    assert metrics["status"] == "completed" and math.isfinite(metrics["val/loss"])


class LateLabel(DatasetLabels):
    """Labels 0/1 (num_classes 2), but a 5 on one sample after the first."""

    def load(self):
        train = LabelPairs(torch.int64)
        train.y[20] = 5
        return train, LabelPairs(torch.int64)


@pytest.mark.parametrize(
    ("cls", "keys", "error", "match"),
    [
        ("FloatValLabels", [], ConfigError,
         r"the validation split's targets are torch.float32 of shape \(1,\)"),
        ("RegressionWidths", ["loss=mse"], ConfigError,
         r"validation split's targets are of shape \(2,\) per sample, the training split's "
         r"\(3,\)"),
        ("LateLabel", ["trainer.max_steps=4"], (IndexError, TypeError),
         r"a class label is outside \[0, 2\).*give it targets"),
    ],
)  # fmt: skip
def test_a_datasets_validation_targets_are_checked_before_training(tmp_path, cls, keys, error,
                                                                   match):  # fmt: skip
    """A validation Dataset without ``.targets`` was not looked at before training: a float
    label or a target of another shape failed at the first validation, after an epoch's
    training, with no checkpoint (a probe's finding); its first sample is checked now. A
    label past the classes after the first sample (not checked before training) is named
    with the reason, not torch's bare "Target 5 is out of bounds"."""
    with pytest.raises(error, match=match):
        train(tmp_path, *labels(cls), *keys)


def test_conv_inputs_of_another_dtype_are_named_at_the_first_step(tmp_path) -> None:
    """Conv's message ("Input type (double) and bias type (float) should be the same") has no
    "dtype" in it: it went through unnamed (a probe's finding)."""
    import numpy as np

    rng = np.random.default_rng(0)
    path = tmp_path / "t.npz"
    np.savez(path, x=rng.normal(size=(40, 1, 8, 8)), y=rng.integers(0, 3, size=40))
    with pytest.raises(TypeError, match=r"first forward failed on the data's inputs "
                       r"\(torch.float64; the model's parameters: torch.float32\)"):  # fmt: skip
        train(tmp_path / "run", "data=tensors", f"data.path={path}", "model=cnn", *TINY)


def test_validation_labels_past_the_classes_are_refused_before_training(tmp_path) -> None:
    """``data=tensors`` with y_val reaching past num_classes trained an epoch, then crashed in
    validation with an IndexError (a probe)."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(20, 4, generator=g), torch.arange(20) % 3
    path = tmp_path / "t.pt"
    torch.save({"x": x, "y": y, "x_val": x[:5], "y_val": torch.tensor([0, 1, 2, 5, 1])}, path)
    with pytest.raises(ConfigError, match=r"the validation split's class labels span \[0, 5\].*"
                       r"out_dim=3"):  # fmt: skip
        train(tmp_path / "run", "data=tensors", f"data.path={path}", "data.num_classes=3", *TINY)


def test_inputs_of_another_dtype_are_named_at_the_first_step(tmp_path) -> None:
    """float64 features from an .npz file (NumPy's default) failed with "mat1 and mat2 must
    have the same dtype", which names no data (a probe)."""
    import numpy as np

    rng = np.random.default_rng(0)
    path = tmp_path / "t.npz"
    np.savez(path, x=rng.normal(size=(40, 6)), y=rng.integers(0, 3, size=40))
    with pytest.raises(
        TypeError,
        match=r"first forward failed on the data's inputs "
        r"\(torch.float64; the model's parameters: torch.float32\).*np.float32",
    ):
        train(tmp_path / "run", "data=tensors", f"data.path={path}", *TINY)


class SquashFirst(nn.Module):
    """A BatchNorm on the raw inputs, then a Linear: torch's kernel has no uint8 version, and
    its message ("not implemented for 'Byte'") names no dtype."""

    def __init__(self, in_shape, out_dim) -> None:
        super().__init__()
        self.norm = nn.BatchNorm1d(math.prod(in_shape))
        self.fc = nn.Linear(math.prod(in_shape), out_dim)

    def forward(self, x):
        return self.fc(self.norm(x.flatten(1)))


def test_inputs_no_kernel_takes_are_named_at_the_first_step(tmp_path) -> None:
    """uint8 inputs into an op without a uint8 kernel were named before the first forward's
    check was narrowed to torch's dtype messages, and not after (a review's finding)."""
    import numpy as np

    rng = np.random.default_rng(0)
    path = tmp_path / "t.npz"
    np.savez(path, x=rng.integers(0, 255, size=(40, 6), dtype=np.uint8),
             y=rng.integers(0, 3, size=40))  # fmt: skip
    with pytest.raises(TypeError, match=r"first forward failed on the data's inputs "
                       r"\(torch.uint8; the model's parameters: torch.float32\)"):  # fmt: skip
        train(tmp_path / "run", "data=tensors", f"data.path={path}", "~model",
              f"+model._target_={__name__}.SquashFirst", *TINY)  # fmt: skip


class TokenModelFails(nn.Module):
    """A language model whose first forward fails for a reason other than a dtype: a head of
    the wrong width, or memory."""

    def __init__(self, vocab_size, in_shape, oom: bool = False, dropout: float = 0.0) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, 8)
        self.head = nn.Linear(7, vocab_size)
        self.oom = oom

    def forward(self, tokens):
        h = self.embed(tokens)
        if self.oom:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return self.head(h)


@pytest.mark.parametrize(
    ("oom", "error", "match"),
    [(False, RuntimeError, r"^mat1 and mat2 shapes cannot be multiplied"),
     (True, torch.OutOfMemoryError, r"^CUDA out of memory")],
)  # fmt: skip
def test_a_token_models_own_first_forward_error_is_kept(tmp_path, oom, error, match) -> None:
    """int64 token ids are not the parameters' dtype, and any error of a language model's first
    forward (a shape, out of memory) was re-raised as "cast them in the data module" (a
    review's finding): only torch's dtype messages are."""
    with pytest.raises(error, match=match) as raised:
        train(tmp_path, "experiment=chars_lm", "trainer.max_steps=1", "~model",
              f"+model._target_={__name__}.TokenModelFails", f"+model.oom={oom}")  # fmt: skip
    assert type(raised.value) is error


class Narrow(nn.Module):
    """``width`` scores per sample whatever the data's classes (or (B,) with width 0)."""

    def __init__(self, in_shape, out_dim, width: int = 5) -> None:
        super().__init__()
        self.fc = nn.Linear(math.prod(in_shape), max(width, 1))
        self.width = width

    def forward(self, x):
        out = self.fc(x.flatten(1))
        return out if self.width else out[:, 0]


@pytest.mark.parametrize(("width", "shape"), [(5, r"\(16, 5\)"), (0, r"\(16,\)")])
def test_a_model_with_fewer_scores_than_classes_is_refused_at_the_first_step(
    tmp_path, width, shape
) -> None:
    """5 scores for digits' 10 classes failed with torch's "Target 6 is out of bounds" (a
    device-side assert on CUDA); (B,) with a message about class probabilities (a probe)."""
    with pytest.raises(ConfigError, match=rf"output has shape {shape}; it must be \(batch, 10\)"):
        train(tmp_path, "~model", f"+model._target_={__name__}.Narrow", f"+model.width={width}",
              *TINY)  # fmt: skip


class RootTotal(nn.Module):
    """A parameter named ``total`` at the model's root: its norm's tag would be the loop's
    ``grad_norm/total``."""

    def __init__(self, in_shape, out_dim) -> None:
        super().__init__()
        self.fc = nn.Linear(math.prod(in_shape), out_dim)
        self.total = nn.Parameter(torch.ones(out_dim))

    def forward(self, x):
        return self.fc(x.flatten(1)) * self.total


def test_a_parameter_named_like_a_loop_tag_gets_a_tag_of_its_own(tmp_path) -> None:
    """The norms instrument staged ``grad_norm/total`` for it, which the staging check refused:
    training stopped at the first norms step (a review)."""
    train(tmp_path, "~model", f"+model._target_={__name__}.RootTotal",
          "instrument.norms.every_n_steps=1", *TINY)  # fmt: skip
    got = read_scalars(tmp_path)
    assert [s for s, _ in got["grad_norm/total (parameter)"]] == [1, 2]
    assert [s for s, _ in got["grad_norm/total"]] == [1, 2]


class LossRaising(Loss):
    """A loss of one's own raising ``error`` from its forward."""

    def __init__(self, error: str) -> None:
        self.error = error

    def forward(self, output, target):
        if self.error == "oom":
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        raise RuntimeError("my loss failed for a reason of its own")


@pytest.mark.parametrize(("error", "kind"), [("oom", torch.OutOfMemoryError),
                                             ("other", RuntimeError)])  # fmt: skip
def test_a_first_step_error_of_ones_own_loss_is_not_relabelled(tmp_path, error, kind) -> None:
    """Only dtype and index errors of the first step are re-raised naming the data; an
    out-of-memory error or a loss's own error went out as a TypeError about class labels."""
    with pytest.raises(kind) as e:
        train(tmp_path, "~loss", f"+loss._target_={__name__}.LossRaising", f"+loss.error={error}",
              *TINY)  # fmt: skip
    assert type(e.value) is kind


def test_a_plain_dataloader_given_to_the_trainer_is_refused_naming_the_loaders() -> None:
    """``Trainer(model, opt, DataLoader(...), ...)`` failed at fit() with "'DataLoader' object
    has no attribute 'set_epoch'" (a probe)."""
    from torch.utils.data import DataLoader, TensorDataset

    from trainer.loop import Trainer

    model = nn.Linear(4, 2)
    loader = DataLoader(TensorDataset(torch.randn(8, 4), torch.zeros(8, dtype=torch.long)), 4)
    with pytest.raises(TypeError, match=r"train_loader is a DataLoader without set_epoch.*"
                       r"a DataModule builds"):  # fmt: skip
        Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), loader, loader,
                criterion=F.cross_entropy, device=torch.device("cpu"))  # fmt: skip


def test_a_float64_models_validation_metrics_are_in_float64() -> None:
    """Scores apart by 1e-12 tied in float32 (val/acc 0.0 where float64 gives 1.0, a probe)."""
    from trainer.losses import CrossEntropy

    x = torch.linspace(1.0, 2.0, 8, dtype=torch.float64)
    output = torch.stack([x, x * (1 + 1e-12)], 1)
    sums = CrossEntropy().val_sums(output, torch.ones(8, dtype=torch.long))
    assert sums["val/acc"].tolist() == [8.0, 8.0] and sums["val/loss"].dtype == torch.float64


class WrongArity(Callback):
    def on_train_step_end(self, trainer) -> None:  # type: ignore[override]  (out missing)
        pass


def _counted(hook):
    """A decorator whose wrapper takes what the loop passes, around a hook of another form."""

    @functools.wraps(hook)
    def wrapper(self, trainer, out) -> None:
        hook(self, trainer, None, out)

    return wrapper


class Wrapped(Callback):
    @_counted
    def on_train_step_end(self, trainer, extra, out) -> None:  # type: ignore[override]
        self.last = out.step


class RaisesInRestPoint(Callback):
    def on_rest_point(self, trainer) -> None:
        raise RuntimeError("my bug")


def test_a_callbacks_hooks_are_checked_when_added_and_named_when_they_raise(tmp_path) -> None:
    """A hook of the wrong signature failed at the first step, after training began; the
    error a raising hook left in metrics.json named neither the callback nor the hook; the
    same instance given twice ran its hooks twice a step (a probe)."""
    called = r"cannot be called as the loop calls it, on_train_step_end\(trainer, out\)"
    with pytest.raises(TypeError, match=r"WrongArity.on_train_step_end\(trainer\) " + called):
        train(tmp_path / "arity", *TINY, callbacks=[WrongArity()])
    assert not (tmp_path / "arity" / "checkpoints" / "last.pt").exists()
    not_a_method = type("NoneHook", (Callback,), {"on_flush": None})()
    with pytest.raises(TypeError, match=r"NoneHook.on_flush is None, not a method; the loop "
                       r"calls on_flush\(trainer\)"):  # fmt: skip
        train(tmp_path / "none", *TINY, callbacks=[not_a_method])
    wrapped = Wrapped()  # (checked by the wrapper the loop calls, not the function inside)
    train(tmp_path / "wrapped", *TINY, callbacks=[wrapped])
    assert wrapped.last == 2
    twice = StagesIn("on_train_step_end", "u/x")
    with pytest.raises(ValueError, match=r"the same StagesIn instance is given twice"):
        train(tmp_path / "twice", *TINY, callbacks=[twice, twice])
    with pytest.raises(RuntimeError, match="my bug"):
        train(tmp_path / "raises", *TINY, callbacks=[RaisesInRestPoint()])
    error = json.loads((tmp_path / "raises" / "metrics.json").read_text())["error"]
    assert error == "RuntimeError: my bug (in RaisesInRestPoint.on_rest_point)"


class Misspelled(Callback):
    def on_train_step_ends(self, trainer, out) -> None:
        pass


class LightningNamed(Callback):
    def on_train_batch_end(self, trainer, outputs, batch, batch_idx) -> None:
        pass

    def on_flush(self, trainer) -> None:
        pass


class NoHooks(Callback):
    def log_it(self, trainer) -> None:
        pass


class FlagsNamedAsHooks(Callback):
    """Attributes named near a hook that are no methods: neither refused nor said."""

    on_fit_ended = False

    @property
    def on_validation_ended(self) -> bool:
        return self.on_fit_ended

    def on_fit_end(self, trainer, metrics) -> None:
        self.on_fit_ended = True


def test_a_hook_misspelled_or_of_another_framework_or_a_class_is_not_silently_ignored(
    tmp_path, caplog
) -> None:
    """A method named as a hook misspelled (``on_train_step_ends``) was never called, the run
    completing without a word; a callback's class given for an instance was "type is not a
    Callback (subclass it)", though it is one (a probe's). A near miss is refused naming the
    hook meant; another ``on_*`` method (a Lightning hook's name, a helper of one's own) and a
    callback overriding no hook are said; the refusals name the config key."""
    from trainer.run import build_user_callbacks

    typo = r"on_train_step_ends is no hook, so the loop never calls it; did you mean "
    with pytest.raises(TypeError, match=rf"callbacks: Misspelled.{typo}on_train_step_end\?"):
        train(tmp_path / "typo", *TINY, callbacks=[Misspelled()])
    with pytest.raises(TypeError, match=r"callbacks: NoHooks is a class; give an instance of "
                       r"it, NoHooks\(...\)"):  # fmt: skip
        train(tmp_path / "class", *TINY, callbacks=[NoHooks])
    flags = FlagsNamedAsHooks()  # (refused as misspelled hooks, a review's)
    with caplog.at_level(logging.WARNING, logger="trainer.loop"):
        train(tmp_path / "lightning", *TINY, callbacks=[LightningNamed(), NoHooks(), flags])
    said = [r.getMessage() for r in caplog.records]
    assert flags.on_validation_ended and not any("FlagsNamedAsHooks" in m for m in said)
    other = "LightningNamed.on_train_batch_end is no hook, so the loop never calls it"
    assert any(m.startswith(f"callbacks: {other} (the hooks: on_fit_start, ") for m in said)
    none = "NoHooks overrides none of the hooks (trainer.callbacks.Callback)"
    assert f"callbacks: {none}, so the loop never calls it" in said
    node = {"mine": {"_target_": f"{__name__}.Misspelled"}}
    with pytest.raises(TypeError, match=r"^callbacks\.mine: Misspelled\.on_train_step_ends"):
        build_user_callbacks(OmegaConf.create({"callbacks": node}))


def test_a_model_with_nothing_to_train_is_named_not_the_loss(tmp_path) -> None:
    """Every parameter frozen: the error blamed the loss for detaching its losses (a probe)."""

    class FreezeAll(Callback):
        def on_fit_start(self, trainer) -> None:
            for p in trainer.model.parameters():
                p.requires_grad_(False)

    with pytest.raises(ValueError, match=r"the model has no trainable parameter"):
        train(tmp_path, *TINY, callbacks=[FreezeAll()])


class FlushCounter(Callback):
    """Stages how often on_flush ran, under one tag."""

    def __init__(self) -> None:
        self.n = 0

    def on_flush(self, trainer) -> None:
        self.n += 1
        trainer.stage_scalars({"u/flushes": float(self.n)})


def test_a_callback_staging_in_on_flush_ends_its_run(tmp_path) -> None:
    """on_flush ran twice at the run's last step (the end's write and the final
    checkpoint's), and a callback staging a tag there had it refused as staged twice: the
    run failed at its end (a review). It runs once a step; what it stages is written."""
    flushes = FlushCounter()
    train(tmp_path, *TINY, "trainer.max_steps=4", "logging.every_n_steps=1",
          "trainer.checkpoint.every_n_steps=2", callbacks=[flushes])  # fmt: skip
    got = read_scalars(tmp_path)["u/flushes"]
    assert [s for s, _ in got] == sorted({s for s, _ in got}) and got[-1] == (4, flushes.n)


def test_a_tag_refused_as_staged_twice_leaves_the_others_to_be_written() -> None:
    """The refusal emptied the staged scalars before raising: the failure's own write lost
    the step's other values (a review). Only the entries holding the tag are dropped."""
    from trainer.metrics import Staging

    staging = Staging()
    staging.stage({"u/a": 1.0})
    assert staging.take_scalars(1) == {"u/a": 1.0}
    staging.stage({"u/a": 2.0, "u/b": 3.0})
    staging.stage({("u/c", "u/a2"): torch.ones(2)})
    with pytest.raises(ValueError, match="'u/a' was staged twice for step 1"):
        staging.take_scalars(1)
    assert set(staging.take_scalars(1)) == {"u/b", ("u/c", "u/a2")}


class Stream(torch.utils.data.IterableDataset):
    def __iter__(self):
        yield from zip(torch.randn(8, 4), range(8), strict=True)


class SplitsOfAnotherKind(Labels):
    """load() returns what a Lightning DataModule or a streaming pipeline would."""

    kind = "stream"

    def load(self):
        train, val = super().load()
        pairs = torch.utils.data.TensorDataset(train.x, train.y)
        return {
            "stream": lambda: (Stream(), val),
            "loader": lambda: (torch.utils.data.DataLoader(pairs, batch_size=4), val),
            "no_len": lambda: (train, iter([(val.x[0], val.y[0])])),
            "one": lambda: pairs,
            "three": lambda: (train, val, val),
            "tensors": lambda: ((train.x, train.y), val),  # (for TensorSplit(x, y))
            "getitems_only": lambda: (BatchesOnly(pairs), val),
        }[self.kind]()


class BatchesOnly(torch.utils.data.Dataset):
    """A Dataset with a batched fetch and no __getitem__ of its own."""

    def __init__(self, pairs) -> None:
        self.pairs = pairs

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitems__(self, indices):
        return [self.pairs[i] for i in indices]


@pytest.mark.parametrize(
    ("kind", "match"),
    [
        ("stream", r"returned a Stream as its training split, an IterableDataset; the "
                   r"trainer batches by sample index"),
        ("loader", r"returned a DataLoader as its training split; load\(\) returns the data "
                   r"sets.*return the loader's \.dataset"),
        ("no_len", r"a list_iterator as its validation split, which has no __len__ or "
                   r"__getitem__"),
        ("one", r"load\(\) returned a TensorDataset; it returns \(train, val\)"),
        ("three", r"load\(\) returned a tuple of 3; it returns \(train, val\)"),
        ("tensors", r"returned a tuple as its training split, a tuple of two Tensors; .*return "
                    r"TensorSplit\(x, y\)"),
        ("getitems_only", r"a BatchesOnly as its training split, which has no __getitem__ of "
                          r"its own \(torch's Dataset's raises NotImplementedError\)"),
    ],
    ids=["stream", "loader", "no_len", "one", "three", "tensors", "getitems_only"],
)  # fmt: skip
def test_splits_the_loaders_cannot_index_are_refused_naming_them(tmp_path, kind, match) -> None:
    """(A probe's finding: an IterableDataset failed on len() with Python's own error.)"""
    cls = type(f"Splits_{kind}", (SplitsOfAnotherKind,), {"kind": kind})
    globals()[cls.__name__] = cls  # (its _target_ is this module's attribute)
    with pytest.raises(TypeError, match=match):
        train(tmp_path, *labels(cls.__name__))


class LabelsAsItems(Labels):
    """The Labels split as a Dataset of (x, y) items with a ``targets`` attribute (``lie``:
    another one), a batched fetch (``batched``) counting its calls, Python lists as inputs
    (``lists``), or its two splits yielded (``yielded``)."""

    lie, batched, lists, yielded, augment = None, False, False, False, False
    fetches: list[int] = []

    def load(self):
        splits = [self._items(s) for s in super().load()]
        if self.yielded:
            return (s for s in splits)
        return tuple(splits)

    def _items(self, split: TensorSplit) -> torch.utils.data.Dataset:
        owner, n = self, len(split.y)

        class Items(torch.utils.data.Dataset):
            targets = {None: split.y, "short": split.y[:-1], "flipped": 1 - split.y,
                       "float": split.y.float(), "none": None}[owner.lie]  # fmt: skip

            def __len__(self) -> int:
                return n

            def __getitem__(self, i):
                x = split.x[i].tolist() if owner.lists else split.x[i]
                if owner.augment:  # (from torch's global generator, as torchvision's do)
                    x = x + 0.01 * torch.randn(x.shape)
                return x, int(split.y[i])

            if owner.batched:

                def __getitems__(self, indices):
                    owner.fetches.append(len(indices))
                    return [self[i] for i in indices]

        return Items()


@pytest.mark.parametrize(
    ("lie", "match"),
    [("short", r"the training split's Items\.targets holds 63 targets for its 64 samples"),
     ("flipped", r"the training split's Items\.targets\[0\] is 1 \(torch\.int64\), but "
                 r"Items\[0\] gives the target 0"),
     ("float", r"targets\[0\] is 0\.0 \(torch\.float32\), but Items\[0\] gives the target 0 "
               r"\(torch\.int64\)")],
    ids=["short", "flipped", "float"],
)  # fmt: skip
def test_a_targets_attribute_that_is_not_the_samples_targets_is_refused(tmp_path, lie, match):
    """The trainer checks the labels and counts the classes from ``targets``: a probe's
    all-zero ``targets`` over labels 0 and 1 gave class 1 a class-balanced weight of 0,
    silently, and a short one was taken as it was. (Checked by length, and against the first
    and the last sample.)"""
    cls = type(f"Lying_{lie}", (LabelsAsItems,), {"lie": lie})
    globals()[cls.__name__] = cls
    with pytest.raises(ValueError, match=match):
        train(tmp_path, *labels(cls.__name__), "weighting=class_balanced", "loss.mode=vector")


class ItemsAsLists(LabelsAsItems):
    lists = True


class ItemsBatched(LabelsAsItems):
    batched = True


class ItemsYielded(LabelsAsItems):
    yielded = True


def test_items_as_lists_a_batched_fetch_and_yielded_splits_train_as_tensors_do(tmp_path):
    """Inputs given as Python lists become tensors (collated, a list became one tensor per
    position, which failed at the first batch); a Dataset's ``__getitems__`` is called once
    per batch (it was never called); a ``load()`` yielding its two splits trains (refused by
    the first version of the splits' check): each the same run as the items' own."""
    train(tmp_path / "items", *labels("LabelsAsItems"))
    want = final_params(tmp_path / "items")
    for cls in ("ItemsAsLists", "ItemsBatched", "ItemsYielded"):
        LabelsAsItems.fetches.clear()
        train(tmp_path / cls, *labels(cls))
        got = final_params(tmp_path / cls)
        assert all(torch.equal(want[k], got[k]) for k in want), cls
    LabelsAsItems.fetches.clear()  # (counted in this process: no DataLoader workers)
    train(tmp_path / "counted", *labels("ItemsBatched"), "data.num_workers=0")
    # 2 steps of 16 and a validation of 16 (after the checks' single samples, fetched as
    # the batches are)
    fetches = LabelsAsItems.fetches
    assert fetches[-3:] == [16, 16, 16] and set(fetches[:-3]) == {1}, fetches


class Regression(DigitsData):
    """Regression items (float targets) with a float64 ``targets`` attribute beside samples
    whose targets are float32 tensors, or Python floats (``kind``), one of them NaN (a
    missing label the loss masks)."""

    kind = "tensor"

    def __init__(self, **digits) -> None:
        super().__init__(**digits)
        self.input_shape = self.num_classes = self.out_dim = None

    def load(self):
        g = torch.Generator().manual_seed(0)
        x = torch.randn(40, 4, generator=g)
        y = x.double().sum(1) / 3
        y[5] = math.nan
        kind = self.kind

        class Items(torch.utils.data.Dataset):
            targets = y.numpy()

            def __len__(self) -> int:
                return len(x)

            def __getitem__(self, i):
                t = float(self.targets[i]) if kind == "float" else y[i].float().reshape(1)
                return x[i], t

        return Items(), TensorSplit(x[:8], y[:8, None].float())


class RegressionFloats(Regression):
    kind = "float"


class FinitePartMSE(Loss):
    task = "regression"

    def forward(self, output, target):
        target = target.reshape(output.shape).to(output.dtype)
        ok = torch.isfinite(target)
        return torch.where(ok, output - torch.where(ok, target, 0), 0).pow(2).mean(1)


@pytest.mark.parametrize("cls", ["Regression", "RegressionFloats"])
def test_targets_the_same_to_rounding_and_nan_are_the_samples(tmp_path, cls) -> None:
    """float64 ``targets`` beside float32 (or Python float) sample targets, and NaN beside NaN,
    are the samples' targets: not refused (a review found both refused by the first check)."""
    out = train(tmp_path, f"data._target_={__name__}.{cls}", *TINY, "~loss",
                f"+loss._target_={__name__}.FinitePartMSE")  # fmt: skip
    assert math.isfinite(out["train/loss"]), out


class Table(torch.utils.data.Dataset):
    """A HuggingFace-style table: rows as dicts, fetched one by one or by the batch."""

    def __init__(self, x, y) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i):
        return {"x": self.x[i], "y": self.y[i]}

    def __getitems__(self, indices):
        return [self[i] for i in indices]


class Rows(torch.utils.data.Dataset):
    """A wrapper making a table's rows pairs, forwarding other attributes to the table."""

    def __init__(self, table) -> None:
        self.table = table

    def __len__(self) -> int:
        return len(self.table)

    def __getitem__(self, i):
        row = self.table[i]
        return row["x"], row["y"]

    def __getattr__(self, name):
        return getattr(self.__dict__["table"], name)


class WrappedTable(LabelsAsItems):
    subset = False

    def load(self):
        train, val = Labels.load(self)
        rows = Rows(Table(train.x, train.y))
        if self.subset:  # (torch's own Subset, around it: its batched fetch asks the instance)
            rows = torch.utils.data.Subset(rows, range(len(rows)))
        return rows, Rows(Table(val.x, val.y))


class WrappedTableSubset(WrappedTable):
    subset = True


def test_a_wrapper_forwarding_attributes_is_fetched_through_its_own_getitem(tmp_path) -> None:
    """The wrapped table's ``__getitems__``, reached through the wrapper's ``__getattr__``,
    is not the wrapper's batched fetch (a review's crash at the first batch), with
    ``data.train_subset`` too, and inside torch's own Subset (which asks the instance)."""
    train(tmp_path / "a", *labels("LabelsAsItems"))
    want = final_params(tmp_path / "a")
    runs = [("b", "WrappedTable", ()), ("c", "WrappedTable", ("data.train_subset=64",)),
            ("d", "WrappedTableSubset", ())]  # fmt: skip
    for sub, cls, extra in runs:
        train(tmp_path / sub, *labels(cls), *extra)
        got = final_params(tmp_path / sub)
        assert all(torch.equal(want[k], got[k]) for k in want), sub


def test_numbers_in_lists_become_the_tensor_the_checks_saw() -> None:
    """(torch.as_tensor's, as the checks before training make of the first sample.)"""
    from trainer.data.base import _numbers

    assert _numbers([0.5, 1.5]).dtype == torch.get_default_dtype()
    assert _numbers((1, 2)).dtype == torch.int64 and _numbers([True]).dtype == torch.bool
    assert _numbers([[1, 2], [3, 4]]).shape == (2, 2)
    ragged, tensors = [[1], [2, 3]], (torch.zeros(2), torch.ones(2))
    assert _numbers(ragged) is ragged and _numbers(tensors) is tensors


class Augmented(LabelsAsItems):
    augment = True


class AugmentedWithoutTargets(Augmented):
    lie = "none"  # (a targets attribute of None: none, as the trainer reads it)


def test_the_checks_samples_draw_nothing_from_the_runs_random_states(tmp_path) -> None:
    """The samples the checks before training fetch (the first, and with ``targets`` the
    last of each split) draw their augmentation from copies of the random states: a Dataset
    with ``targets`` trains as one without (the extra fetches moved torch's generator, and
    the model's initialization with it: a review's finding)."""
    train(tmp_path / "with", *labels("Augmented"))
    train(tmp_path / "without", *labels("AugmentedWithoutTargets"))
    want, got = final_params(tmp_path / "with"), final_params(tmp_path / "without")
    assert all(torch.equal(want[k], got[k]) for k in want)


def test_targets_are_compared_exactly_as_integers_and_to_rounding_as_floats() -> None:
    from trainer.data.base import _same_targets

    big = torch.tensor(2**60)
    assert not _same_targets(big + 1, big)  # (float64 would round them equal)
    assert _same_targets(torch.tensor([True]), torch.tensor(True))  # ((1,) beside ())
    assert not _same_targets(torch.zeros(2, 3), torch.zeros(3, 2))
    assert not _same_targets(torch.zeros(1, 3), torch.zeros(3, 1))  # (a review's: all 1s
    assert _same_targets(torch.zeros(3, 1), torch.zeros(3))  # squeezed, these were the same)
    assert _same_targets(torch.zeros(1, 1), torch.zeros(()))
    assert not _same_targets(torch.tensor(1j), torch.tensor(2j))  # (the imaginary parts)
    assert not _same_targets(torch.tensor(1), torch.tensor(1.0))  # (the kind: the checks read it)
    x = torch.tensor([0.1, math.nan], dtype=torch.float64)
    assert _same_targets(x.float(), x) and not _same_targets(x.float() * 1.001, x)


class BuggyNet(torch.nn.Module):
    """Takes the MLP preset's keys, and has a bug of its own: a keyword its Dropout refuses."""

    def __init__(self, in_shape, out_dim, hidden=(16,), dropout=0.0) -> None:
        super().__init__()
        self.drop = torch.nn.Dropout(dropout=dropout)


class SwallowingBuggyNet(torch.nn.Module):
    """Takes the preset's keys through **kwargs, with the same bug of its own."""

    def __init__(self, in_shape, out_dim, **kw) -> None:
        super().__init__()
        self.drop = torch.nn.Dropout(dropout=kw["dropout"])


class Inner:
    def __init__(self) -> None:
        pass


class WithAFuncMethod(torch.nn.Module):
    """Forwards **kwargs to nn.Module (which refuses them), and has a method named func."""

    def __init__(self, in_shape, out_dim, **kw) -> None:
        super().__init__(**kw)

    def func(self) -> None:
        pass


class Outer:
    def __init__(self, **kw) -> None:
        self.kw = kw


@pytest.mark.parametrize("cls", ["BuggyNet", "SwallowingBuggyNet"])
def test_a_keyword_refused_inside_a_constructor_is_not_named_a_config_key(tmp_path, cls):
    """A constructor's own bug (a keyword refused inside it, named as one of the config's
    keys) stays Hydra's error with the cause, not "model.dropout: takes no 'dropout'" (two
    reviews' findings: a named parameter, then one taken through **kwargs); a preset's key a
    class does not take is named (the fuzz cases), and a nested node's refusal is not pinned
    on the outer node's key of the same name."""
    from trainer.components import build

    with pytest.raises(Exception, match=r"_DropoutNd.__init__\(\) got an unexpected keyword "
                       r"argument 'dropout'") as raised:  # fmt: skip
        train(tmp_path, f"model._target_={__name__}.{cls}", *TINY)
    assert not isinstance(raised.value, ConfigError), raised.value
    node = {"_target_": f"{__name__}.Outer", "depth": 5,
            "inner": {"_target_": f"{__name__}.Inner", "depth": 2}}  # fmt: skip
    with pytest.raises(Exception, match=r"Inner.__init__\(\) got an unexpected") as raised:
        build("model", node)
    assert not isinstance(raised.value, ConfigError), raised.value
    # a class with a method named func is no functools.partial (a review's finding), and
    # torch's Module names the refusing class by its __name__, not its qualified name
    local = type("Local", (WithAFuncMethod,), {})
    local.__qualname__ = "maker.<locals>.Local"
    globals()["Local"] = local
    for name in ("WithAFuncMethod", "Local"):
        node = {"_target_": f"{__name__}.{name}", "in_shape": [4], "out_dim": 2, "dropout": 0.0}
        with pytest.raises(ConfigError, match=rf"model\.dropout: {__name__}\.\S*{name} takes "
                           r"no 'dropout'"):  # fmt: skip
            build("model", node)


def test_an_appended_key_of_a_node_without_a_file_of_its_own_gets_no_node_hint(tmp_path):
    """The hint to replace the node (~data +data._target_=...) is for model, data and loss:
    instrument.norms cannot be deleted (a review's finding)."""
    with pytest.raises(ConfigError, match=r"instrument\.norms\.foo: unknown key") as raised:
        train(tmp_path, "+instrument.norms.foo=1", *TINY)
    assert "replace the node" not in str(raised.value)
    # nor for a typo on a built-in class (a review's finding): only with a _target_ of one's own
    with pytest.raises(ConfigError, match=r"data\.batchsize: unknown key") as raised:
        train(tmp_path, "+data.batchsize=3", *TINY)
    assert "replace the node" not in str(raised.value)


class FailsAt5(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 12

    def __getitem__(self, i):
        if i == 5:
            raise KeyError("record 5 is gone")
        return torch.zeros(4), 0


class FailingItems(LabelsAsItems):
    def load(self):
        return FailsAt5(), Labels.load(self)[1]


def test_a_subset_of_a_dataset_without_a_batched_fetch_names_the_failing_sample(tmp_path):
    """data.train_subset's Subset is fetched sample by sample where the Dataset has no
    __getitems__ (a review: its batched fetch named four indices and a private class)."""
    with pytest.raises(KeyError) as raised:
        train(tmp_path, *labels("FailingItems"), "data.train_subset=10", "data.batch_size=10",
              "data.num_workers=0")  # fmt: skip
    assert "(data: Subset[5] raised it, of 10 by its __len__)" in raised.value.__notes__


class MeanAndLogVar(nn.Module):
    """A regression model of one's own predicting a mean and a log-variance per sample."""

    def __init__(self, in_shape, out_dim: int = 1, **_) -> None:
        super().__init__()
        self.net = nn.Linear(math.prod(in_shape), 2)

    def forward(self, x):
        return self.net(x.flatten(1))


class GaussNLL(Loss):
    """-log N(y; μ, σ²) per sample from (μ, log σ²): a regression loss whose model returns
    two values per target."""

    task = "regression"

    def forward(self, output, target):
        mean, log_var = output[:, 0], output[:, 1]
        return 0.5 * (log_var + (target.reshape(-1) - mean) ** 2 / log_var.exp())


def test_a_regression_output_val_mse_cannot_compare_is_said_at_the_first_step(
    tmp_path, caplog
) -> None:
    """val/mse compares the output with the targets element by element: a (B, 2) output for
    (B,) targets trained an epoch, then failed at the first validation naming loss=mse (a
    probe's). Now the first step warns, and validation fails naming the loss, val/mse and the
    ways out (a refusal at the first step was false where the eval-mode output differs: a
    review's)."""
    with pytest.raises(ValueError, match="loss GaussNLL \\(task regression\\): val/mse compares"):
        train(tmp_path, "data=diabetes", "~model", f"+model._target_={__name__}.MeanAndLogVar",
              "~loss", f"+loss._target_={__name__}.GaussNLL", "trainer.max_steps=20")  # fmt: skip
    said = [r.getMessage() for r in caplog.records if "first batch's output" in r.getMessage()]
    assert len(said) == 1 and "loss GaussNLL (task regression): val/mse compares" in said[0]


class CountsF1(CrossEntropy):
    """Validation metrics of one's own from counts: the F1 of class 0 from the shares of true
    positives, false positives and false negatives (ratios of sums: exact over batches and
    processes), which finalize replaces by the F1. Subclasses break the contract one way each."""

    @property
    def metrics(self):
        return (*super().metrics, "val/f1")

    def val_sums(self, output, target):
        sums = super().val_sums(output, target)
        n = torch.full((), float(target.shape[0]), device=output.device)
        pred, true = output.argmax(1) == 0, target == 0
        for name, hits in (("tp", pred & true), ("fp", pred & ~true), ("fn", ~pred & true)):
            sums[f"val/{name}"] = torch.stack([hits.sum().float(), n])
        return sums

    def finalize(self, values):
        v = super().finalize(values)
        tp, fp, fn = (v.pop(f"val/{k}") for k in ("tp", "fp", "fn"))
        return {**v, "val/f1": 2 * tp / (2 * tp + fp + fn)}


class F1Dropped(CountsF1):
    def finalize(self, values):
        return {k: v for k, v in super().finalize(values).items() if k != "val/f1"}


class F1Kept(CountsF1):  # the counts stay, not listed in metrics
    def finalize(self, values):
        return {**values, **super().finalize(dict(values))}


class F1Triple(CountsF1):
    def val_sums(self, output, target):
        return {**super().val_sums(output, target), "val/f1": torch.zeros(3)}


class F1Varying(CountsF1):
    def val_sums(self, output, target):
        sums = super().val_sums(output, target)
        if target.shape[0] < 64:  # (the last validation batch)
            del sums["val/fn"]
        return sums


class F1Tensor(CountsF1):
    def finalize(self, values):
        return {k: torch.tensor(v) for k, v in super().finalize(values).items()}


class F1NumPy(CountsF1):  # NumPy's scalars are numbers: taken, as floats
    def finalize(self, values):
        return {k: np.float32(v) for k, v in super().finalize(values).items()}


class F1Set(CountsF1):
    metrics = {"val/loss", "val/f1"}


class F1Unprefixed(CountsF1):
    metrics = ("val/loss", "val/acc", "f1")


class F1Twice(CountsF1):
    metrics = ("val/loss", "val/f1", "val/f1")


class F1String(CountsF1):
    metrics = "val/f1"


SHORT = ["data.train_subset=128", "data.batch_size=64", "data.eval_batch_size=64",
         "trainer.max_steps=4"]  # fmt: skip


def test_validation_metrics_of_ones_own_from_counts_are_exact(tmp_path) -> None:
    """An F1 from counts (the contract: ratios of sums over the samples, derived in finalize)
    against brute force over the whole validation split, in the events and metrics.json."""
    metrics = train(tmp_path, *SHORT, "~loss", f"+loss._target_={__name__}.CountsF1")
    data = DigitsData()
    _, val = data.load()
    model = MLP((1, 8, 8), 10)
    model.load_state_dict(final_params(tmp_path))
    with torch.no_grad():
        pred = model.eval()(val.x).argmax(1) == 0
    true = val.y == 0
    tp, fp, fn = ((a & b).sum().item() for a, b in ((pred, true), (pred, ~true), (~pred, true)))
    assert metrics["val/f1"] == pytest.approx(2 * tp / (2 * tp + fp + fn), rel=1e-12)
    assert json.loads((tmp_path / "metrics.json").read_text())["val/f1"] == metrics["val/f1"]
    assert [s for s, _ in read_scalars(tmp_path)["val/f1"]] == [2, 4]
    assert not any(k in metrics for k in ("val/tp", "val/fp", "val/fn"))


@pytest.mark.parametrize(("loss", "match"), [
    ("F1Dropped", r"loss F1Dropped lists \['val/f1'\] in its metrics, but neither its val_sums"),
    ("F1Triple", r"\(sum, count\) as a tensor of shape \(2,\).*'val/f1': \(3,\)"),
    ("F1Varying", r"reported \['val/acc', 'val/fp', 'val/loss', 'val/tp'\] for validation "
                  r"batch 5 and .* for the first"),
    ("F1Tensor", r"loss F1Tensor's finalize must return real numbers .*got \{'val/loss': 'Tensor'"),
])  # fmt: skip
def test_validation_metrics_breaking_the_contract_fail_at_the_first_validation(
    tmp_path, loss, match
) -> None:
    """A listed metric that finalize dropped crashed after the whole run, at metrics.json
    (a KeyError, after HPARAMS said the run succeeded; a probe's); a pair of another shape or
    names changing from batch to batch failed with torch's words or not at all. Each fails at
    the first validation now, naming the loss and the cause, recorded in metrics.json."""
    with pytest.raises((ValueError, TypeError), match=match):
        train(tmp_path, *SHORT, "~loss", f"+loss._target_={__name__}.{loss}")
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["status"] == "failed" and saved["step"] == 2, saved  # (the first epoch's end)


@pytest.mark.parametrize(("loss", "match"), [
    ("F1Unprefixed", r"loss F1Unprefixed's metrics \['f1'\] are not names under 'val/'"),
    ("F1Twice", r"loss F1Twice's metrics name \['val/f1'\] more than once"),
    ("F1String", r"loss F1String's metrics must be a tuple \(or list\) of names; got 'val/f1'"),
    ("F1Set", r"loss F1Set's metrics must be a tuple \(or list\) of names; got \{"),
])  # fmt: skip
def test_metric_names_outside_val_are_refused_before_training(tmp_path, loss, match) -> None:
    """A metric named outside val/ reached metrics.json and never TensorBoard (the events
    take val/*); refused before the first step, as are a name twice and a bare string."""
    with pytest.raises((ValueError, TypeError), match=match):
        train(tmp_path, *SHORT, "~loss", f"+loss._target_={__name__}.{loss}")
    assert "step" not in json.loads((tmp_path / "metrics.json").read_text())


def test_validation_metrics_beyond_the_listed_ones_are_warned_once(tmp_path, caplog) -> None:
    """Names finalize returns beyond metrics (the counts F1Kept keeps) were logged without a
    word and missing from metrics.json; they still reach the events, and one warning says
    where they do not go."""
    metrics = train(tmp_path, *SHORT, "~loss", f"+loss._target_={__name__}.F1Kept")
    said = [r.getMessage() for r in caplog.records if "are not in its metrics" in r.getMessage()]
    assert len(said) == 1 and "['val/fn', 'val/fp', 'val/tp'] of loss F1Kept" in said[0]
    scalars = read_scalars(tmp_path)
    assert [s for s, _ in scalars["val/tp"]] == [2, 4] and "val/f1" in scalars
    assert "val/tp" not in json.loads((tmp_path / "metrics.json").read_text())
    assert "val/tp" not in metrics and "val/f1" in metrics


def test_validation_metrics_given_as_numpy_scalars_are_taken_as_floats(tmp_path) -> None:
    """A finalize returning NumPy's scalars (numbers): written as floats, no error (a tensor
    is refused at the first validation: metrics.json failed on it after the whole run)."""
    metrics = train(tmp_path, *SHORT, "~loss", f"+loss._target_={__name__}.F1NumPy")
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert type(metrics["val/f1"]) is float and saved["val/f1"] == metrics["val/f1"]


def test_val_sums_pairs_are_checked_where_the_first_batch_gives_them() -> None:
    """The first validation batch's pairs: on the trainer's device, an index-less device
    standing for its type's (``cuda`` is ``cuda:0`` on one GPU: a first version refused every
    loss there, a review's); a sequence task's val/ppl given as the very tensor of val/loss is
    the loss's (not summed: finalize derives it), an equal copy a pair of its own."""
    from trainer.losses import TokenCrossEntropy, same_device, val_keys

    cpu = torch.device("cpu")
    assert same_device(torch.device("cuda"), torch.device("cuda", 0))
    assert same_device(torch.device("cuda", 1), torch.device("cuda"))
    assert not same_device(torch.device("cuda", 1), torch.device("cuda", 0))
    assert not same_device(torch.device("cuda"), cpu)
    pair = torch.tensor([1.0, 2.0])
    with pytest.raises(ValueError, match=r"gave 'val/acc' on meta, the trainer's device is cpu"):
        val_keys(CrossEntropy(), {"val/loss": pair, "val/acc": pair.to("meta")}, cpu)
    tokens = TokenCrossEntropy()
    names, reported = val_keys(tokens, {"val/x": pair, "val/ppl": pair, "val/loss": pair}, cpu)
    assert names == ["val/loss", "val/ppl", "val/x"] and reported == set(names)


class F1Decimal(CountsF1):
    def finalize(self, values):
        return {k: decimal.Decimal(repr(v)) for k, v in super().finalize(values).items()}


class F1Huge(CountsF1):
    def finalize(self, values):
        return {**super().finalize(values), "val/f1": 10**400}


def test_finalize_values_are_real_numbers_made_floats(tmp_path) -> None:
    """Decimals are numbers too (taken as floats); an int beyond a float is refused at the
    first validation, naming the loss (it would have failed at metrics.json)."""
    metrics = train(tmp_path / "d", *SHORT, "~loss", f"+loss._target_={__name__}.F1Decimal")
    assert type(metrics["val/f1"]) is float
    with pytest.raises(ValueError, match=r"loss F1Huge's finalize returned a number no float "):
        train(tmp_path / "h", *SHORT, "~loss", f"+loss._target_={__name__}.F1Huge")


def test_a_perplexity_that_comes_out_as_the_mean_loss_is_its_exponential() -> None:
    """A sequence task's val/ppl that finalize leaves as the loss's mean (val/loss's pair
    reported as val/ppl, finished by finalize until 2026-12-05) is exp(val/loss): exp(x) > x,
    so no perplexity is its loss's mean; also where the two sums differ in the last bit (over
    4 processes). A pair of one's own that finalize exponentiates stays as it is (a first
    version took an equal copy for the loss's, and such a loss logged exp(exp(loss)))."""
    from trainer.losses import TokenCrossEntropy, finished_metrics

    class OwnExp(TokenCrossEntropy):
        def finalize(self, values):
            return {**values, "val/ppl": math.exp(values["val/ppl"])}

    nll = 2.0
    for ppl in ((20.0, 10.0), (math.nextafter(20.0, 21.0), 10.0)):
        pairs = {"val/loss": (20.0, 10.0), "val/ppl": ppl, "val/token_acc": (3.0, 10.0)}
        got, _ = finished_metrics(TokenCrossEntropy(), pairs)
        assert got["val/ppl"] == math.exp(nll) and got["val/loss"] == nll
        assert finished_metrics(OwnExp(), pairs)[0]["val/ppl"] == pytest.approx(math.exp(nll))
    own = {"val/loss": (20.0, 10.0), "val/ppl": (80.0, 10.0), "val/token_acc": (3.0, 10.0)}
    assert finished_metrics(TokenCrossEntropy(), own)[0]["val/ppl"] == 8.0  # (its own mean)


class Targets(LabelsAsItems):
    """LabelsAsItems with ``targets``; the Dataset itself, a DataLoader without workers."""

    lie = None


class LastTargetWrong(LabelsAsItems):
    """``targets`` right at sample 0, wrong at the last one."""

    def _items(self, split):
        items = super()._items(split)
        wrong = split.y.clone()
        wrong[-1] = 1 - wrong[-1]
        type(items).targets = wrong
        return items


def test_a_targets_attribute_wrong_at_the_last_sample_is_refused_naming_it(tmp_path) -> None:
    """``targets`` is checked against the first and the last sample: one wrong at the last
    alone (a mutation checking the first only went unseen) is refused naming that index."""
    with pytest.raises(ValueError, match=r"the training split's Items\.targets\[63\] is \d "
                       r"\(torch\.int64\), but Items\[63\] gives the target \d"):  # fmt: skip
        train(tmp_path, *labels("LastTargetWrong"), "data.num_workers=0")
    assert not list(tmp_path.rglob("step_*.pt"))


@pytest.mark.parametrize("cls", ["Labels", "Targets"])
def test_a_training_subset_of_the_whole_split_trains(tmp_path, cls) -> None:
    """``data.train_subset`` equal to the split's size is the whole split (refused as more
    than it has by a ``>=``, a mutation the suite missed), and the run is the split's own."""
    train(tmp_path / "all", *labels(cls), "data.num_workers=0")
    train(tmp_path / "sub", *labels(cls), "data.num_workers=0", "data.train_subset=64")
    a, b = final_params(tmp_path / "all"), final_params(tmp_path / "sub")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_subset_of_a_dataset_with_targets_keeps_its_targets_cut_to_it(tmp_path) -> None:
    """A Dataset's ``targets`` (what the classes are counted from) is cut with
    ``data.train_subset``: the subset trains, with class-balanced weights counted from its
    own samples' labels."""
    data = Targets(batch_size=16, num_workers=0, train_subset=20)
    data.setup(torch.device("cpu"), 0)
    whole, _ = Labels.load(data)
    assert data.train_targets is not None and torch.equal(data.train_targets, whole.y[:20])
    result = train(tmp_path, *labels("Targets"), "data.num_workers=0", "data.train_subset=20",
                   "weighting=class_balanced", "loss.mode=vector")  # fmt: skip
    assert result["step"] == 2


class Triples(LabelsAsItems):
    """Samples of (input, target, metadata)."""

    def _items(self, split):
        items = super()._items(split)
        pair = type(items).__getitem__
        type(items).__getitem__ = lambda self, i: (*pair(self, i), {"id": i})
        return items


def test_samples_of_three_are_refused_before_training_naming_them(tmp_path) -> None:
    """A Dataset returning (x, y, meta) is refused before the first step, naming the sample
    and what it is."""
    with pytest.raises(TypeError, match=r"samples must be \(input, target\) pairs; Items\[0\] "
                       r"is a tuple of 3 \(several inputs go into one tensor"):  # fmt: skip
        train(tmp_path, *labels("Triples"), "data.num_workers=0")
    assert not list(tmp_path.rglob("step_*.pt"))


class ShortBatches(LabelsAsItems):
    """A ``__getitems__`` that drops a batch's last sample (single fetches are whole)."""

    batched = True

    def _items(self, split):
        items = super()._items(split)
        fetch = type(items).__getitems__
        type(items).__getitems__ = lambda self, ix: fetch(self, ix)[: max(len(ix) - 1, 1)]
        return items


def test_a_batched_fetch_returning_too_few_samples_is_refused_naming_the_counts(tmp_path):
    """``__getitems__`` returning fewer samples than indices is named with both counts (zip's
    own error named neither the Dataset nor the fetch)."""
    with pytest.raises(ValueError, match=r"data: Items\.__getitems__ returned 15 samples for "
                       r"16 indices"):  # fmt: skip
        train(tmp_path, *labels("ShortBatches"), "data.num_workers=0")


def test_a_metric_named_val_slash_alone_is_refused() -> None:
    """'val/' is the prefix, not a name: no tag under it (TensorBoard's 'val/' with nothing
    after); refused like a name outside val/, and 'val/x' taken."""
    from trainer.losses import check_metric_names

    class Bare(Loss):
        metrics = ("val/loss", "val/")

    class Named(Loss):
        metrics = ("val/loss", "val/x")

    with pytest.raises(ValueError, match=r"\['val/'\] are not names under 'val/'"):
        check_metric_names(Bare())
    check_metric_names(Named())


class ForwardsToModule(torch.nn.Module):
    """Forwards **kwargs to nn.Module, which refuses every keyword."""

    def __init__(self, in_shape, out_dim, width=4, **kw) -> None:
        super().__init__(**kw)


class Base(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()


class PassesItsOwnKeyOn(Base):
    """Takes ``width`` and (its own bug) passes it on to a base class that takes none."""

    def __init__(self, width, **kw) -> None:
        super().__init__(width=width, **kw)


def test_a_class_forwarding_kwargs_to_module_has_its_keys_checked() -> None:
    """**kwargs that end at nn.Module (or object) accept no keyword of their own: a misspelled
    key is refused before anything is built, naming the parameters that exist."""
    from trainer.components import accepted_keys, check_component

    assert accepted_keys(ForwardsToModule) == (["in_shape", "out_dim", "width"], False)
    node = {"_target_": f"{__name__}.ForwardsToModule", "widht": 3}
    with pytest.raises(ConfigError, match=r"model\.widht: \S*ForwardsToModule has no parameter "
                       r"'widht'; its parameters: in_shape, out_dim, width"):  # fmt: skip
        check_component("model", node, provided=("in_shape", "out_dim"))


def test_a_target_without_a_signature_takes_its_keys_unchecked() -> None:
    """A builtin whose signature Python cannot tell (``torch.sigmoid``): its keys cannot be
    checked, so none is refused (they reach the call, which says what it takes)."""
    from trainer.components import accepted_keys, check_component

    with pytest.raises(ValueError):
        import inspect

        inspect.signature(torch.sigmoid)
    assert accepted_keys(torch.sigmoid) == ([], True)
    node = {"_target_": "torch.sigmoid", "_partial_": True, "out": None}
    assert check_component("loss", node) is torch.sigmoid


def test_a_key_the_target_takes_refused_by_its_base_class_is_the_constructors_bug() -> None:
    """A key the class takes (``width``), refused by its base class's ``__init__`` it passed
    it on to: the constructor's bug, Hydra's error as it is, not "model.width: takes no
    'width'"."""
    from trainer.components import build

    node = {"_target_": f"{__name__}.PassesItsOwnKeyOn", "width": 3}
    with pytest.raises(Exception, match=r"Base.__init__\(\) got an unexpected keyword "
                       r"argument 'width'") as raised:  # fmt: skip
        build("model", node)
    assert not isinstance(raised.value, ConfigError), raised.value


def scaled(x, factor=2.0):
    return x * factor


#: a target that is itself a functools.partial (a module-level one)
scaled_by_3 = functools.partial(scaled, factor=3.0)


def test_a_key_a_partial_target_refuses_is_named() -> None:
    """A ``_target_`` that is a ``functools.partial``: a key its function refuses is named as
    the config's key (the partial's function is the target's own), as for a plain one."""
    from trainer.components import build

    node = {"_target_": f"{__name__}.scaled_by_3", "x": 1.0, "scale": 2.0}
    with pytest.raises(ConfigError, match=r"loss\.scale: \S*scaled takes no 'scale'"):
        build("loss", node)
    assert build("loss", {"_target_": f"{__name__}.scaled_by_3", "x": 1.0}) == 3.0


class RootNamed(nn.Module):
    """A parameter at the model's root named ``data`` or ``reg``."""

    def __init__(self, in_shape, out_dim, name="reg") -> None:
        super().__init__()
        self.fc = nn.Linear(math.prod(in_shape), out_dim)
        self.register_parameter(name, nn.Parameter(torch.ones(out_dim)))
        self.name = name

    def forward(self, x):
        return self.fc(x.flatten(1)) * getattr(self, self.name)


@pytest.mark.parametrize("name", ["data", "reg"])
def test_a_parameter_named_like_the_norms_split_gets_a_tag_of_its_own(tmp_path, name) -> None:
    """With a regularizer the loop logs grad_norm/data and grad_norm/reg: a root parameter
    named ``data`` or ``reg`` gets ``grad_norm/<name> (parameter)``, and the loop's tag keeps
    one point per step, the loop's own."""
    train(tmp_path, "~model", f"+model._target_={__name__}.RootNamed", f"+model.name={name}",
          "instrument.norms.every_n_steps=1", "regularizer=[l2]", *TINY)  # fmt: skip
    got = read_scalars(tmp_path)
    assert [s for s, _ in got[f"grad_norm/{name} (parameter)"]] == [1, 2]
    assert [s for s, _ in got[f"grad_norm/{name}"]] == [1, 2]


class LabelsOfAnotherLength(Labels):
    """The Labels split with ``extra`` labels more than inputs (fewer where negative), in the
    training split or (``where="val"``) the validation one."""

    extra, where = 5, "train"

    def load(self):
        train, val = super().load()
        split = train if self.where == "train" else val
        y = split.y
        y = torch.cat([y, y[: self.extra]]) if self.extra > 0 else y[: self.extra]
        split = TensorSplit(split.x, y)
        return (split, val) if self.where == "train" else (train, split)


@pytest.mark.parametrize(("extra", "where", "told"), [
    (5, "train", "training split whose x has 64 samples and y 69 samples"),
    (-1, "train", "training split whose x has 64 samples and y 63 samples"),
    (3, "val", "validation split whose x has 16 samples and y 19 samples"),
])  # fmt: skip
def test_a_tensor_split_of_more_or_fewer_labels_than_inputs_is_refused(
    tmp_path, extra, where, told
) -> None:
    """TensorSplit(x, y) with len(y) != len(x): more labels trained on y's first rows,
    unsaid (the extra ones counted by a class-balanced weighting), fewer failed mid-epoch on
    an index naming nothing (a probe's). Refused before training, naming both."""
    cls = type(f"Labels_{where}_{extra}", (LabelsOfAnotherLength,),
               {"extra": extra, "where": where})  # fmt: skip
    globals()[cls.__name__] = cls
    with pytest.raises(TypeError, match=rf"{told}: a TensorSplit holds one target"):
        train(tmp_path, *labels(cls.__name__))
    assert not (tmp_path / "checkpoints").exists()


class WiderValidation(Labels):
    """Validation inputs of 5 features where the training ones have 4."""

    def load(self):
        train, val = super().load()
        return train, TensorSplit(torch.cat([val.x, val.x[:, :1]], 1), val.y)


def test_validation_inputs_of_another_shape_are_said_before_training(tmp_path, caplog) -> None:
    """A validation split of another input shape failed at the first validation, an epoch's
    training later, with torch's shape error naming neither split (a probe's). Said at the
    start (not refused: a convolutional model may be validated at another resolution)."""
    with caplog.at_level("WARNING"), pytest.raises(RuntimeError, match="shapes cannot be"):
        train(tmp_path, *labels("WiderValidation"))
    said = [r.getMessage() for r in caplog.records if "validation inputs" in r.getMessage()]
    assert said == [
        "data: WiderValidation's validation inputs are of shape (5,) and its training inputs "
        "(4,) (the first sample of each): a model that takes one input shape fails at the "
        "first validation, after an epoch's training"
    ]


def test_an_int_label_beside_a_tensor_one_is_named_by_the_collate_note() -> None:
    """torch's default collation of an int target beside a tensor one raised a TypeError
    ("only integer tensors of a single element can be converted to an index") without the
    note naming the shapes and the samples that a RuntimeError of the same mismatch gets (a
    probe's)."""
    from trainer.data.base import _collate_pairs

    triples = [(torch.zeros(3), 1, 10), (torch.zeros(3), 0, 11), (torch.zeros(3), 1, 12),
               (torch.zeros(3), torch.tensor([1, 1]), 13)]  # fmt: skip
    with pytest.raises(TypeError) as caught:
        _collate_pairs(triples)
    (note,) = caught.value.__notes__
    assert note.startswith("(data: the batch's targets have different shapes, ")
    assert "a Python int at indices 10, 11, 12; (2,) at indices 13: " in note


NO_SAMPLES = "no sample dimension (a 0-d tensor)"


@pytest.mark.parametrize(("x", "y", "told"), [
    (torch.zeros(4, 3), torch.tensor(1), f"x has 4 samples and y {NO_SAMPLES}"),
    (torch.tensor(0.5), torch.zeros(4), f"x has {NO_SAMPLES} and y 4 samples"),
])  # fmt: skip
def test_a_tensor_split_of_a_0d_tensor_is_refused_naming_it(x, y, told) -> None:
    """A 0-d ``x`` or ``y`` has no samples to count: the check of one target per input read
    its first dimension, and failed with Python's "tuple index out of range", naming
    neither the split nor the tensor. Refused as the other mismatches are, naming both."""
    from trainer.config import ContractError
    from trainer.data.base import _check_split

    said = rf"Mine\.load\(\) returned a TensorSplit as its training split whose {re.escape(told)}"
    with pytest.raises(ContractError, match=rf"{said}: a TensorSplit holds one"):
        _check_split(TensorSplit(x, y), "training", "Mine")


class DictNet(nn.Module):
    """A classifier with an auxiliary head, returning a dict."""

    def __init__(self, in_shape, out_dim: int) -> None:
        super().__init__()
        d = int(torch.tensor(in_shape).prod())
        self.body, self.head, self.aux = (
            nn.Linear(d, 16),
            nn.Linear(16, out_dim),
            nn.Linear(16, out_dim),
        )

    def forward(self, x):
        h = torch.tanh(self.body(x.flatten(1)))
        return {"logits": self.head(h), "aux": self.aux(h)}


class TupleNet(DictNet):
    def forward(self, x):
        out = super().forward(x)
        return out["logits"], out["aux"]


class AuxLoss(Loss):
    """CE of the main head + 0.3 CE of the auxiliary one, per sample; own val_sums."""

    task = "classification"

    @staticmethod
    def parts(output):
        return (output["logits"], output["aux"]) if isinstance(output, dict) else output

    def forward(self, output, target):
        logits, aux = self.parts(output)
        return (F.cross_entropy(logits, target, reduction="none")
                + 0.3 * F.cross_entropy(aux, target, reduction="none"))  # fmt: skip

    def val_sums(self, output, target):
        logits, _ = self.parts(output)
        n = torch.tensor(float(target.shape[0]), device=target.device)
        return {
            "val/loss": torch.stack([self.forward(output, target).sum(), n]),
            "val/acc": torch.stack([(logits.argmax(1) == target).sum().float(), n]),
        }


@pytest.mark.parametrize("net", ["DictNet", "TupleNet"])
@pytest.mark.parametrize("weighting", [
    ["weighting=per_class", "weighting.weights=[1,2,1,1,1,1,1,1,1,1]"],
    ["weighting=hard_topk"],
    ["weighting=focal"],
])  # fmt: skip
def test_a_weighting_trains_a_model_returning_a_dict_or_tuple(tmp_path, net, weighting) -> None:
    """per_class and hard_topk never read the output, yet the weighting detached it as one
    tensor: "'dict' object has no attribute 'detach'" at the first step (a probe's). Each of
    the output's tensors is detached now, and they train; focal, which reads the output as
    class logits, is refused naming it (a loss of one's own gives no -log p to read)."""
    keys = ["~model", f"+model._target_={__name__}.{net}", "~loss", "loss.mode=vector",
            f"+loss._target_={__name__}.AuxLoss", *weighting, *TINY]  # fmt: skip
    if weighting == ["weighting=focal"]:
        kind = "dict" if net == "DictNet" else "tuple"
        said = f"weighting=focal reads the model's output as class logits .*returned a {kind}"
        with pytest.raises(ValueError, match=said):
            train(tmp_path, *keys)
        return
    assert train(tmp_path, *keys)["status"] == "completed"


class AddsToTheBase(AuxLoss):
    """Adds a metric to the base class's val/loss (the README's pattern,
    ``super().val_sums(...)``), its model returning a tuple."""

    task = None

    @property
    def metrics(self):
        return ("val/loss", "val/aux_acc")

    def val_losses(self, output, target):
        return self.forward(output, target)

    def val_sums(self, output, target):
        sums = Loss.val_sums(self, output, target)  # super() of AuxLoss's
        _, aux = self.parts(output)
        n = torch.tensor(float(target.shape[0]), device=target.device)
        sums["val/aux_acc"] = torch.stack([(aux.argmax(1) == target).sum().float(), n])
        return sums


def test_a_loss_adding_to_the_base_val_sums_for_a_tuple_output_is_told_how(tmp_path) -> None:
    """An override of val_sums calling the base class's with the model's tuple (the README's
    pattern of adding a metric) trained an epoch, then stopped on "'tuple' object has no
    attribute 'dtype'" (a probe's). The base class's says what it takes and how to call it.
    (Not at the first step: a model may return a tuple in training only, an auxiliary head's,
    which such a val_sums takes in eval mode.)"""
    from trainer.config import ContractError

    with pytest.raises(ContractError, match=r"AddsToTheBase: Loss.val_sums \(the base class's\) "
                       r"takes the model's output as one tensor, and got a tuple"):  # fmt: skip
        train(tmp_path, "~model", f"+model._target_={__name__}.TupleNet", "~loss",
              f"+loss._target_={__name__}.AddsToTheBase", "data.batch_size=16",
              "data.train_subset=64", "trainer.max_epochs=2", "instrument=none")  # fmt: skip


class NoInitLoss(Loss):
    """A loss with no constructor of its own (no keys)."""

    def forward(self, output, target):
        return F.cross_entropy(output, target, reduction="none")


def test_a_loss_without_init_swapped_into_the_preset_names_the_key(tmp_path) -> None:
    """README: a key a swapped-in _target_ refuses is named (``loss.label_smoothing: ... takes
    no 'label_smoothing'``). A class without __init__ raises ``NoInitLoss() takes no
    arguments``, which trainer/components.py:250's pattern does not match: Hydra's
    ``Error in call to target`` naming no key."""
    with pytest.raises(ConfigError, match=r"loss\.label_smoothing"):
        train(tmp_path, f"loss._target_={__name__}.NoInitLoss", *TINY)


class NoSuperData(DataModule):
    """Forgets super().__init__(**common)."""

    def __init__(self, **common) -> None:
        self.common = common

    def load(self):
        return DigitsData(batch_size=16).load()


def test_a_data_module_not_calling_super_init_is_named(tmp_path) -> None:
    """AttributeError: 'NoSuperData' object has no attribute 'train_subset' (a probe's),
    naming neither what is missing nor the fix."""
    from trainer.config import ContractError

    said = r"NoSuperData has no batch_size, eval_batch_size, .*super\(\).__init__\(\*\*common\)"
    with pytest.raises(ContractError, match=said):
        train(tmp_path, "~data", f"+data._target_={__name__}.NoSuperData", "+data.batch_size=16",
              *TINY[1:])  # fmt: skip


class NoClassesDigits(DigitsData):
    """Digits with no num_classes: out_dim is the size of one target, 1."""

    def __init__(self, **digits) -> None:
        super().__init__(**digits)

    @property
    def num_classes(self):
        return None

    @num_classes.setter
    def num_classes(self, value) -> None:
        pass


def test_a_loss_of_ones_own_failing_on_a_dict_output_names_its_entries_and_num_classes(
    tmp_path,
) -> None:
    """trainer/loop.py:1364: 'the loss (AuxLoss) failed on the first batch: outputs dict of
    shape (), targets torch.int64 of shape (16,) ... torch: Target 2 is out of bounds' (a
    dict has no shape; its entries' (16, 1) are what is wrong, and the fix, num_classes, which
    the built-in cross_entropy's refusal names, is not said)."""
    from trainer.config import ContractError

    with pytest.raises(ContractError) as caught:
        train(
            tmp_path,
            "~data",
            f"+data._target_={__name__}.NoClassesDigits",
            "~model",
            f"+model._target_={__name__}.DictNet",
            "~loss",
            f"+loss._target_={__name__}.AuxLoss",
            "+data.batch_size=16",
            *TINY[1:],
        )
    text = str(caught.value)
    assert "outputs a dict of {'logits': torch.float32 of shape (16, 1), 'aux': " in text, text
    assert "set num_classes (or out_dim) in the data module" in text, text


# --- review 411: the weighting's _detached and DataModule.setup's super().__init__ check ---

import collections  # noqa: E402
import dataclasses  # noqa: E402

from trainer.weighting import _detached  # noqa: E402

NamedOut = collections.namedtuple("NamedOut", "logits aux")


class ModelOutputLike(collections.OrderedDict):
    """transformers' ModelOutput: a dict subclass read by attribute too."""

    @property
    def logits(self):
        return self["logits"]


def test_a_weightings_detached_output_keeps_a_namedtuple_and_a_dict_subclass() -> None:
    """A model returning a namedtuple (torchvision's GoogLeNet/Inception outputs) reached
    ``type(output)(generator)``: "NamedOut.__new__() missing 1 required positional argument"
    at the first step under any weighting but uniform; a dict subclass (transformers'
    ModelOutput) came back a plain dict, without its attributes."""
    a = torch.randn(2, 3, requires_grad=True)
    out = _detached(NamedOut(a, a * 2))
    assert type(out) is NamedOut and not out.logits.requires_grad
    mo = _detached(ModelOutputLike(logits=a))
    assert type(mo) is ModelOutputLike and not mo.logits.requires_grad


@dataclasses.dataclass
class DataclassData(DataModule):
    """A data module as a dataclass, its loader keys fields of its own (no super().__init__,
    every attribute DataModule.__init__ sets, set): it set up before 38171bf."""

    n: int = 32
    batch_size: int = 8
    eval_batch_size: int = 8
    loader: str = "auto"
    memory_limit_mb: int = 4096
    num_workers: int = 0
    pin_memory: bool = False
    drop_last: bool = False
    train_subset: int = 0
    num_classes = 2

    def load(self):
        g = torch.Generator().manual_seed(0)
        x, y = torch.randn(self.n, 3, generator=g), torch.randint(0, 2, (self.n,), generator=g)
        return TensorSplit(x, y), TensorSplit(x[:8], y[:8])


def test_a_dataclass_data_module_with_every_loader_key_sets_up() -> None:
    """setup refuses on a marker (_common_set) rather than on what it needs: a data module
    whose __init__ sets every loader key itself (a dataclass) is refused as not calling
    super().__init__(**common), though nothing is missing."""
    data = DataclassData()
    data.setup(torch.device("cpu"), 0)
    assert data.train_loader.num_samples == 32


def lbfgs_factory(params, lr: float = 1.0) -> torch.optim.Optimizer:
    """A parameter-group factory (README's way to give groups) returning LBFGS."""
    return torch.optim.LBFGS(list(params), lr=lr)


def test_a_factory_returning_a_closure_optimizer_is_refused_before_training(tmp_path) -> None:
    """README: optimizers whose step needs a closure (LBFGS) are refused before training. A
    class was; a factory's optimizer was not inspected, and the run failed in its first
    ``optimizer.step()`` with torch's TypeError (a probe's)."""
    with pytest.raises(ConfigError, match=r"LBFGS.step\(\) needs a closure"):
        train(tmp_path, "~optimizer", f"+optimizer._target_={__name__}.lbfgs_factory",
              "+optimizer._partial_=true", "+optimizer.lr=1.0", "trainer.max_steps=2")  # fmt: skip


class Bag(nn.Module):
    """A model of token ids (an embedding bag) given float features."""

    def __init__(self, in_shape, out_dim) -> None:
        super().__init__()
        self.emb = nn.Embedding(256, out_dim)

    def forward(self, x):
        return self.emb(x.flatten(1)).mean(1)


def test_float_inputs_to_an_embedding_are_named_at_the_first_step(tmp_path) -> None:
    """torch's words for float indices ("Expected tensor for argument #1 'indices' to have one
    of the following scalar types: Long, Int; but got torch.FloatTensor") say "scalar type",
    not "dtype": named as the data's dtype too (a mutation test's)."""
    with pytest.raises(TypeError, match=r"first forward failed on the data's inputs "
                       r"\(torch.float32; the model's parameters: torch.float32\).*torch: "
                       r"Expected tensor for argument #1 'indices'"):  # fmt: skip
        train(tmp_path, "data=synthetic", "data.shape=[8]", "data.num_classes=3", "~model",
              f"+model._target_={__name__}.Bag", *TINY)  # fmt: skip
