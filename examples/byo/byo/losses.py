import torch.nn.functional as F
from torch import Tensor

from trainer.losses import Loss


class Huber(Loss):
    """Per-sample Huber loss; task "regression", so validation also reports val/mse."""

    task = "regression"

    def __init__(self, delta: float = 1.0):
        self.delta = delta

    def forward(self, output: Tensor, target: Tensor) -> Tensor:  # -> (B,)
        # one output per target element, compared sample by sample: a (B, 1) output against
        # (B,) targets is the usual case, and F.huber_loss would broadcast it to (B, B)
        b = target.shape[0]
        if output.shape[0] != b or output.numel() != target.numel():
            raise ValueError(
                f"Huber: the model's output of shape {tuple(output.shape)} does not match the "
                f"targets of shape {tuple(target.shape)} (one output per target element)"
            )
        out, tgt = output.reshape(b, -1), target.reshape(b, -1).to(output.dtype)
        return F.huber_loss(out, tgt, reduction="none", delta=self.delta).mean(1)
