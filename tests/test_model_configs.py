"""Building models from their YAML: every option listed and passed through, bad names and
options as one-line errors, the stem rule, the torchvision passthrough, FLOP counting, and the
``python -m cnn_bench.models`` table."""

from __future__ import annotations

import importlib.util
import inspect
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from cnn_bench.errors import CnnBenchError
from cnn_bench.models import (build_model, count_flops, count_params, get_model, list_models,
                              resolve_stem)
from cnn_bench.models.external import PASSTHROUGHS
from cnn_bench.models.registry import _MODELS

ROOT = Path(__file__).resolve().parent.parent
CONF = ROOT / "conf" / "model"
HAS_TIMM = importlib.util.find_spec("timm") is not None
NUM_CLASSES = 10
META_KEYS = {"source", "name", "pretrained", "weights", "bn_momentum"}


def _cfg(name: str) -> dict:
    """The model's YAML, as Hydra would hand it to build_model."""
    return OmegaConf.to_container(OmegaConf.load(CONF / f"{name}.yaml"))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# --- errors -----------------------------------------------------------------------------------------

def test_unknown_model_name_suggests_close_match():
    with pytest.raises(CnnBenchError, match="resnet50"):
        get_model("resnet5O")
    with pytest.raises(CnnBenchError, match="resnet50"):
        build_model({"name": "resnet5O", "stem": "auto"}, 10, 32)


@pytest.mark.parametrize("name,option,message", [
    ("alexnet_v1", {"groups": 0}, "model.groups must be an integer >= 1"),
    ("regnet_bifpn", {"feature_size": 0}, "model.feature_size must be >= 1"),
])
def test_bad_option_values_are_one_line(name, option, message):
    with pytest.raises(CnnBenchError, match=message):
        build_model({**_cfg(name), **option}, 10, 32)


def test_unknown_option():
    with pytest.raises(CnnBenchError, match="zero_init_residual"):
        get_model("resnet18", zero_init_residul=True)
    with pytest.raises(CnnBenchError, match="no option 'depth'"):
        build_model({**_cfg("mobilenet_v2"), "depth": 3}, 10, 32)


@pytest.mark.parametrize("kw", [{"stem": "auto"}, {"stem": "tiny"}, {"width_mult": 0},
                                {"head": "pooledd"}, {"backbone": "regnetx_800mf"},
                                {"num_layers": 0}])
def test_bad_option_values(kw):
    with pytest.raises(CnnBenchError):
        get_model("regnet_bifpn", 10, **kw)


# --- build_model, passthroughs, profile -------------------------------------------------------------

def test_stem_auto_rule():
    assert resolve_stem("auto", 32) == resolve_stem("auto", 64) == "cifar"
    assert resolve_stem("auto", 65) == resolve_stem("auto", 224) == "imagenet"
    assert resolve_stem("imagenet", 32) == "imagenet"
    assert isinstance(build_model(_cfg("resnet18"), 10, 32).maxpool, nn.Identity)
    assert isinstance(build_model(_cfg("resnet18"), 10, 224).maxpool, nn.MaxPool2d)


def test_build_model_accepts_hydra_config():
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF.parent), version_base=None):
        cfg = compose(overrides=["+model=mobilenet_v2", "model.width_mult=0.5"])
    model = build_model(cfg.model, 10, 32)
    assert model.features[0][0].out_channels == 16 and model.features[0][0].stride == (1, 1)


def test_torchvision_passthrough():
    model = build_model({**_cfg("torchvision"), "name": "mobilenet_v3_small"}, 10, 64)
    assert model.classifier_name == "model.classifier.3"
    assert model.stage_names[0] == "model.features.0"
    tv = build_model(_cfg("torchvision"), 10, 64)
    assert tv.classifier_name == "model.fc"
    assert tv.stage_names == ["model.conv1", "model.bn1", "model.layer1", "model.layer2",
                              "model.layer3", "model.layer4"]
    # extra options reach torchvision's builder
    model = build_model({**_cfg("torchvision"), "name": "efficientnet_b0", "dropout": 0.3}, 10, 64)
    assert model.model.classifier[0].p == 0.3


@pytest.mark.parametrize("name,resolution", [("googlenet", 64), ("inception_v3", 80)])
def test_torchvision_aux_classifier_models_train(name, resolution):
    # Built with auxiliary heads, their train-mode forward returns a named tuple the loss cannot
    # take, and the heads would never get a gradient from the main logits.
    model = build_model({**_cfg("torchvision"), "name": name}, NUM_CLASSES, resolution).train()
    out = model(torch.randn(2, 3, resolution, resolution))
    assert isinstance(out, torch.Tensor) and out.shape == (2, NUM_CLASSES)
    nn.functional.cross_entropy(out, torch.tensor([0, 1])).backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    with pytest.raises(CnnBenchError, match="aux_logits=true is not supported"):
        build_model({**_cfg("torchvision"), "name": name, "aux_logits": True}, NUM_CLASSES, 64)


@pytest.mark.skipif(not HAS_TIMM, reason="timm is not installed")
def test_timm_aux_classifier_is_refused_in_one_line():
    # timm's inception_v3 with aux_logits returns (logits, aux) in every mode: the loss would
    # fail on the tuple after the data was built, so it is refused when the model is.
    with pytest.raises(CnnBenchError, match="timm inception_v3: model.aux_logits=true is not supported"):
        build_model({**_cfg("timm"), "name": "inception_v3", "aux_logits": True}, NUM_CLASSES, 80)


