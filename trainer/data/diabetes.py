"""scikit-learn's bundled diabetes data: a regression task, read straight from its package files.

442 patients, 10 baseline variables (age, sex, BMI, blood pressure, six blood serum
measurements) and a quantitative measure of disease progression one year later
(``sklearn/datasets/data/diabetes_data_raw.csv.gz`` and ``diabetes_target.csv.gz``; Efron et
al., 2004, "Least Angle Regression"). No network, no scikit-learn import.

Features and target are standardized with the training split's mean and standard deviation, so
``val/mse`` is in units of the target's variance: predicting the training mean scores about 1,
and a linear model about 0.5 (R² ≈ 0.5).
"""

from __future__ import annotations

import gzip

import numpy as np
import torch

from trainer.data.base import DataModule, TensorSplit
from trainer.data.digits import sklearn_data_file


def load_diabetes_arrays() -> tuple[np.ndarray, np.ndarray]:
    """Features (442, 10) and target (442,), raw, float32."""
    with gzip.open(sklearn_data_file("diabetes_data_raw.csv.gz", "diabetes"), "rt") as f:
        x = np.loadtxt(f, dtype=np.float32)
    with gzip.open(sklearn_data_file("diabetes_target.csv.gz", "diabetes"), "rt") as f:
        y = np.loadtxt(f, dtype=np.float32)
    return x, y


class DiabetesData(DataModule):
    """Standardized features (10,) -> standardized target (1,); a fixed random split."""

    def __init__(self, val_fraction: float = 0.2, split_seed: int = 0, **common):
        super().__init__(**common)
        self.val_fraction = val_fraction
        self.split_seed = split_seed
        self.input_shape = (10,)
        self.out_dim = 1
        #: the training target's mean and standard deviation (raw units), to undo the scaling
        self.target_mean = self.target_std = 0.0

    def load(self) -> tuple[TensorSplit, TensorSplit]:
        features, target = load_diabetes_arrays()
        x, y = torch.from_numpy(features), torch.from_numpy(target)[:, None]  # (N, 10), (N, 1)
        order = torch.randperm(len(y), generator=torch.Generator().manual_seed(self.split_seed))
        n_val = round(self.val_fraction * len(y))
        val, train = order[:n_val], order[n_val:]
        x_mean, x_std = x[train].mean(0), x[train].std(0)
        y_mean, y_std = y[train].mean(0), y[train].std(0)
        self.target_mean, self.target_std = float(y_mean), float(y_std)
        x, y = (x - x_mean) / x_std, (y - y_mean) / y_std
        return TensorSplit(x[train], y[train]), TensorSplit(x[val], y[val])
