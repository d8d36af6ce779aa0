"""Train a CNN: ``python train.py model=resnet18 dataset=cifar10 trainer.epochs=30``."""

import hydra
from omegaconf import DictConfig

from cnn_bench import cli


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
@cli.user_errors
def main(cfg: DictConfig) -> float | None:
    from cnn_bench.train import run  # here: a mistake on the command line is told before torch loads

    return run(cfg).get("best_val_acc")


if __name__ == "__main__":
    cli.launch(main, "config")
