"""The model zoo. Importing this package registers every family."""

from cnn_bench.models import (  # noqa: F401  (registers builders)
    alexnet,
    bifpn,
    external,
    mobilenet_v1,
    mobilenet_v2,
    regnet,
    resnet,
    speednet,
)
from cnn_bench.models.build import build_model, resolve_stem
from cnn_bench.models.layers import make_divisible
from cnn_bench.models.profile import count_flops, count_params
from cnn_bench.models.registry import get_model, list_models, register_model

__all__ = ["get_model", "list_models", "register_model", "make_divisible", "build_model",
           "resolve_stem", "count_params", "count_flops"]
