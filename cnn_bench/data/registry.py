"""The dataset registry: ``register_dataset``, ``list_datasets``, ``get_dataset``."""

from __future__ import annotations

from collections.abc import Callable

from cnn_bench.registry import Registry

_DATASETS = Registry("dataset")

# Keys every conf/dataset/*.yaml has; builders declare any extra ones they accept.
COMMON_KEYS = (
    "name", "root", "resolution", "val_fraction", "num_classes", "mean", "std",
    "in_memory", "max_memory_gb", "cache_dir", "num_workers", "split_seed",
)


def register_dataset(fn: Callable | None = None, *, name: str | None = None,
                     options: tuple[str, ...] = ()):
    """Register ``fn(cfg: dict) -> SplitSet``; ``options`` are its dataset-specific keys."""

    def add(f: Callable) -> Callable:
        f.options = tuple(options)
        return _DATASETS.register(f, name=name)

    return add(fn) if fn is not None else add


def list_datasets(pattern: str = "*") -> list[str]:
    """Registered dataset names matching a glob pattern, sorted."""
    return _DATASETS.list(pattern)


def get_dataset(name: str) -> Callable:
    """The builder for ``name``; unknown names raise a one-line ``CnnBenchError``."""
    return _DATASETS.get(name)
