"""Sequence models written as a researcher writes them (packed RNNs, attention
with a key padding mask, tied embeddings, per-token losses over variable-length data): their
targets as a Dataset's ``targets`` list gives them."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from trainer.data.base import DataModule
from trainer.losses import TokenCrossEntropy

PAD = -100


class OneTokenSequences(torch.utils.data.Dataset):
    """Token sequences whose every sample happens to hold one token (a tagger's one-word
    sentences), each target a (1,) tensor as the sample's own, padded by a collate of the
    Dataset's own (as README "Bring your own", variable-length samples, asks)."""

    def __init__(self, n: int) -> None:
        g = torch.Generator().manual_seed(0)
        self.seqs = [(torch.randint(5, (1,), generator=g), torch.randint(5, (1,), generator=g))
                     for _ in range(n)]  # fmt: skip
        self.targets = [y for _, y in self.seqs]  # one (1,) tensor per sample

    def __len__(self) -> int:
        return len(self.seqs)

    def __getitem__(self, i):
        return self.seqs[i]

    def collate(self, samples):
        t = max(len(x) for x, _ in samples)
        x = torch.zeros(len(samples), t, dtype=torch.long)
        y = torch.full((len(samples), t), PAD, dtype=torch.long)
        for i, (xi, yi) in enumerate(samples):
            x[i, : len(xi)], y[i, : len(yi)] = xi, yi
        return x, y


class OneTokenData(DataModule):
    out_dim = 5
    vocab_size = 5

    def load(self):
        return OneTokenSequences(6), OneTokenSequences(2)


def test_per_sample_targets_of_one_token_keep_their_token_dimension() -> None:
    """A Dataset's ``targets`` of one (1,) tensor per sample are (N, 1) token targets, as
    targets of one (T,) tensor per sample are (N, T) for any T > 1. ``torch.as_tensor`` of a
    list of one-element tensors makes them scalars, (N,): the run is refused with
    "loss=token_cross_entropy needs int64 token targets of shape (N, T); the data's targets
    are torch.int64 of shape (6,)", blaming the data for the shape the trainer made."""
    data = OneTokenData(batch_size=3, num_workers=0)
    data.setup(torch.device("cpu"), 0)
    rows = data.train_targets if data.train_targets is not None else data.train_target_rows
    assert [tuple(r.shape) for r in rows] == [(1,)] * 6
    TokenCrossEntropy().check(data)  # (refused: "... the data's targets are ... of shape (6,)")


class Listed(torch.utils.data.Dataset):
    def __init__(self, targets) -> None:
        self.targets = targets

    def __len__(self) -> int:
        return len(self.targets)


@pytest.mark.parametrize(
    "targets, shape",
    [
        ([torch.tensor(3), torch.tensor(1)], (2,)),  # (class labels, 0-d each)
        ([torch.tensor([3]), torch.tensor([1])], (2, 1)),
        ([np.array([3]), np.array([1])], (2, 1)),
        ([[3], [1]], (2, 1)),
        ([3, 1], (2,)),
        ([torch.tensor([3, 4]), torch.tensor([1, 2])], (2, 2)),
    ],
    ids=["0d_tensors", "1_tensors", "1_arrays", "1_lists", "numbers", "2_tensors"],
)
def test_a_datasets_targets_list_keeps_each_samples_shape(targets, shape) -> None:
    from trainer.data.base import _targets

    assert tuple(_targets(Listed(targets), "training").shape) == shape


def test_a_datasets_list_of_ints_and_floats_is_one_float_tensor() -> None:
    """Regression targets as Python numbers, some written as ints (0, 1): one float tensor,
    as torch.as_tensor makes them (a mutation test's: row by row, the int rows and the float
    rows were refused as "per-sample targets of different kinds")."""
    from trainer.data.base import _targets

    targets = _targets(Listed([0, 0.5, 1]), "training")
    assert torch.equal(targets, torch.tensor([0.0, 0.5, 1.0]))


class ListedWithCollate(Listed):
    def collate(self, samples):  # (of its own: it pads variable-length samples; a batch of
        # these lists is not taken here, only that the Dataset has a collate)
        return torch.utils.data.default_collate(samples)


def test_a_datasets_ragged_lists_of_numbers_are_one_tensor_per_sample() -> None:
    """Variable-length targets as lists of numbers (torch.as_tensor refuses them whole, with a
    ValueError): one tensor per sample, for the Dataset's own collate (a mutation test's:
    that ValueError escaped, "expected sequence of length 2 at dim 1 (got 1)")."""
    from trainer.data.base import _targets

    rows = _targets(ListedWithCollate([[1, 2], [3]]), "training")
    assert isinstance(rows, list) and [r.tolist() for r in rows] == [[1, 2], [3]]
