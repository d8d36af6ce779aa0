"""``cifar10`` and ``cifar100`` through ``torchvision.datasets`` (downloaded on first use).

The decoded ``.data`` array ([N,32,32,3] uint8) is used directly, so there is nothing to
decode; val is carved from the train split by ``val_fraction`` with ``split_seed``.
"""

from __future__ import annotations

import contextlib
import io
import os

import torchvision.datasets as tvd

from cnn_bench.data.registry import register_dataset
from cnn_bench.data.source import ArraySource, SplitSet, digest, resolve, split_source
from cnn_bench.errors import CnnBenchError

_SETS = {
    "cifar10": (tvd.CIFAR10, "CIFAR-10", (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": (tvd.CIFAR100, "CIFAR-100", (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}


def _open(cls, title: str, root: str, train: bool, download: bool):
    try:
        # torchvision prints download progress and "Files already downloaded" to stdout.
        with contextlib.redirect_stdout(io.StringIO()):
            return cls(root, train=train, download=download)
    except Exception as exc:  # noqa: BLE001 - network, disk and integrity errors alike
        why = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        action = f"could not download {title} to" if download else f"found no {title} in"
        raise CnnBenchError(
            f"{action} {root} ({why}); pass dataset.root= pointing at an existing "
            f"copy (the folder that contains {cls.base_folder}/)"
        ) from None


def _fingerprint(name: str, root: str, folder: str) -> str:
    """Names, sizes, mtimes and ctimes of the dataset's files: cheap, and changes when they do."""
    base = os.path.join(root, folder)
    stats = []
    for entry in sorted(os.scandir(base), key=lambda e: e.name):
        if entry.is_file():
            st = entry.stat()
            stats.append(f"{entry.name}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}")
    return digest(name, base, *stats)


def _build(name: str, cfg: dict) -> SplitSet:
    cls, title, mean, std = _SETS[name]
    root = str(resolve(cfg.get("root") or "data"))
    download = bool(cfg.get("download", True))
    train_set = _open(cls, title, root, True, download)
    test_set = _open(cls, title, root, False, False)
    fp = _fingerprint(name, root, cls.base_folder)
    full = ArraySource(train_set.data, train_set.targets, digest(fp, "train"), f"{name}/train")
    test = ArraySource(test_set.data, test_set.targets, digest(fp, "test"), f"{name}/test")
    train, val = split_source(full, cfg["val_fraction"], cfg["split_seed"])
    return SplitSet(train, val, test, list(train_set.classes), mean=mean, std=std)


@register_dataset(name="cifar10", options=("download",))
def cifar10(cfg: dict) -> SplitSet:
    """CIFAR-10 (50,000 train / 10,000 test, 32 px) via torchvision."""
    return _build("cifar10", cfg)


@register_dataset(name="cifar100", options=("download",))
def cifar100(cfg: dict) -> SplitSet:
    """CIFAR-100 (50,000 train / 10,000 test, 32 px, 100 fine classes) via torchvision."""
    return _build("cifar100", cfg)
