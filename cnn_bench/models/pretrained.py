"""``model.pretrained=true``: torchvision's ImageNet weights, for the models that have them.

The zoo's torchvision twins (same module names with ``stem=imagenet`` and ``width_mult=1``) and
the ``torchvision`` passthrough load the state dict of
``torchvision.models.get_model_weights(arch)[tag]`` (``DEFAULT``, or ``model.pretrained_tag``,
e.g. ``IMAGENET1K_V2``). ``regnet_bifpn`` loads its backbone's RegNet weights into ``backbone``;
its neck and head start fresh.

``weights.get_state_dict`` reads the torch hub cache (``$TORCH_HOME/hub/checkpoints/<file>``)
and downloads only when the file is missing, so an offline machine needs the file put there by
hand: the error when it is missing names the file, its URL and the directory.
"""

from __future__ import annotations

import pickle
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from torch import nn

from cnn_bench.errors import CnnBenchError, did_you_mean
from cnn_bench.models.external import TORCHVISION_PRETRAINED_OPTIONS
from cnn_bench.models.weights import LoadReport, load_state_dict_into, log, rekey

# Zoo model -> torchvision architecture with the same module names (tests/test_models.py checks
# that their state dicts load with strict=True). regnetx_200mf has no torchvision counterpart.
TORCHVISION_TWINS = {
    "alexnet": "alexnet", "resnet18": "resnet18", "resnet34": "resnet34", "resnet50": "resnet50",
    "resnet101": "resnet101", "resnet152": "resnet152", "mobilenet_v2": "mobilenet_v2",
    "regnetx_400mf": "regnet_x_400mf", "regnety_400mf": "regnet_y_400mf",
}
# Zoo models whose ``backbone`` option names a twin: its weights go into ``backbone.``.
BACKBONE_MODELS = {"regnet_bifpn": ("neck", "head")}
SUPPORTED = (*TORCHVISION_TWINS, "regnet_bifpn (backbone)", "torchvision (any model.name)")

# torchvision's DenseNet checkpoints predate the ban on '.' in module names ('norm.1' for
# 'norm1'); torchvision's own builder renames them the same way.
_DENSENET_OLD_KEY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\."
    r"((?:[12])\.(?:weight|bias|running_mean|running_var))$")


@dataclass(frozen=True)
class PretrainedSpec:
    """Which torchvision weights a model config loads, and where they go in the model."""

    arch: str                  # torchvision's model name
    weights: Any               # a torchvision ``WeightsEnum`` member
    prefix: str = ""           # where the weights' names go in our model
    drop: tuple[str, ...] = ()   # weight-name prefixes not loaded (a backbone's classifier)
    fresh: tuple[str, ...] = ()  # our modules the weights do not cover

    @property
    def tag(self) -> str:
        return self.weights.name  # DEFAULT resolves to the member it aliases

    @property
    def filename(self) -> str:
        return Path(urlparse(self.weights.url).path).name


def _weights(arch: str, tag: str | None) -> Any:
    import torchvision

    available = torchvision.models.list_models(module=torchvision.models)
    if arch not in available:
        raise CnnBenchError(f"unknown torchvision model '{arch}': {did_you_mean(arch, available)}")
    enum = torchvision.models.get_model_weights(arch)
    tag = tag or "DEFAULT"
    try:
        return enum[str(tag).replace(enum.__name__ + ".", "")]
    except KeyError:
        raise CnnBenchError(f"model.pretrained_tag: {arch} has no weights '{tag}'; choose one of "
                            f"{', '.join(enum.__members__)}") from None


def pretrained_spec(cfg: Mapping[str, Any]) -> PretrainedSpec | None:
    """The weights a (plain-dict) model config asks for; ``None`` without ``pretrained``.

    Raises a one-line ``CnnBenchError`` for a model without ImageNet weights or a width they
    do not fit.
    """
    if not cfg.get("pretrained"):
        return None
    source, name = cfg.get("source") or "zoo", cfg.get("name")
    if source == "timm":
        raise CnnBenchError("model.pretrained loads torchvision weights; for a timm model save "
                            "its state dict and pass it as model.weights=FILE")
    if source == "torchvision":
        return PretrainedSpec(name, _weights(name, cfg.get("pretrained_tag")), prefix="model.")
    if name not in TORCHVISION_TWINS and name not in BACKBONE_MODELS:
        raise CnnBenchError(f"model.pretrained: {name} has no ImageNet weights (torchvision has no "
                            f"such architecture); it works with {', '.join(SUPPORTED)}; or load "
                            f"your own with model.weights=FILE")
    width = float(cfg.get("width_mult", 1.0))
    if width != 1.0:
        raise CnnBenchError(f"model.pretrained needs model.width_mult=1.0: ImageNet weights exist "
                            f"for the full-width {name} only (got {width:g})")
    if name in BACKBONE_MODELS:
        backbone = cfg.get("backbone", "regnetx_400mf")
        if backbone not in TORCHVISION_TWINS:
            have = [b for b in TORCHVISION_TWINS if b.startswith("regnet")]
            raise CnnBenchError(f"model.pretrained: {name}'s backbone {backbone} has no ImageNet "
                                f"weights; use model.backbone={' or '.join(have)}")
        arch = TORCHVISION_TWINS[backbone]
        return PretrainedSpec(arch, _weights(arch, cfg.get("pretrained_tag")), prefix="backbone.",
                              drop=("fc.",), fresh=BACKBONE_MODELS[name])
    arch = TORCHVISION_TWINS[name]
    return PretrainedSpec(arch, _weights(arch, cfg.get("pretrained_tag")))


