"""A Hydra-configured PyTorch trainer with control over backward and truthful gradient
instrumentation. Entry point: :func:`trainer.run.run` (``scripts/train.py`` wraps it)."""

from trainer.config import register_configs

register_configs()  # the config schemas must be in Hydra's ConfigStore before composing

from trainer.run import run  # noqa: E402

__all__ = ["run"]
