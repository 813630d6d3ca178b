"""A measurement's extra forward leaves every random state of the run as it found it."""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator

import numpy as np
import torch


@contextlib.contextmanager
def forked_rng(device: torch.device) -> Iterator[None]:
    """Run the body on copies of the random states a checkpoint keeps (trainer/checkpoint.py):
    torch's on the CPU and on ``device`` (``torch.random.fork_rng``), Python's ``random`` and
    NumPy's global generator. A model that draws from any of them in its forward (dropout,
    a LayerDrop by ``random.random()``) draws the same numbers in the run's next step as if the
    body had never run."""
    python, numpy = random.getstate(), np.random.get_state()
    accel = device.type != "cpu"
    try:
        with torch.random.fork_rng(
            devices=[device.index or 0] if accel else [],
            device_type=device.type if accel else "cuda",
        ):
            yield
    finally:
        random.setstate(python)
        np.random.set_state(numpy)