def pretrained_options(spec: PretrainedSpec, options: dict[str, Any]) -> dict[str, Any]:
    """Builder options for a pretrained build: the stem the weights were trained with, and the
    settings torchvision's own builder uses with weights (passthrough)."""
    options = dict(options)
    # NOTE: `stem: auto` becomes `imagenet` with pretrained weights, whatever the resolution: the
    # weights were learnt through torchvision's stem, and the cifar stem of ResNet and AlexNet
    # has another conv1 shape, so `auto` picking it at <= 64 px would make the weights unusable.
    # An explicit `stem: cifar` is honoured: MobileNet v2's and RegNet's cifar stem only drops a
    # stride, so the weights fit (useful on small images); for ResNet/AlexNet the load stops with
    # the conv1 shapes. Rebuilding such a run's model (evaluate) must use the same stem: see
    # build.trained_model_config.
    if options.get("stem") == "auto":
        options["stem"] = "imagenet"
    if spec.prefix == "model.":
        options = {**TORCHVISION_PRETRAINED_OPTIONS.get(spec.arch, {}), **options}
    return options


def _fetch(spec: PretrainedSpec) -> Mapping[str, Any]:
    """The weights' state dict from the hub cache (downloading only when it is missing)."""
    import torch.hub

    directory = Path(torch.hub.get_dir()) / "checkpoints"
    file = directory / spec.filename
    try:
        # weights_only: a file in the cache is read like any other, without unpickling objects.
        return spec.weights.get_state_dict(progress=False, weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure (network, disk, format) ends in one line
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        if not file.is_file():
            raise CnnBenchError(
                f"model.pretrained: {spec.arch} {spec.tag} weights are not in the cache and the "
                f"download failed ({reason}); offline, put {spec.filename} (from "
                f"{spec.weights.url}) in {directory}") from None
        if isinstance(e, pickle.UnpicklingError):
            raise CnnBenchError(f"refusing to load {file}: it holds objects other than tensors "
                                f"({reason}); replace it with the file from "
                                f"{spec.weights.url}") from None
        raise CnnBenchError(f"cannot read {file} ({reason}): replace it with the file from "
                            f"{spec.weights.url}") from None


def load_pretrained(model: nn.Module, spec: PretrainedSpec) -> LoadReport:
    """Load ``spec``'s weights into ``model`` (classifier replaced when the class counts
    differ); every other tensor of the model must be covered. Logs and returns the report."""
    state = _fetch(spec)
    if spec.arch.startswith("densenet"):
        state = rekey(state, lambda k: "".join(m.groups())
                      if (m := _DENSENET_OLD_KEY.match(k)) else k)
    state = rekey(state, lambda k: None if k.startswith(spec.drop) else spec.prefix + k)
    source = f"torchvision {spec.arch} {spec.tag} ({spec.filename})"
    report = load_state_dict_into(model, state, source)
    uncovered = [k for k in report.missing if not k.startswith(tuple(f + "." for f in spec.fresh))]
    if uncovered:
        raise CnnBenchError(f"model.pretrained: {len(uncovered)} tensors of the model are not in "
                            f"{spec.filename} (first: {uncovered[0]}); the weights do not fit "
                            f"this configuration")
    report.log()
    if spec.fresh:
        log.info("weights: %s only: %s start from their fresh initialisation",
                 spec.prefix.rstrip("."), ", ".join(spec.fresh))
    return report


def pretrained_normalization(model_cfg: Mapping) -> tuple[list[float], list[float]] | None:
    """The mean/std the pretrained weights were trained with (ImageNet's), or ``None`` when the
    model config does not ask for pretrained weights. Needs no weight file."""
    from cnn_bench.models.build import _to_dict  # build imports this module

    spec = pretrained_spec(_to_dict(model_cfg))
    if spec is None:
        return None
    transform = spec.weights.transforms()
    mean, std = getattr(transform, "mean", None), getattr(transform, "std", None)
    if mean is None or std is None:
        return None
    return [float(v) for v in mean], [float(v) for v in std]