@pytest.mark.skipif(not HAS_TIMM, reason="timm is not installed")
def test_timm_distilled_models_with_two_heads_are_refused_in_one_line():
    # Their pretrained_cfg names two classifiers: a tuple that ended in an AttributeError.
    with pytest.raises(CnnBenchError, match="has 2 classifier heads .head, head_dist.*"
                                            "deit_tiny_patch16_224"):
        build_model({**_cfg("timm"), "name": "deit_tiny_distilled_patch16_224"}, NUM_CLASSES, 224)


def test_torchvision_unknown_name():
    with pytest.raises(CnnBenchError, match="resnet50"):
        build_model({**_cfg("torchvision"), "name": "resnet5O"}, 10, 32)
    with pytest.raises(CnnBenchError, match="foo"):
        build_model({**_cfg("torchvision"), "foo": 1}, 10, 32)


@pytest.mark.skipif(HAS_TIMM, reason="timm is installed")
def test_timm_missing_is_a_clear_error():
    with pytest.raises(CnnBenchError, match=r"timm is not installed: pip install timm"):
        build_model(_cfg("timm"), 10, 32)


def test_count_flops_restores_modes_and_counts_macs_twice():
    model = get_model("resnet18", 10, stem="cifar")
    model.train()
    model.layer1.eval()
    flops = count_flops(model, 32)
    assert model.training and not model.layer1.training and model.layer2.training
    assert flops > 0
    # a 4x4 RGB image is 48 inputs: 48 * 7 multiply-adds, 2 FLOPs each
    assert count_flops(nn.Sequential(nn.Flatten(), nn.Linear(48, 7)), 4) == 2 * 48 * 7
    linear = nn.Linear(100, 7, bias=False)
    assert count_params(linear) == 700
    linear.weight.requires_grad_(False)
    assert count_params(linear, trainable_only=True) == 0


# --- configs and CLI ----------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list_models())
def test_yaml_lists_every_option(name):
    cfg = _cfg(name)
    assert cfg["pretrained"] is False and cfg["weights"] is None and cfg["bn_momentum"] is None
    params = inspect.signature(_MODELS.get(name)).parameters
    if name in PASSTHROUGHS:
        assert cfg["source"] == name and cfg["name"] == params["name"].default
        assert set(cfg) == META_KEYS
        return
    assert cfg["name"] == name and cfg.get("source", "zoo") == "zoo"
    assert cfg["stem"] == "auto"
    options = {k: p.default for k, p in params.items() if k != "num_classes"}
    assert set(cfg) - META_KEYS == set(options)
    assert {k: v for k, v in cfg.items() if k not in META_KEYS | {"stem"}} == \
        {k: v for k, v in options.items() if k != "stem"}


def test_every_yaml_is_a_registered_model():
    assert sorted(p.stem for p in CONF.glob("*.yaml")) == list_models()


def test_cli_prints_a_row():
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    res = subprocess.run([sys.executable, "-m", "cnn_bench.models", "resnet18", "--resolution",
                          "32", "--num-classes", "10"], capture_output=True, text=True, env=env,
                         cwd=ROOT, timeout=120)
    assert res.returncode == 0, res.stderr
    rows = [line for line in res.stdout.splitlines() if line.startswith("resnet18")]
    assert len(rows) == 1 and "11.17M" in rows[0] and "[1, 10]" in rows[0]
    bad = subprocess.run([sys.executable, "-m", "cnn_bench.models", "resnet5O"],
                         capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert bad.returncode == 2 and "resnet50" in bad.stderr and "Traceback" not in bad.stderr
    # a glob that matches a passthrough only said "no model matches"
    glob = subprocess.run([sys.executable, "-m", "cnn_bench.models", "torchvis*"],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert glob.returncode == 2
    assert "matches only torchvision, listed by name" in glob.stderr


def test_cli_reads_a_plain_word_as_part_of_a_name():
    # "resnet" matched nothing (a glob without wildcards is an exact name)
    from cnn_bench.models.__main__ import _select

    assert _select("resnet") == ["resnet101", "resnet152", "resnet18", "resnet34", "resnet50"]
    assert _select("regnet*") == ["regnet_bifpn", "regnetx_200mf", "regnetx_400mf", "regnety_400mf"]
    with pytest.raises(CnnBenchError, match="no model matches 'resnt': did you mean: resnet50"):
        _select("resnt")


def test_alexnet_imagenet_stem_below_its_minimum_names_both_ways_out():
    # With pretrained weights the cifar stem is no way out (conv1's shape differs): the line
    # must also offer the resolution.
    model = build_model({**_cfg("alexnet"), "stem": "imagenet"}, NUM_CLASSES, 48)
    with pytest.raises(CnnBenchError, match=r"model.stem=cifar, .*dataset.resolution=63 or more"):
        model(torch.randn(1, 3, 48, 48))
    assert model(torch.randn(1, 3, 63, 63)).shape == (1, NUM_CLASSES)


@pytest.mark.parametrize("stem, whiten, minimum", [("imagenet", False, 29), ("imagenet", True, 30),
                                                  ("cifar", False, 8), ("cifar", True, 9)])
def test_speednet_below_its_minimum_is_one_line(stem, whiten, minimum):
    # stem=imagenet at 16 or 24 px was a raw "Output size is too small" from a max-pool.
    model = build_model({**_cfg("speednet_s"), "stem": stem, "whiten": whiten}, NUM_CLASSES, 32)
    with pytest.raises(CnnBenchError, match=rf"at least {minimum} px, got \({minimum - 1}, "):
        model(torch.randn(2, 3, minimum - 1, minimum - 1))
    assert model(torch.randn(2, 3, minimum, minimum)).shape == (2, NUM_CLASSES)
