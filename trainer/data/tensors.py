"""Your own tensors from a file: ``data=tensors data.path=my.pt`` (or ``.npz``).

The file holds ``x`` (N, ...) and ``y`` (N, ...), and optionally ``x_val`` and ``y_val``; without
them a fixed random ``val_fraction`` of the samples validates. A ``.pt`` file is a dict of
tensors, loaded with ``torch.load(weights_only=True)`` (no pickled code runs); an ``.npz`` file
is NumPy's, loaded with ``allow_pickle=False``.

What the targets are decides what the data provides: int64 labels of shape (N,) are classes
(``num_classes`` = max + 1, unless given), anything else is a regression target (float) whose
elements per sample give ``out_dim``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from trainer.data.base import DataModule, TensorSplit

KEYS = ("x", "y", "x_val", "y_val")


class TensorFileError(ValueError):
    """A tensors file that cannot be used; the message names the file and the cause."""


class TensorsData(DataModule):
    def __init__(
        self,
        path: str,
        val_fraction: float = 0.2,
        split_seed: int = 0,
        num_classes: int | None = None,
        **common,
    ):
        super().__init__(**common)
        self.path = Path(path)
        self.val_fraction = val_fraction
        self.split_seed = split_seed
        self.num_classes = num_classes

    def read(self) -> dict[str, Tensor]:
        path = self.path
        if not path.is_file():
            raise TensorFileError(f"data.path: {path} does not exist")
        suffix = path.suffix.lower()
        try:
            if suffix == ".pt":
                raw = torch.load(path, map_location="cpu", weights_only=True)
            elif suffix == ".npz":
                import numpy as np

                with np.load(path, allow_pickle=False) as f:
                    raw = {k: torch.from_numpy(f[k]) for k in f.files}
            else:
                raise TensorFileError(
                    f"data.path: {path} has suffix {suffix!r}; expected .pt or .npz"
                )
        except TensorFileError:
            raise
        except Exception as e:
            raise TensorFileError(f"data.path: could not read {path}: {e}") from e
        if not isinstance(raw, dict) or not {"x", "y"} <= raw.keys():
            got = sorted(raw) if isinstance(raw, dict) else type(raw).__name__
            raise TensorFileError(
                f"data.path: {path} must hold a dict with tensors 'x' and 'y' (optionally "
                f"'x_val', 'y_val'); got {got}"
            )
        unknown = sorted(set(raw) - set(KEYS))
        if unknown:
            raise TensorFileError(
                f"data.path: {path} holds unknown keys {unknown}; expected {KEYS}"
            )
        if ("x_val" in raw) != ("y_val" in raw):
            raise TensorFileError(f"data.path: {path} holds only one of 'x_val' and 'y_val'")
        for k, v in raw.items():
            if not isinstance(v, Tensor):
                raise TensorFileError(
                    f"data.path: {path}: {k!r} is a {type(v).__name__}, not a tensor"
                )
        for xk, yk in (("x", "y"), ("x_val", "y_val")):
            if xk in raw and raw[xk].shape[0] != raw[yk].shape[0]:
                raise TensorFileError(
                    f"data.path: {path}: {xk!r} has {raw[xk].shape[0]} samples but {yk!r} "
                    f"{raw[yk].shape[0]}"
                )
        return raw

    def load(self) -> tuple[TensorSplit, TensorSplit]:
        raw = self.read()
        x, y = raw["x"], raw["y"]
        if x.ndim < 2:  # (one feature per sample as a vector: the model saw no feature axis)
            raise TensorFileError(
                f"data.path: {self.path}: 'x' has shape {tuple(x.shape)}; samples need a "
                "feature axis, (N, features...): save x.reshape(-1, 1) for one feature"
            )
        if "x_val" in raw and raw["x_val"].shape[1:] != x.shape[1:]:  # (found by the first
            raise TensorFileError(  # validation, after an epoch's training)
                f"data.path: {self.path}: 'x_val' samples have shape "
                f"{tuple(raw['x_val'].shape[1:])}, 'x' samples {tuple(x.shape[1:])}"
            )
        if "x_val" in raw:
            train, val = TensorSplit(x, y), TensorSplit(raw["x_val"], raw["y_val"])
        else:
            g = torch.Generator().manual_seed(self.split_seed)
            order = torch.randperm(len(y), generator=g)
            n_val = round(self.val_fraction * len(y))
            if not 0 < n_val < len(y):
                raise TensorFileError(
                    f"data.val_fraction: {self.val_fraction} of {len(y)} samples leaves an empty "
                    "split; give more samples or x_val/y_val"
                )
            train = TensorSplit(x[order[n_val:]], y[order[n_val:]])
            val = TensorSplit(x[order[:n_val]], y[order[:n_val]])
        labels = not y.is_floating_point() and not y.is_complex() and y.ndim == 1
        every = torch.cat([train.y, val.y]) if labels else None
        # (an empty split is refused by name before training: trainer.run)
        if every is not None and every.numel() and self.num_classes is None:
            self.num_classes = int(every.max()) + 1
        if every is not None and every.numel() and int(every.min()) < 0:
            raise TensorFileError(f"data.path: {self.path}: class labels must be >= 0")
        return train, val
