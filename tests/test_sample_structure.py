"""The "bring your own" data contract (a probe's findings, 2026-12-07): a Dataset's samples
of unusual structure must either train exactly as the plain tensors would, or be refused
before training with an error naming the data and the cause (README, "Bring your own"; a
dict or a tuple of tensors as the *input* is refused so, tests/test_byo_refusals.py)."""

from __future__ import annotations

import re

import pytest
import torch
from conftest import train

from trainer.config import ContractError
from trainer.data.base import TensorSplit
from trainer.data.digits import DigitsData

TINY = ["loss=mse", "data.batch_size=8", "trainer.max_steps=2", "logging.every_n_steps=1",
        "instrument=none"]  # fmt: skip


class Samples(torch.utils.data.Dataset):
    """16 regression samples, input (4,), target (3,), returned in the form ``kind`` names."""

    def __init__(self, kind: str) -> None:
        g = torch.Generator().manual_seed(0)
        self.kind = kind
        self.x, self.y = torch.randn(16, 4, generator=g), torch.randn(16, 3, generator=g)

    def __len__(self) -> int:
        return 16

    def __getitem__(self, i: int):
        x, y = self.x[i], self.y[i]
        return {
            "plain": lambda: (x, y),
            "dict_target": lambda: (x, {"y": y}),
            "tuple_target": lambda: (x, (y, y[:1])),
            "none_target": lambda: (x, None),
            "list_of_0d_target": lambda: (x, [y[0], y[1], y[2]]),
            "list_of_0d_input": lambda: ([x[0], x[1], x[2], x[3]], y),
        }[self.kind]()


class SamplesData(DigitsData):
    """The digits config's keys accepted (unused); both splits of the form ``kind``."""

    kind = "plain"
    val_plain = False  # the validation split a TensorSplit (the training split's check alone)

    def load(self):
        self.input_shape, self.num_classes = None, None
        val = Samples("plain") if self.val_plain else Samples(self.kind)
        if self.val_plain:
            val = TensorSplit(val.x, val.y)
        return Samples(self.kind), val


def _data(kind: str, val_plain: bool = False) -> str:
    name = f"{kind.title().replace('_', '')}{'ValPlain' if val_plain else ''}"
    globals()[name] = type(name, (SamplesData,), {"kind": kind, "val_plain": val_plain})
    return f"data._target_={__name__}.{name}"


@pytest.mark.parametrize(
    ("kind", "val_plain"),
    [("dict_target", False), ("tuple_target", False), ("none_target", False),
     ("tuple_target", True)],
)  # fmt: skip
def test_a_target_that_is_no_tensor_is_refused_naming_the_data_and_the_target(
    tmp_path, kind, val_plain
) -> None:
    """A sample's target given as a dict, a tuple of tensors or None failed in
    DataModule.setup with torch's bare "Could not infer dtype of dict" / "only one element
    tensors can be converted to Python scalars" / "Could not infer dtype of NoneType"
    (trainer/data/base.py, ``torch.as_tensor(yv)`` and ``torch.as_tensor(y0)``), naming neither
    the Dataset, the split nor that the target is at fault; the same structure as an input is
    refused naming them (``_first_sample``)."""
    got = {"dict_target": "a dict, which torch.as_tensor refuses (Could not infer dtype of dict)",
           "none_target": "a NoneType, which torch.as_tensor refuses (Could not infer dtype of "
                          "NoneType)",
           "tuple_target": "a tuple, which torch.as_tensor refuses (only one element tensors "
                           "can be converted to Python scalars)",
           }[kind]  # fmt: skip
    with pytest.raises(ContractError, match=r"^data: a sample's target must be one tensor \(or "
                       r"array, number, or nested lists of numbers\); Samples\[0\]'s is "
                       + re.escape(got)):  # fmt: skip
        train(tmp_path, _data(kind, val_plain), *TINY)


@pytest.mark.parametrize("kind", ["list_of_0d_target", "list_of_0d_input"])
def test_a_list_of_one_element_tensors_is_refused_before_training(tmp_path, kind) -> None:
    """A sample's input or target given as a list of 0-d tensors passes every check before
    training (``torch.as_tensor`` makes the first sample a tensor of the right shape), but the
    batches keep it a list (``_numbers`` converts only lists without a tensor in them), collated
    into a list of (B,) tensors: the first step failed with ``AttributeError: 'list' object has
    no attribute 'to'`` in DeviceLoader.__iter__, naming neither the data nor the sample, after
    the run had started. Either it is the tensor it stands for (a list of numbers is made one,
    README), training bit for bit as the plain samples, or it is refused naming the data."""
    what, n = ("target", 3) if kind.endswith("target") else ("input", 4)
    with pytest.raises(ContractError, match=rf"^data: a sample's {what} must be one tensor .*; "
                       rf"Samples\[0\]'s is a list of {n} holding Tensor, which the batches would "
                       r"keep as it is \(the default collate makes it a list of batched "
                       r"tensors\): make it one tensor in __getitem__ \(torch.stack\), or give "
                       r"Samples a collate of its own$"):  # fmt: skip
        train(tmp_path / kind, _data(kind), *TINY)
    assert not (tmp_path / kind / "checkpoints").exists()  # (refused before training)
    train(tmp_path / "plain", _data("plain"), *TINY)  # (the plain samples train)
    assert (tmp_path / "plain" / "checkpoints" / "last.pt").exists()
