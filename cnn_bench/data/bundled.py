"""``cifar10_mini``: a 10-class CIFAR-10 subset shipped inside the package (works offline).

The asset is an xz tar of the original CIFAR-10 JPEG bytes in ImageFolder layout
(``train/<class>/*.jpg``: 1,000 per class, ``test/<class>/*.jpg``: 200 per class), built by
``scripts/build_cifar10_mini.py``. It is read with ``tarfile`` straight from memory, never
extracted; val is carved from train by ``val_fraction`` with ``split_seed``.
"""

from __future__ import annotations

import functools
import io
import lzma
import tarfile
from pathlib import Path

from cnn_bench.data.registry import register_dataset
from cnn_bench.data.source import (BlobSource, SplitSet, check_same_classes, digest, resolve,
                                    split_source)
from cnn_bench.errors import CnnBenchError

ASSET = Path(__file__).parent / "assets" / "cifar10_mini.tar.xz"
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


@functools.lru_cache(maxsize=2)
def _read_archive(path: str, size: int, mtime_ns: int):
    """{split: {class: [(member name, bytes)]}} and the archive's sha256 (cached per process).

    Decompressing in one call and slicing members out of the buffer is ~2x faster than
    ``extractfile`` per member (0.5 s for the 12,000-image asset).
    """
    packed = Path(path).read_bytes()
    try:
        data = lzma.decompress(packed) if path.endswith(".xz") else packed
        members = tarfile.open(fileobj=io.BytesIO(data)).getmembers()
    except (lzma.LZMAError, tarfile.TarError) as exc:
        raise CnnBenchError(f"{path} is not a readable .tar.xz archive ({exc})") from None
    tree: dict[str, dict[str, list[tuple[str, bytes]]]] = {}
    for m in members:
        parts = m.name.strip("./").split("/")
        if m.isfile() and len(parts) == 3:
            blob = data[m.offset_data:m.offset_data + m.size]
            tree.setdefault(parts[0], {}).setdefault(parts[1], []).append((m.name, blob))
    return tree, digest(packed)


def _source(tree, split: str, classes: list[str], sha: str) -> BlobSource:
    names, blobs, labels = [], [], []
    for label, cls in enumerate(classes):
        for name, blob in sorted(tree.get(split, {}).get(cls, [])):
            names.append(name)
            blobs.append(blob)
            labels.append(label)
    return BlobSource(blobs, names, labels, digest("archive", sha, split, *names))


@register_dataset(name="cifar10_mini")
def cifar10_mini(cfg: dict) -> SplitSet:
    """Build the bundled subset; ``root`` (optional) points at another archive of that layout."""
    path = resolve(cfg["root"]) if cfg.get("root") else ASSET
    if not path.is_file():
        raise CnnBenchError(f"dataset archive {path} does not exist")
    st = path.stat()
    tree, sha = _read_archive(str(path), st.st_size, st.st_mtime_ns)
    if "train" not in tree:
        raise CnnBenchError(f"{path} has no train/<class>/ images")
    classes = sorted(tree["train"])
    full = _source(tree, "train", classes, sha)
    train, val = split_source(full, cfg["val_fraction"], cfg["split_seed"])
    test = None
    if "test" in tree:
        check_same_classes(f"{path} test/", sorted(tree["test"]), classes)
        test = _source(tree, "test", classes, sha)
    return SplitSet(train, val, test, classes, mean=CIFAR10_MEAN, std=CIFAR10_STD)
