"""The model zoo. Importing this package registers every family."""

from cnn_bench.models import speednet  # noqa: F401  (registers builders)
from cnn_bench.models.layers import make_divisible
from cnn_bench.models.registry import get_model, list_models, register_model

__all__ = ["get_model", "list_models", "register_model", "make_divisible"]
