"""Shared fixtures: configs composed from the real conf/ tree, tiny generated datasets."""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

ROOT = Path(__file__).resolve().parent.parent
# the figures a sweep report writes (listed here, not read from cnn_bench: a rename must show)
PLOTS = ["acc_vs_flops.png", "acc_vs_params.png", "heatmap_width_resolution.png"]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from cnn_bench.config import CONF_DIR  # noqa: E402
from datagen import make_imagefolder  # noqa: E402


@pytest.fixture
def one_thread():
    """One intra-op thread: tiny models on a busy 2-core machine run faster without a second."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def small_bn_net():
    """A seeded conv -> BN -> linear net: parameters, float buffers and ``num_batches_tracked``
    (for the weight-averaging tests)."""
    import torch
    from torch import nn

    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))


def sgd_steps(model, n: int, lr: float = 0.5):
    """Take ``n`` SGD steps of ``model`` on seeded random batches of 10 px images (3 classes),
    yielding each step's number (0-based) right after its optimizer step."""
    import torch
    from torch import nn

    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    gen = torch.Generator().manual_seed(1)
    model.train()
    for step in range(n):
        x = torch.randn(8, 3, 10, 10, generator=gen)
        y = torch.randint(0, 3, (8,), generator=gen)
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        yield step


def compose_config(overrides: list[str], config_name: str = "config"):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name=config_name, overrides=overrides)


@pytest.fixture(autouse=True)
def _cache_dir(tmp_path_factory, monkeypatch):
    """Decoded-dataset caches go to a per-session temp dir, never to ~/.cache."""
    monkeypatch.setenv("CNN_BENCH_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory) -> Path:
    """3 classes x 24 train / 8 val / 8 test images of 20-28 px, class-coloured so they are learnable."""
    root = tmp_path_factory.mktemp("tiny")
    make_imagefolder(root / "train", per_class=24, seed=0, splits=None)
    make_imagefolder(root / "val", per_class=8, seed=1, splits=None)
    make_imagefolder(root / "test", per_class=8, seed=2, splits=None)
    return root


def tiny_overrides(root: Path, out: Path, *extra: str) -> list[str]:
    """A fast real config: speednet_s at 16 px on the tiny folder, CPU, no progress bars."""
    return [
        "model=speednet_s", "dataset=imagefolder", f"dataset.root={root}",
        "dataset.resolution=16", "trainer.batch_size=16", "trainer.epochs=2",
        "trainer.device=cpu", "trainer.progress=false", "trainer.log_every_n_steps=2",
        f"output_dir={out}", *extra,
    ]


def interrupting(real, on_call: int):
    """``real`` wrapped to raise KeyboardInterrupt at its ``on_call``-th call (a pre-emption)."""
    calls = {"n": 0}

    def wrapper(*a, **k):
        calls["n"] += 1
        if calls["n"] == on_call:
            raise KeyboardInterrupt
        return real(*a, **k)

    return wrapper


def interrupt_after_first_epoch(monkeypatch, start) -> None:
    """Call ``start()`` (a training run) with its second epoch raising KeyboardInterrupt, as a
    pre-emption after epoch 1 would; the trainer is restored afterwards."""
    import cnn_bench.train as train_mod

    real = train_mod.train_one_epoch
    monkeypatch.setattr(train_mod, "train_one_epoch", interrupting(real, 2))
    with pytest.raises(KeyboardInterrupt):
        start()
    monkeypatch.setattr(train_mod, "train_one_epoch", real)


def read_csv(path: Path) -> list[dict]:
    """A CSV file's rows as dicts (the report's ``results.csv``)."""
    with path.open() as f:
        return list(csv.DictReader(f))
