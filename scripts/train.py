"""Train a model: ``python scripts/train.py [group=choice] [key=value] ...`` (see README).

A thin ``@hydra.main`` over :func:`trainer.run`; returns val/acc for sweepers that optimize it.
"""

import hydra
from omegaconf import DictConfig

import trainer  # also registers the config schemas in Hydra's ConfigStore


@hydra.main(version_base="1.3", config_path="../configs", config_name="train")
def main(cfg: DictConfig) -> float:
    return trainer.run(cfg)["val/acc"]


if __name__ == "__main__":
    main()
