"""``build_model``: from a ``model`` config group (``conf/model/*.yaml``) to an ``nn.Module``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from cnn_bench.errors import CnnBenchError
from cnn_bench.models.external import PASSTHROUGHS
from cnn_bench.models.pretrained import load_pretrained, pretrained_options, pretrained_spec
from cnn_bench.models.registry import get_model
from cnn_bench.models.weights import load_weights_file

SOURCES = ("zoo", *PASSTHROUGHS)
# Config keys that are not builder options: consumed here, never passed to a builder.
_META_KEYS = ("name", "source", "pretrained", "pretrained_tag", "weights", "bn_momentum")
# Inputs up to this size (px) get the CIFAR stem under ``stem: auto``.
CIFAR_STEM_MAX_RESOLUTION = 64


def resolve_stem(stem: str, resolution: int) -> str:
    """``auto`` -> ``cifar`` at <= 64 px (a stride-4 stem would leave 8x8 maps or less from 32 px),
    else ``imagenet``; other values pass through (the builders validate them)."""
    if stem == "auto":
        return "cifar" if resolution <= CIFAR_STEM_MAX_RESOLUTION else "imagenet"
    return stem


def _to_dict(cfg: Mapping) -> dict[str, Any]:
    try:
        from omegaconf import DictConfig, OmegaConf
    except ImportError:  # pragma: no cover - omegaconf comes with hydra
        return dict(cfg)
    if isinstance(cfg, DictConfig):
        return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
    return dict(cfg)


def _check_weights(cfg: dict[str, Any]):
    """The pretrained weights the config asks for (``None`` if none); ``pretrained`` and
    ``weights`` together are refused: both would set the same tensors."""
    spec = pretrained_spec(cfg)
    if spec is not None and cfg.get("weights") is not None:
        raise CnnBenchError("set model.pretrained=true or model.weights=FILE, not both: the file "
                            "would overwrite the ImageNet weights")
    return spec


def trained_model_config(model_cfg: Mapping, resolution: int) -> dict[str, Any]:
    """The model config that rebuilds a trained run's architecture without loading any weights
    (for evaluation: the checkpoint's state dict is loaded next). ``stem: auto`` is resolved as
    the training run resolved it (with ``pretrained``: ``imagenet`` at any resolution), and a
    pretrained passthrough gets the builder options its weights needed. Needs no weight file."""
    cfg = _to_dict(model_cfg)
    spec = pretrained_spec(cfg)
    if spec is not None:
        cfg = pretrained_options(spec, cfg)
    if cfg.get("stem") is not None:
        cfg["stem"] = resolve_stem(cfg["stem"], resolution)
    return {**cfg, "pretrained": False, "weights": None}


def build_model(model_cfg: Mapping, num_classes: int, resolution: int) -> nn.Module:
    """Build the model a ``model`` config describes, for ``num_classes`` and ``resolution`` px.

    ``source`` (default ``zoo``) picks the registry entry: a zoo model by ``name``, or the
    ``torchvision``/``timm`` passthrough with ``name`` as the library's model name. ``stem: auto``
    is resolved from ``resolution``; every remaining key is a builder option (unknown ones raise).
    ``pretrained: true`` then loads torchvision's ImageNet weights (``pretrained_tag`` picks
    which; see ``cnn_bench.models.pretrained``), ``weights: PATH`` a state-dict file (see
    ``cnn_bench.models.weights``); a classifier sized for other classes stays freshly initialised.
    """
    cfg = _to_dict(model_cfg)
    source = cfg.get("source") or "zoo"
    if source not in SOURCES:
        raise CnnBenchError(f"model.source must be one of {', '.join(SOURCES)}, got '{source}'")
    if "name" not in cfg:
        raise CnnBenchError("the model config has no 'name'")
    spec = _check_weights(cfg)
    options = {k: v for k, v in cfg.items() if k not in _META_KEYS}
    if spec is not None:
        options = pretrained_options(spec, options)
    if "stem" in options:
        options["stem"] = resolve_stem(options["stem"], resolution)
    if source == "zoo":
        model = get_model(cfg["name"], num_classes, **options)
    else:
        model = get_model(source, num_classes, name=cfg["name"], **options)
    if spec is not None:
        load_pretrained(model, spec)
    elif cfg.get("weights") is not None:
        load_weights_file(model, cfg["weights"])
    if cfg.get("bn_momentum") is not None:
        set_bn_momentum(model, cfg["bn_momentum"])
    return model


def set_bn_momentum(model: nn.Module, momentum: float) -> None:
    """Set every BatchNorm layer's running-stat momentum (``new = (1 - m) * old + m * batch``,
    like timm's ``--bn-momentum``). A high momentum (airbench: 0.4) makes the running
    statistics follow a short, fast-changing run's recent batches."""
    if not 0.0 < momentum <= 1.0:
        raise CnnBenchError(f"model.bn_momentum must be in (0, 1] or null, got {momentum}")
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.momentum = float(momentum)
