"""Image sources: picklable, indexable lists of (raw image, label) for one split.

A dataset builder turns a config into a ``SplitSet`` of sources; the in-memory and streaming
paths only ever see this interface, so every dataset gets both paths and the same decoding.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cnn_bench.errors import CnnBenchError


def digest(*parts) -> str:
    """Stable hex digest of strings/bytes/ints (cache keys, fingerprints)."""
    h = hashlib.sha256()
    for p in parts:
        h.update(p if isinstance(p, bytes) else str(p).encode())
        h.update(b"\0")
    return h.hexdigest()


class ImageSource:
    """One split of a dataset: ``raw(i)`` gives encoded bytes or a uint8 [3,H,W] tensor.

    ``fingerprint`` identifies exactly these samples (content + order) and keys the disk cache.
    ``needs_validation`` says whether the streaming path must pre-check readability.
    """

    needs_validation = False

    def __init__(self, names: list[str], labels: list[int], fingerprint: str):
        if len(names) != len(labels):
            raise ValueError("names and labels differ in length")
        self.names = list(names)
        self.labels = torch.as_tensor(labels, dtype=torch.int64)
        self.fingerprint = fingerprint

    def __len__(self) -> int:
        return len(self.names)

    def raw(self, i: int) -> bytes | torch.Tensor:
        raise NotImplementedError

    def location(self, i: int) -> str:
        """Where sample ``i`` lives, for messages (a path or an archive member)."""
        return self.names[i]

    def subset(self, indices) -> ImageSource:
        """The samples at ``indices`` (in that order), with a derived fingerprint."""
        idx = [int(i) for i in indices]
        new = object.__new__(type(self))
        new.__dict__.update(self.__dict__)
        new.names = [self.names[i] for i in idx]
        new.labels = self.labels[torch.as_tensor(idx, dtype=torch.int64)]
        new.fingerprint = digest(self.fingerprint, np.asarray(idx, dtype=np.int64).tobytes())
        self._subset_payload(new, idx)
        return new

    def _subset_payload(self, new: ImageSource, idx: list[int]) -> None:
        """Subclasses narrow their per-sample storage to ``idx``."""


class FileSource(ImageSource):
    """Image files on disk (``imagefolder``)."""

    needs_validation = True

    def __init__(self, paths: list[str], names: list[str], labels: list[int], fingerprint: str):
        super().__init__(names, labels, fingerprint)
        self.paths = list(paths)

    def raw(self, i: int) -> bytes:
        with open(self.paths[i], "rb") as f:
            return f.read()

    def location(self, i: int) -> str:
        return self.paths[i]

    def _subset_payload(self, new, idx):
        new.paths = [self.paths[i] for i in idx]


class BlobSource(ImageSource):
    """Encoded images held in memory (members of the bundled archive, or of one passed as
    ``dataset.root``)."""

    needs_validation = True  # a user's archive may hold a broken member, like any folder

    def __init__(self, blobs: list[bytes], names: list[str], labels: list[int], fingerprint: str):
        super().__init__(names, labels, fingerprint)
        self.blobs = list(blobs)

    def raw(self, i: int) -> bytes:
        return self.blobs[i]

    def _subset_payload(self, new, idx):
        new.blobs = [self.blobs[i] for i in idx]


class ArraySource(ImageSource):
    """Decoded pixels in an [N,H,W,3] uint8 array (torchvision's CIFAR ``.data``).

    Subsets keep a view of the full array plus an index, so carving val never copies pixels.
    """

    def __init__(self, array: np.ndarray, labels: list[int], fingerprint: str, prefix: str):
        super().__init__([f"{prefix}[{i}]" for i in range(len(array))], labels, fingerprint)
        self.array = array
        self.index = np.arange(len(array))

    def raw(self, i: int) -> torch.Tensor:
        return torch.from_numpy(self.array[self.index[i]]).permute(2, 0, 1)

    def _subset_payload(self, new, idx):
        new.index = self.index[np.asarray(idx, dtype=np.int64)]


@dataclass
class SplitSet:
    """What a dataset builder returns: the splits (val/test may be absent) and class names.

    ``mean``/``std`` are the dataset's known channel statistics, used when the config says null.
    """

    train: ImageSource
    val: ImageSource | None
    test: ImageSource | None
    classes: list[str]
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None

    def splits(self) -> dict[str, ImageSource]:
        return {k: s for k, s in (("train", self.train), ("val", self.val), ("test", self.test))
                if s is not None}


def carve_val(labels: torch.Tensor, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Stratified, seeded split of sample indices into (train, val); both in ascending order.

    Each class gives ``round(n_c * fraction)`` samples (at least 1 when it has 2+ samples and
    ``fraction > 0``), so every class is represented in val even for tiny folders.
    """
    if not 0.0 <= fraction < 1.0:
        raise CnnBenchError(f"dataset.val_fraction must be in [0, 1), got {fraction}")
    if fraction == 0.0:
        return list(range(len(labels))), []
    g = torch.Generator().manual_seed(int(seed))
    val: list[int] = []
    for c in torch.unique(labels).tolist():
        members = torch.nonzero(labels == c).flatten()
        k = int(round(len(members) * fraction))
        if k == 0 and len(members) > 1:
            k = 1
        k = min(k, len(members) - 1)  # never leave a class without training samples
        perm = members[torch.randperm(len(members), generator=g)]
        val.extend(perm[:k].tolist())
    val_set = set(val)
    return [i for i in range(len(labels)) if i not in val_set], sorted(val)


def split_source(source: ImageSource, fraction: float, seed: int):
    """(train, val|None) carved from ``source`` by ``carve_val``."""
    tr, va = carve_val(source.labels, fraction, seed)
    return source.subset(tr), (source.subset(va) if va else None)


def resolve(path: str | Path) -> Path:
    return Path(path).expanduser().resolve()


def check_same_classes(folder, classes: list[str], train_classes: list[str]) -> None:
    """One line naming the missing and extra classes when a val/test split's differ from train's."""
    if classes != train_classes:
        missing = sorted(set(train_classes) - set(classes))
        extra = sorted(set(classes) - set(train_classes))
        detail = "; ".join(
            part for part in (f"missing {', '.join(missing)}" if missing else "",
                              f"extra {', '.join(extra)}" if extra else "") if part
        )
        raise CnnBenchError(
            f"class folders of {folder} do not match train's ({detail}); "
            "val/test must have the same class folders as train"
        )
