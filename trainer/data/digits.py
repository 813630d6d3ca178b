"""scikit-learn's bundled 8x8 handwritten digits, read straight from the package's data file.

The file ships inside scikit-learn (``sklearn/datasets/data/digits.csv.gz``: 1,797 rows of 64
pixel values in 0..16 and the label), so no network is needed. It is read without importing
scikit-learn, which would cost about a second of start-up.
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import math
from pathlib import Path

import numpy as np
import torch

from trainer.data.base import DataModule, TensorSplit

NUM_CLASSES = 10
INPUT_SHAPE = (1, 8, 8)


def sklearn_data_file(name: str, data: str = "digits") -> Path:
    """A data file bundled inside the scikit-learn package (``sklearn/datasets/data/<name>``),
    found without importing scikit-learn (about a second of start-up)."""
    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"data={data} reads a file bundled with scikit-learn, which is not installed: "
            "pip install scikit-learn"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data" / name
    if not path.is_file():
        raise FileNotFoundError(f"data={data}: scikit-learn's {name} is missing at {path}")
    return path


def digits_file() -> Path:
    return sklearn_data_file("digits.csv.gz")


@functools.lru_cache(maxsize=1)
def _digits_table(path: Path) -> np.ndarray:
    """The parsed file, read once per process (a run in a sweep reuses it), read-only."""
    with gzip.open(path, "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.float32)
    table.flags.writeable = False
    return table


def load_digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """Pixels (1797, 64) float32 in 0..16 and labels (1797,) int64 (fresh arrays)."""
    table = _digits_table(digits_file())
    return table[:, :-1].copy(), table[:, -1].astype(np.int64)


class DigitsData(DataModule):
    """Digits scaled to [0, 1], shape (1, 8, 8); a fixed random split of ``val_fraction``."""

    def __init__(
        self, val_fraction: float = 0.2, split_seed: int = 0, imbalance_ratio: float = 1.0, **common
    ):
        super().__init__(**common)
        self.val_fraction = val_fraction
        self.split_seed = split_seed
        self.imbalance_ratio = imbalance_ratio
        self.input_shape = INPUT_SHAPE
        self.num_classes = NUM_CLASSES

    def load(self) -> tuple[TensorSplit, TensorSplit]:
        pixels, labels = load_digits_arrays()
        x = torch.from_numpy(pixels).div_(16.0).view(-1, *INPUT_SHAPE)
        y = torch.from_numpy(labels)
        order = torch.randperm(len(y), generator=torch.Generator().manual_seed(self.split_seed))
        n_val = round(self.val_fraction * len(y))
        val, train = order[:n_val], order[n_val:]
        if self.imbalance_ratio > 1:
            train = long_tail(train, y[train], self.imbalance_ratio)
        return TensorSplit(x[train], y[train]), TensorSplit(x[val], y[val])


def long_tail(index: torch.Tensor, labels: torch.Tensor, ratio: float) -> torch.Tensor:
    """Keep the first ``ceil(n_c · ratio^(-c/(K-1)))`` samples of each class c (in ``index``'s
    order, so the choice is fixed by the split's seed), keeping ``index``'s order."""
    keep = torch.zeros(len(index), dtype=torch.bool)
    for c in range(NUM_CLASSES):
        members = (labels == c).nonzero().flatten()
        n = math.ceil(len(members) * ratio ** (-c / (NUM_CLASSES - 1)))
        keep[members[:n]] = True
    return index[keep]
