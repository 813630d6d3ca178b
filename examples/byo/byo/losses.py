import torch.nn.functional as F
from torch import Tensor

from trainer.losses import Loss


class Huber(Loss):
    """Per-sample Huber loss; task "regression", so validation also reports val/mse."""

    task = "regression"

    def __init__(self, delta: float = 1.0):
        self.delta = delta

    def forward(self, output: Tensor, target: Tensor) -> Tensor:  # -> (B,)
        return F.huber_loss(output, target, reduction="none", delta=self.delta).flatten(1).mean(1)
