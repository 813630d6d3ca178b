from torch import Tensor, nn


class SineNet(nn.Module):
    """A small MLP. ``in_shape`` and ``out_dim`` come from the data because it asks for them."""

    def __init__(self, in_shape: list[int], out_dim: int, width: int = 32):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(in_shape[0], width), nn.Tanh(), nn.Linear(width, out_dim)
        )

    def forward(self, x: Tensor) -> Tensor:  # (B, 1) -> (B, out_dim)
        return self.net(x)
