import math

import torch

from trainer.data.base import DataModule, TensorSplit


class NoisySine(DataModule):
    """y = sin(x) + noise, x uniform in [-pi, pi]: a regression task generated from its own seed."""

    def __init__(self, n: int = 512, noise: float = 0.1, seed: int = 0, **common):
        super().__init__(**common)  # batch_size, loader, ... : the keys every data set has
        self.n, self.noise, self.seed = n, noise, seed

    def load(self) -> tuple[TensorSplit, TensorSplit]:
        g = torch.Generator().manual_seed(self.seed)
        x = (torch.rand(self.n, 1, generator=g) * 2 - 1) * math.pi  # (N, 1)
        y = torch.sin(x) + self.noise * torch.randn(self.n, 1, generator=g)  # (N, 1) float
        cut = self.n * 4 // 5
        return TensorSplit(x[:cut], y[:cut]), TensorSplit(x[cut:], y[cut:])
