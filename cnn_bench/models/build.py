"""``build_model``: from a ``model`` config group (``conf/model/*.yaml``) to an ``nn.Module``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from cnn_bench.errors import CnnBenchError
from cnn_bench.models.external import PASSTHROUGHS
from cnn_bench.models.registry import get_model

SOURCES = ("zoo", *PASSTHROUGHS)
# Config keys that are not builder options: consumed here, never passed to a builder.
_META_KEYS = ("name", "source", "pretrained", "weights")
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


def _check_weights(cfg: dict[str, Any]) -> None:
    """``pretrained``/``weights`` are reserved for weight loading (a later issue: the zoo's
    torchvision-compatible models can load torchvision's state dicts directly)."""
    if cfg.get("pretrained"):
        raise CnnBenchError("model.pretrained is not supported yet")
    if cfg.get("weights") is not None:
        raise CnnBenchError("model.weights is not supported yet")


def build_model(model_cfg: Mapping, num_classes: int, resolution: int) -> nn.Module:
    """Build the model a ``model`` config describes, for ``num_classes`` and ``resolution`` px.

    ``source`` (default ``zoo``) picks the registry entry: a zoo model by ``name``, or the
    ``torchvision``/``timm`` passthrough with ``name`` as the library's model name. ``stem: auto``
    is resolved from ``resolution``; every remaining key is a builder option (unknown ones raise).
    """
    cfg = _to_dict(model_cfg)
    source = cfg.get("source") or "zoo"
    if source not in SOURCES:
        raise CnnBenchError(f"model.source must be one of {', '.join(SOURCES)}, got '{source}'")
    if "name" not in cfg:
        raise CnnBenchError("the model config has no 'name'")
    _check_weights(cfg)
    options = {k: v for k, v in cfg.items() if k not in _META_KEYS}
    if "stem" in options:
        options["stem"] = resolve_stem(options["stem"], resolution)
    if source == "zoo":
        model = get_model(cfg["name"], num_classes, **options)
    else:
        model = get_model(source, num_classes, name=cfg["name"], **options)
    # Weight loading (model.pretrained / model.weights) goes here, replacing _check_weights.
    return model
