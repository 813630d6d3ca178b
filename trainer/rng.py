"""A measurement's extra forward leaves every random state of the run as it found it."""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch


def _indexed(device: torch.device) -> torch.device:
    """``cuda`` without an index is the current CUDA device (as torch places tensors), not
    device 0: ``fork_rng`` is given an index, and 0 left the current one's draws undone where
    ``torch.cuda.set_device`` had chosen another (a review's)."""
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


class Fork:
    """The random states at one moment, to ask later whether anything drew since."""

    def __init__(self, device: torch.device) -> None:
        self.device = _indexed(device)
        self.states = self._now()

    def _now(self) -> tuple[Any, ...]:
        accel: tuple[torch.Tensor, ...] = ()
        if self.device.type == "cuda":  # (seed and offset, kept on the host: no sync)
            accel = (torch.cuda.get_rng_state(self.device),)
        return (random.getstate(), np.random.get_state(), torch.get_rng_state(), *accel)

    def drew(self) -> bool:
        """Whether Python's ``random``, NumPy's global generator or torch's (on the CPU, and
        on a CUDA device) drew since this fork began."""
        before, now = self.states, self._now()
        if before[0] != now[0]:
            return True
        (_, key0, pos0, *rest0), (_, key1, pos1, *rest1) = before[1], now[1]
        if pos0 != pos1 or rest0 != rest1 or not np.array_equal(key0, key1):
            return True
        return any(not torch.equal(a, b) for a, b in zip(before[2:], now[2:], strict=True))

    def rewind(self) -> None:
        """Set the random states back to what they were when this fork began."""
        python, numpy, cpu, *accel = self.states
        random.setstate(python)
        np.random.set_state(numpy)
        torch.set_rng_state(cpu)
        if accel:
            torch.cuda.set_rng_state(accel[0], self.device)


@contextlib.contextmanager
def forked_rng(device: torch.device) -> Iterator[Fork]:
    """Run the body on copies of the random states a checkpoint keeps (trainer/checkpoint.py):
    torch's on the CPU and on ``device`` (``torch.random.fork_rng``), Python's ``random`` and
    NumPy's global generator. A model that draws from any of them in its forward (dropout,
    a LayerDrop by ``random.random()``) draws the same numbers in the run's next step as if the
    body had never run. The body gets a :class:`Fork` whose ``drew()`` says whether it drew."""
    fork = Fork(device)
    device, accel = fork.device, device.type != "cpu"
    try:
        with torch.random.fork_rng(  # (torch's states, on any accelerator type)
            devices=[device.index or 0] if accel else [],
            device_type=device.type if accel else "cuda",
        ):
            yield fork
    finally:
        python, numpy = fork.states[:2]
        random.setstate(python)
        np.random.set_state(numpy)
