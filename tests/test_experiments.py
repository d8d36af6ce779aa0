"""Every ``conf/experiment/*.yaml`` composes, says what its study used, and trains one batch on CPU."""

from __future__ import annotations

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from cnn_bench.config import CONF_DIR, validate
from conftest import compose_config
from datagen import make_imagefolder

EXPERIMENTS = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))

# What each study's one-liner must set (key -> value in the composed config).
EXPECTED = {
    "regnet_bifpn_cifar10": {"model.name": "regnet_bifpn", "model.backbone": "regnety_400mf",
                             "model.head": "study", "dataset.name": "cifar10"},
    "mobilenet_sweep": {"dataset.name": "imagefolder", "augmentation.name": "seed",
                        "optimizer.name": "adam", "optimizer.lr": 1e-3,
                        "trainer.batch_size": 192, "trainer.epochs": 10},
    "alexnet_finetune": {"model.name": "alexnet", "model.pretrained": True,
                         "dataset.name": "imagefolder", "dataset.val_fraction": 0.2,
                         "dataset.num_classes": 2, "optimizer.name": "sgd",
                         "optimizer.momentum": 0.9, "optimizer.lr": 1e-3},
    "resnet50_10class": {"model.name": "resnet50", "dataset.name": "imagefolder",
                         "dataset.resolution": 224, "dataset.val_fraction": 0.1,
                         "dataset.num_classes": 10, "dataset.mean": [0.485, 0.456, 0.406],
                         "dataset.std": [0.229, 0.224, 0.225], "optimizer.name": "adam",
                         "optimizer.lr": 1e-4},
    "cifar10_resnet18": {"model.name": "resnet18", "model.stem": "cifar", "dataset.name": "cifar10",
                         "optimizer.name": "sgd", "optimizer.nesterov": True,
                         "augmentation.label_smoothing": 0.1, "trainer.batch_size": 512,
                         "trainer.tta": "flip"},
    "cifar10_speedrun": {"model.name": "speednet", "model.whiten": True, "model.dirac": True,
                         "model.bn_scale": False, "model.bn_momentum": 0.4,
                         "dataset.name": "cifar10", "dataset.val_fraction": 0,
                         "dataset.resolution": 32, "augmentation.name": "airbench",
                         "augmentation.label_smoothing": 0.2,
                         "augmentation.crop_padding": 2, "augmentation.padding_mode": "reflect",
                         "augmentation.hflip_alternate": True, "optimizer.lr": 1.5,
                         "optimizer.momentum": 0.85, "optimizer.norm_bias_lr_mult": 64.0,
                         "optimizer.decay_norm_and_bias": True,
                         "trainer.batch_size": 1024, "trainer.compile": True,
                         "trainer.ema_decay": None, "trainer.lookahead_every": 5,
                         "trainer.lookahead_decay": 0.7738, "scheduler.pct_start": 0.23,
                         "scheduler.final_div_factor": 2.857, "trainer.tta": "flip_translate"},
}


def test_every_study_has_an_experiment():
    assert set(EXPERIMENTS) == set(EXPECTED)


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_composes_with_the_study_settings(name):
    path = CONF_DIR / "experiment" / f"{name}.yaml"
    assert path.read_text().startswith("# @package _global_\n")
    cfg = compose_config([f"experiment={name}"])
    validate(cfg)
    for key, value in EXPECTED[name].items():
        got = OmegaConf.select(cfg, key)
        got = OmegaConf.to_container(got) if OmegaConf.is_config(got) else got
        assert got == (pytest.approx(value) if isinstance(value, float) else value), key


def test_mobilenet_sweep_is_the_3x4x5_grid():
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", ["experiment=mobilenet_sweep"], return_hydra_config=True)
    params = {k: str(v).split(",") for k, v in cfg.hydra.sweeper.params.items()}
    assert params == {"model": ["mobilenet_v1", "mobilenet_v2", "c_mobilenet_v2"],
                      "model.width_mult": ["1.0", "0.75", "0.5", "0.35"],
                      "dataset.resolution": ["224", "192", "160", "128", "96"]}
    for model in params["model"]:  # every swept value composes
        compose_config(["experiment=mobilenet_sweep", f"model={model}"])


CIFAR_MEAN = [0.4914, 0.4822, 0.4465]


@pytest.mark.parametrize("name", ["cifar10_resnet18", "cifar10_speedrun", "regnet_bifpn_cifar10"])
def test_cifar_recipes_keep_32_px_and_cifar_statistics_on_a_folder(name):
    # dataset=imagefolder (the JPEGs) took its own 224 px and ImageNet mean/std: ResNet-18 with
    # the CIFAR stem at 224 px is 49x the compute.
    cfg = compose_config([f"experiment={name}", "dataset=imagefolder", "dataset.root=/data/c"])
    assert cfg.dataset.resolution == 32
    assert list(cfg.dataset.mean) == pytest.approx(CIFAR_MEAN)


def test_speedrun_with_another_augmentation_keeps_none_of_airbenchs():
    # Its crop/flip settings sat in the experiment body and merged into any augmentation chosen:
    # augmentation=none failed on hflip_alternate, or trained with 2 px reflect crops.
    cfg = compose_config(["experiment=cifar10_speedrun", "augmentation=none"])
    validate(cfg)
    assert OmegaConf.to_container(cfg.augmentation) == OmegaConf.to_container(
        compose_config(["augmentation=none"]).augmentation)


def test_another_model_after_an_experiment_says_how_to_drop_its_keys(tmp_path):
    from cnn_bench.errors import CnnBenchError
    from cnn_bench.models.build import build_model

    cfg = compose_config(["experiment=cifar10_speedrun", "model=resnet18"])
    with pytest.raises(CnnBenchError, match=r"has no option 'whiten'.*drop it with ~model.whiten"):
        build_model(cfg.model, 10, 32)


@pytest.fixture(scope="module")
def train_val_folder(tmp_path_factory):
    """3 classes x 4 train / 4 val images: no test split, so a run ends after its one val batch."""
    return make_imagefolder(tmp_path_factory.mktemp("train_val"), per_class=4)


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_trains_one_batch_on_cpu(name, train_val_folder, tmp_path):
    from cnn_bench import train as train_mod

    # The study's recipe on tiny data: one batch of 2 images at 16 px, no last.pt (AlexNet's is
    # ~0.5 GB with optimizer state); torch.compile is off, it would take minutes on CPU.
    cfg = compose_config([
        f"experiment={name}", "dataset=imagefolder", f"dataset.root={train_val_folder}",
        "dataset.resolution=16", "dataset.num_classes=null", "trainer.batch_size=2",
        "trainer.epochs=1", "trainer.limit_train_batches=1", "trainer.limit_val_batches=1",
        "trainer.device=cpu", "trainer.progress=false", "trainer.compile=false",
        "trainer.save_last=false", f"output_dir={tmp_path}",
        # No ImageNet weight file here (tests/test_pretrained.py covers loading one).
        *(["model.pretrained=false"] if OmegaConf.select(
            compose_config([f"experiment={name}"]), "model.pretrained") else [])])
    summary = train_mod.run(cfg)
    assert summary["steps"] == 1 and summary["epochs"] == 1
    assert summary["model"] == OmegaConf.select(cfg, "model.name")
