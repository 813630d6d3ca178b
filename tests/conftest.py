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
