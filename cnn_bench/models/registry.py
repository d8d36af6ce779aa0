"""The model registry: ``register_model``, ``list_models``, ``get_model``."""

from __future__ import annotations

import inspect

from torch import nn

from cnn_bench.errors import CnnBenchError, did_you_mean
from cnn_bench.registry import Registry

_MODELS = Registry("model")


def register_model(fn=None, *, name: str | None = None):
    """Register a public builder ``fn(num_classes=..., **kw) -> nn.Module`` under its name."""
    return _MODELS.register(fn, name=name)


def list_models(pattern: str = "*") -> list[str]:
    """Registered model names matching a glob pattern, sorted."""
    return _MODELS.list(pattern)


def get_model(name: str, /, num_classes: int = 1000, **kwargs) -> nn.Module:
    """Build a registered model. Unknown names or options raise a one-line ``CnnBenchError``.

    ``name`` is positional-only so the passthroughs can take a ``name=`` option (the
    torchvision/timm architecture): ``get_model("torchvision", 10, name="resnet18")``.
    """
    builder = _MODELS.get(name)
    params = inspect.signature(builder).parameters
    if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        unknown = [k for k in kwargs if k not in params]
        if unknown:
            valid = [k for k in params if k != "num_classes"]
            raise CnnBenchError(
                f"model '{name}' has no option '{unknown[0]}': {did_you_mean(unknown[0], valid)} "
                f"(set by an experiment for its own model? drop it with ~model.{unknown[0]})"
            )
    return builder(num_classes=num_classes, **kwargs)
