"""Data sets (digits, torchvision sets, synthetic) and the in-memory / DataLoader paths."""

from trainer.data.base import (
    Batch,
    DataModule,
    DeviceLoader,
    InMemoryLoader,
    TensorSplit,
    epoch_order,
)

__all__ = ["Batch", "DataModule", "DeviceLoader", "InMemoryLoader", "TensorSplit", "epoch_order"]
