"""Evaluate a checkpoint: ``python evaluate.py ckpt=outputs/<run>/checkpoints/best.pt``."""

import hydra
from omegaconf import DictConfig

from cnn_bench import cli


@hydra.main(version_base="1.3", config_path="conf", config_name="evaluate")
@cli.user_errors(sweep_jobs=False)
def main(cfg: DictConfig) -> None:
    from cnn_bench.evaluate import run  # here: a mistake on the command line is told before torch loads

    run(cfg)


if __name__ == "__main__":
    cli.launch(main, "evaluate")
