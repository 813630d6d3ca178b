"""A Hydra-configured PyTorch trainer with control over backward and truthful gradient
instrumentation. Entry point: ``trainer.run(cfg, run_dir)`` (``from trainer import run``;
``scripts/train.py`` wraps it). The name ``trainer.run`` is that function, not its module:
the module's other names are reached with ``from trainer.run import build_trainer``."""

from trainer.config import register_configs

register_configs()  # the config schemas must be in Hydra's ConfigStore before composing

from trainer.run import run  # noqa: E402

__all__ = ["run"]
