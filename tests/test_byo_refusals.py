"""Components a researcher brings that do not fit are refused before training, with an error
that names the cause and the fix (a probe's findings: each failed late, or with torch's own
message, or shifted other logged values)."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import read_scalars, train
from torch import nn
from torch.nn import functional as F

from trainer.callbacks import Callback
from trainer.config import ConfigError
from trainer.data.base import TensorSplit
from trainer.data.digits import DigitsData
from trainer.losses import Loss

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
    with pytest.raises(TypeError, match=r"step 1: stage_on_host's function .*<lambda> returned "
                       r"float, not a dict"):  # fmt: skip
        train(tmp_path, *TINY, callbacks=[ReturnsAFloat()])
    assert read_scalars(tmp_path)["u/kept"] == [(1, 1.0)]
