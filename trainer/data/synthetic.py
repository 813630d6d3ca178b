"""A generated, learnable classification task of any size and input shape.

Each class c has a mean m_c ~ N(0, I) of the input's shape; a sample of class c is
``m_c + noise * N(0, I)``. With ``noise`` around 1 and more than a few dozen input dimensions the
classes are nearly separable by a linear model, so any model here should learn it; larger
``noise`` makes it harder. Generated on the CPU from its own seed, then held as tensors.
"""

from __future__ import annotations

import torch

from trainer.data.base import DataModule, TensorSplit


class SyntheticData(DataModule):
    def __init__(
        self,
        num_train: int = 8192,
        num_val: int = 2048,
        num_classes: int = 10,
        shape: list[int] | tuple[int, ...] = (64,),
        noise: float = 1.0,
        seed: int = 0,
        **common,
    ):
        super().__init__(**common)
        self.num_train, self.num_val = num_train, num_val
        self.num_classes = num_classes
        self.input_shape = tuple(int(s) for s in shape)
        self.noise = noise
        self.seed = seed

    def load(self) -> tuple[TensorSplit, TensorSplit]:
        g = torch.Generator().manual_seed(self.seed)
        k, shape = self.num_classes, self.input_shape
        assert k is not None and shape is not None  # (set in __init__)
        means = torch.randn(k, *shape, generator=g)

        def sample(n: int) -> TensorSplit:
            y = torch.randint(k, (n,), generator=g)
            x = means[y] + self.noise * torch.randn(n, *shape, generator=g)
            return TensorSplit(x, y)

        return sample(self.num_train), sample(self.num_val)
