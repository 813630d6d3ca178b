"""Weighting strategies for ``loss.mode=vector``: per-sample losses -> detached weights.

A strategy maps ``(losses, logits, targets, indices)`` of one batch to raw weights r of shape
(B,), which ``normalize`` then turns into the gradient weights w:

* ``mean``: w_i = r_i / sum_j r_j (the weights sum to 1 over the batch; uniform gives 1/B,
  the same gradients as ``loss.mode=scalar``);
* ``none``: w_i = r_i (uniform gives 1: the gradient of the summed loss).

The weights never carry autograd history.
"""

from __future__ import annotations

import abc

import torch
from torch import Tensor


class Weighting(abc.ABC):
    """Base class: subclasses implement :meth:`raw`; :meth:`__call__` normalizes and detaches."""

    def __init__(self, normalize: str = "mean"):
        if normalize not in ("mean", "none"):
            raise ValueError(f"weighting.normalize: got {normalize!r}, expected mean or none")
        self.normalize = normalize

    @abc.abstractmethod
    def raw(self, losses: Tensor, logits: Tensor, targets: Tensor, indices: Tensor) -> Tensor:
        """Raw weights r, shape (B,), same dtype and device as ``losses``."""

    @torch.no_grad()
    def __call__(self, losses: Tensor, logits: Tensor, targets: Tensor, indices: Tensor) -> Tensor:
        r = self.raw(losses.detach(), logits.detach(), targets, indices)
        if self.normalize == "mean":
            r = r / r.sum()
        return r


class UniformWeighting(Weighting):
    """r_i = 1 for every sample."""

    def raw(self, losses: Tensor, logits: Tensor, targets: Tensor, indices: Tensor) -> Tensor:
        return torch.ones_like(losses)

    def __call__(self, losses: Tensor, logits: Tensor, targets: Tensor, indices: Tensor) -> Tensor:
        # one fill instead of ones / ones.sum(): the same values (1/B is exact either way)
        value = 1.0 / losses.numel() if self.normalize == "mean" else 1.0
        return torch.full_like(losses, value, requires_grad=False)
