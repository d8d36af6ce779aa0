"""``cifar10_mini``: a 10-class CIFAR-10 subset shipped inside the package (works offline).

The asset is an xz tar of the original CIFAR-10 JPEG bytes in ImageFolder layout
(``train/<class>/*.jpg``: 1,000 per class, ``test/<class>/*.jpg``: 200 per class), built by
``scripts/build_cifar10_mini.py``. It is read with ``tarfile`` straight from memory, never
extracted; val is carved from train by ``val_fraction`` with ``split_seed``.

``dataset.root`` may name another tar (plain, xz, gzip or bzip2) with ``imagefolder``'s split
layout (``train/<class>/``, optional ``val/`` and ``test/``): it gives the same images, labels
and split as the unpacked folder.
"""

from __future__ import annotations

import bz2
import functools
import gzip
import io
import lzma
import tarfile
from pathlib import Path

from cnn_bench.data.decode import IMG_EXTENSIONS
from cnn_bench.data.imagefolder import split_folders
from cnn_bench.data.registry import register_dataset
from cnn_bench.data.source import (BlobSource, SplitSet, check_same_classes, digest, resolve,
                                    split_source)
from cnn_bench.errors import CnnBenchError

ASSET = Path(__file__).parent / "assets" / "cifar10_mini.tar.xz"
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


# Compressed tars by magic bytes (not by suffix: ``DATA.TAR.XZ``, ``.tgz`` and ``.txz`` too).
_DECOMPRESS = ((b"\xfd7zXZ\x00", lzma.decompress), (b"\x1f\x8b", gzip.decompress),
               (b"BZh", bz2.decompress))


def _unpack(path: str, packed: bytes) -> tuple[bytes, tarfile.TarFile]:
    try:
        fn = next((fn for magic, fn in _DECOMPRESS if packed.startswith(magic)), None)
        data = fn(packed) if fn else packed
        tar = tarfile.open(fileobj=io.BytesIO(data), mode="r:")
        tar.getmembers()  # reads the whole index here, where a damaged archive is reported
        return data, tar
    except (lzma.LZMAError, OSError, EOFError, tarfile.TarError) as exc:
        why = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CnnBenchError(f"{path} is not a readable tar archive (.tar, .tar.xz, .tar.gz, "
                            f".tar.bz2): {why}") from None


def _walk_order(parts: list[str]) -> tuple:
    """Sort key giving ``os.walk``'s order within a class folder (a folder's files before its
    sub-folders'), so an archive lists, and splits, its images as the unpacked folder does."""
    return (*((1, p) for p in parts[:-1]), (0, parts[-1]))


@functools.lru_cache(maxsize=2)
def _read_archive(path: str, size: int, mtime_ns: int):
    """{top folder: {class: [(member name, bytes)]}}, the class folders seen (empty ones too)
    and the archive's sha256 (cached per process).

    Members are picked as ``imagefolder`` picks files: by image extension, hidden names
    skipped, searched below each class folder; hard and symbolic links are followed.
    Decompressing in one call and slicing regular members out of the buffer is ~2x faster than
    ``extractfile`` per member (0.5 s for the 12,000-image asset).
    """
    packed = Path(path).read_bytes()
    data, tar = _unpack(path, packed)
    tree: dict[str, dict[str, list[tuple[str, bytes]]]] = {}
    folders: dict[str, set[str]] = {}
    for m in tar.getmembers():
        parts = [p for p in m.name.split("/") if p not in ("", ".")]
        if len(parts) < 2 or any(p.startswith(".") for p in parts):
            continue
        if m.isdir() or len(parts) > 2:
            folders.setdefault(parts[0], set()).add(parts[1])
        if len(parts) < 3 or m.isdir() or not parts[-1].lower().endswith(IMG_EXTENSIONS):
            continue
        if m.isfile():
            blob = data[m.offset_data:m.offset_data + m.size]
        elif m.islnk() or m.issym():
            try:
                blob = tar.extractfile(m).read()
            except (KeyError, AttributeError, tarfile.TarError):
                blob = b""  # a dangling link: the decode pass reports it with the unreadable files
        else:
            continue
        tree.setdefault(parts[0], {}).setdefault(parts[1], []).append(("/".join(parts), blob))
    for classes in tree.values():
        for images in classes.values():
            images.sort(key=lambda item: _walk_order(item[0].split("/")[2:]))
    return tree, folders, digest(packed)


def _source(path: Path, tree, top: str, classes: list[str], sha: str) -> BlobSource:
    names, blobs, labels = [], [], []
    for label, cls in enumerate(classes):
        images = tree.get(top, {}).get(cls, [])
        if not images:
            raise CnnBenchError(f"class folder {top}/{cls} of {path} has no images "
                                f"({', '.join(IMG_EXTENSIONS)}); add images or remove the folder")
        for name, blob in images:
            names.append(name)
            blobs.append(blob)
            labels.append(label)
    return BlobSource(blobs, names, labels, digest("archive", sha, top, *names))


@register_dataset(name="cifar10_mini")
def cifar10_mini(cfg: dict) -> SplitSet:
    """Build the bundled subset; ``root`` (optional) points at another archive of that layout."""
    path = resolve(cfg["root"]) if cfg.get("root") else ASSET
    if path.is_dir():
        raise CnnBenchError(f"dataset.root {path} is a folder: dataset={cfg['name']} reads a tar "
                            "archive (a folder of images trains with dataset=imagefolder)")
    if not path.is_file():
        raise CnnBenchError(f"dataset archive {path} does not exist")
    st = path.stat()
    tree, folders, sha = _read_archive(str(path), st.st_size, st.st_mtime_ns)
    splits = split_folders(folders, str(path))
    if "train" not in splits:
        raise CnnBenchError(f"{path} has no train/<class>/ images")
    classes = sorted(folders[splits["train"]])
    train = _source(path, tree, splits["train"], classes, sha)
    if "val" in splits:
        check_same_classes(f"{path} {splits['val']}/", sorted(folders[splits["val"]]), classes)
        val = _source(path, tree, splits["val"], classes, sha)
    else:
        train, val = split_source(train, cfg["val_fraction"], cfg["split_seed"])
    test = None
    if "test" in splits:
        check_same_classes(f"{path} {splits['test']}/", sorted(folders[splits["test"]]), classes)
        test = _source(path, tree, splits["test"], classes, sha)
    return SplitSet(train, val, test, classes, mean=CIFAR10_MEAN, std=CIFAR10_STD)
