"""Shared fixtures: compose the real config tree with Hydra's compose API, shrunk for speed."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

import trainer  # noqa: F401  (registers the config schemas)

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"

# CPU, no bar: what every test run starts from
BASE = ["trainer.device=cpu", "logging.progress=false"]


def make_cfg(*overrides: str) -> DictConfig:
    """The composed run config, as ``scripts/train.py`` would see it with these overrides."""
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose("train", overrides=[*BASE, *overrides])


@pytest.fixture(autouse=True)
def _few_threads():
    # 2-core CI: keep torch from oversubscribing when pytest runs subprocesses too
    threads = torch.get_num_threads()
    torch.set_num_threads(min(threads, 2))
    yield
    torch.set_num_threads(threads)


requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def train(run_dir: Path, *overrides: str, callbacks=()) -> dict:
    """Run the trainer in-process into ``run_dir`` and return its final metrics."""
    from trainer.run import run

    return run(make_cfg(*overrides), run_dir=run_dir, callbacks=callbacks)


def final_params(run_dir: Path) -> dict[str, torch.Tensor]:
    from trainer.checkpoint import load_checkpoint

    return load_checkpoint(run_dir / "checkpoints" / "last.pt")["model"]


def read_scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar in the run's event files, read back with tensorboard's own reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
