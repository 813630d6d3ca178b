"""Train a model: ``python scripts/train.py [group=choice] [key=value] ...`` (see README).

A thin ``@hydra.main`` over :func:`trainer.run`; returns val/acc for sweepers that optimize it.
In a multirun (``-m``) a failed job returns None and the sweep goes on (:mod:`trainer.sweep`).
"""

import hydra
from omegaconf import DictConfig

import trainer  # noqa: F401  (registers the config schemas in Hydra's ConfigStore)
from trainer.sweep import run_job


@hydra.main(version_base="1.3", config_path="../configs", config_name="train")
def main(cfg: DictConfig) -> float | None:
    return run_job(cfg)


if __name__ == "__main__":
    main()
