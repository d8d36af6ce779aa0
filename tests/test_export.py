"""The ``cnn_bench.export`` and ``cnn_bench.stats`` CLIs, run as a user would (subprocesses)."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

import cnn_bench.train as train_mod
from cnn_bench.checkpoint import load_checkpoint
from cnn_bench.models import build_model
from conftest import ROOT, compose_config, tiny_overrides
from datagen import direct_stats


def _cli(module: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)


def test_safetensors_export_round_trips(tiny_folder, tmp_path):
    cfg = compose_config(tiny_overrides(tiny_folder, tmp_path, "trainer.epochs=1",
                                        "dataset.mean=null", "dataset.std=null"))
    train_mod.run(cfg)
    ckpt = tmp_path / "checkpoints" / "best.pt"
    out = tmp_path / "exported.safetensors"
    proc = _cli("cnn_bench.export", f"ckpt={ckpt}", "format=safetensors", f"out={out}")
    assert proc.returncode == 0, proc.stderr
    assert out.is_file() and str(out) in proc.stdout
    ck = load_checkpoint(ckpt)
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    assert meta["num_classes"] == "3"
    # what a reader needs to feed the weights: the normalisation they were trained with (here
    # measured: the config says null) and the model as built (stem auto -> cifar at 16 px)
    assert cfg.dataset.mean is None
    assert json.loads(meta["mean"]) == list(ck["mean"]) and json.loads(meta["std"]) == list(ck["std"])
    built = json.loads(meta["model"])
    assert cfg.model.stem == "auto" and built["stem"] == "cifar" and built["name"] == cfg.model.name
    assert built["weights"] is None and built["pretrained"] is False

    trained = build_model(cfg.model, 3, 16)
    trained.load_state_dict(ck["model"])
    fresh = build_model({**dict(cfg.model), "weights": str(out)}, 3, 16)
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x), trained.eval()(x))

    # out=<an existing folder>: the default name inside it (it ended in IsADirectoryError and
    # left <folder>.tmp behind)
    from cnn_bench.export import export

    folder = tmp_path / "exports"
    folder.mkdir()
    for fmt, suffix in (("safetensors", ".safetensors"), ("pt", ".pt")):
        assert export(ckpt, fmt, folder) == folder / f"best_weights{suffix}"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("exports")) == ["exports"]
    assert sorted(p.name for p in folder.iterdir()) == ["best_weights.pt", "best_weights.safetensors"]


def test_stats_cli_matches_a_direct_computation(tiny_folder):
    proc = _cli("cnn_bench.stats", "dataset=imagefolder", f"dataset.root={tiny_folder}",
                "dataset.resolution=16")
    assert proc.returncode == 0, proc.stderr
    printed = {}
    for name in ("mean", "std"):
        m = re.search(rf"^{name}: \[([^\]]+)\]$", proc.stdout, re.MULTILINE)
        assert m, proc.stdout
        printed[name] = [float(v) for v in m.group(1).split(",")]
    mean, std = direct_stats(tiny_folder / "train", 16)
    # 4 printed decimals (the pipeline decodes JPEGs with torchvision, this with PIL).
    assert printed["mean"] == pytest.approx(mean, abs=1e-3)
    assert printed["std"] == pytest.approx(std, abs=1e-3)


def test_streamed_stats_cover_every_train_image(tiny_folder, tmp_path):
    # The streamed pass read the shuffled training loader, which drops the last partial batch
    # (8 of these 72 images at batch 16; up to 511 at the default 512).
    from cnn_bench.stats import dataset_stats

    cfg = compose_config(["dataset=imagefolder", f"dataset.root={tiny_folder}",
                          "dataset.resolution=16", "dataset.in_memory=false",
                          f"dataset.cache_dir={tmp_path}", "dataset.num_workers=0"])
    st = dataset_stats(cfg.dataset, batch_size=16)
    mean, std = direct_stats(tiny_folder / "train", 16)
    assert st["images"] == 72
    assert list(st["mean"]) == pytest.approx(mean, abs=2e-3)
    assert list(st["std"]) == pytest.approx(std, abs=2e-3)


@pytest.mark.parametrize("args, message", [
    (["--resolution", "16"], "'--resolution' is not an override: use KEY=VALUE"),
    (["dataset.resolution=4"], "dataset.resolution must be >= 8"),
])
def test_stats_cli_refuses_what_it_would_ignore(args, message):
    # Arguments without '=' were dropped (stats at 224 px, no word), and values train.py refuses
    # were measured.
    proc = _cli("cnn_bench.stats", *args)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith(f"error: {message}") and "\n" not in proc.stderr.strip()


def test_a_passthrough_export_loads_into_the_librarys_own_model(tiny_folder, tmp_path):
    # The wrapper's "model." prefix made the shared file unloadable by torchvision itself.
    import torchvision
    from safetensors.torch import load_file

    cfg = compose_config(tiny_overrides(tiny_folder, tmp_path, "trainer.epochs=1", "model=torchvision",
                                        "model.name=resnet18"))
    train_mod.run(cfg)
    ckpt = tmp_path / "checkpoints" / "best.pt"
    out = tmp_path / "tv.safetensors"
    assert _cli("cnn_bench.export", f"ckpt={ckpt}", f"out={out}").returncode == 0
    plain = torchvision.models.resnet18(num_classes=3)
    plain.load_state_dict(load_file(str(out)))  # strict
    trained = build_model(cfg.model, 3, 16)
    trained.load_state_dict(load_checkpoint(ckpt)["model"])
    again = build_model({**dict(cfg.model), "weights": str(out)}, 3, 16)
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = trained.eval()(x)
        assert torch.equal(plain.eval()(x), want) and torch.equal(again.eval()(x), want)


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_export_help_prints_the_usage(flag, capsys):
    # --help was "not KEY=VALUE" with exit 2
    from cnn_bench.export import main

    main([flag])
    out = capsys.readouterr().out
    assert out.startswith("``python -m cnn_bench.export ckpt=PATH") and "use_ema=false" in out
