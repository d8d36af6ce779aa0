"""What the sweep and launcher tests share: ``train.py``'s task function, a fast sweep base and
Hydra's own multirun path run in this process.

Module-level imports stay light (no torch): the launcher's worker processes import the test
modules to find their task functions.
"""

from __future__ import annotations

from pathlib import Path

from hydra import initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from cnn_bench import cli
from cnn_bench.config import CONF_DIR


@cli.user_errors
def train_task(cfg):
    """What ``train.py`` runs, reachable by name from this module."""
    from cnn_bench import train as train_mod

    return train_mod.run(cfg).get("best_val_acc")


def sweep_overrides(root: Path, *extra: str) -> list[str]:
    """A fast sweep base: speednet_s at 16 px on the tiny folder, 1 epoch of 2 batches, CPU."""
    return ["model=speednet_s", "dataset=imagefolder", f"dataset.root={root}",
            "trainer.batch_size=16", "trainer.epochs=1", "trainer.limit_train_batches=2",
            "trainer.device=cpu", "trainer.progress=false", *extra]


def named(overrides: list[str]) -> list[str]:
    """The overrides ``train.py -m`` hands to Hydra: jobs named by their swept keys only."""
    return cli.name_jobs_by_swept_keys(["-m", *overrides], "config")[1:]


def multirun(sweep_dir: Path, overrides: list[str], task=train_task) -> None:
    """``python train.py -m <overrides>`` in this process, through Hydra's own multirun path."""
    overrides = named(overrides)
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3", job_name="train"):
            GlobalHydra.instance().hydra.multirun(
                config_name="config", task_function=task,
                overrides=[*overrides, f"hydra.sweep.dir={sweep_dir}", "hydra.mode=MULTIRUN"])
    finally:
        GlobalHydra.instance().clear()


def job_dirs(sweep_dir: Path) -> list[Path]:
    return sorted(p for p in sweep_dir.iterdir() if p.is_dir() and p.name != "tb")
