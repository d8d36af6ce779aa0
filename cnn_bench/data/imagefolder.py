"""``imagefolder``: any folder of class folders of images.

Accepted layouts under ``dataset.root``:

- ``train/<class>/...``, plus ``val/`` (or ``validation/``, ``valid/``) and optional ``test/``;
  without a val folder, val is carved from train by ``val_fraction``;
- ``<class>/...`` directly: split into train/val by ``val_fraction`` with ``split_seed``.

Classes are the sorted sub-folder names of train; val/test must have the same ones. Files are
picked by extension (torchvision's ``IMG_EXTENSIONS``), searched recursively inside each class
folder. Unreadable files are not detected here but by the decode/validation pass.
"""

from __future__ import annotations

import os
from pathlib import Path

from cnn_bench.data.decode import IMG_EXTENSIONS
from cnn_bench.data.registry import register_dataset
from cnn_bench.data.source import (FileSource, SplitSet, check_same_classes, digest, resolve,
                                    split_source)
from cnn_bench.errors import CnnBenchError

VAL_DIRS = ("val", "validation", "valid")


def find_classes(folder: Path) -> list[str]:
    """Sorted names of the visible sub-folders of ``folder``."""
    classes = sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise CnnBenchError(f"{folder} has no class folders (expected {folder}/<class>/<image>)")
    return classes


def _stamp(path: str) -> str:
    """What identifies a file's content for the decoded-data cache: size, mtime and ctime (a file
    replaced with its old size and mtime restored, as ``cp -p`` or ``rsync -a`` do, still gets a
    new ctime). A file that cannot be stat'ed (a dangling link) stays in the list, and the
    decode pass reports it with the other unreadable files."""
    try:
        st = os.stat(path)
    except OSError as e:
        return f"unreadable {e.errno}"
    return f"{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}"


def _images_in(class_dir: Path, root: Path) -> list[tuple[str, str, str]]:
    """(path, path relative to ``root``, cache stamp) of every image below ``class_dir``, sorted."""
    found = []
    for dirpath, dirnames, filenames in os.walk(class_dir, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        rel_dir = os.path.relpath(dirpath, root)  # once per folder: relpath costs ~10 us a call
        for fn in sorted(filenames):
            if fn.lower().endswith(IMG_EXTENSIONS) and not fn.startswith("."):
                path = os.path.join(dirpath, fn)
                found.append((path, os.path.join(rel_dir, fn), _stamp(path)))
    return found


def scan(folder: Path, classes: list[str], root: Path) -> FileSource:
    """All images of ``folder/<class>/`` for ``classes``; an empty class folder is an error."""
    paths, names, labels, stamps = [], [], [], []
    for label, cls in enumerate(classes):
        files = _images_in(folder / cls, root)
        if not files:
            raise CnnBenchError(
                f"class folder {folder / cls} has no images ({', '.join(IMG_EXTENSIONS)}); "
                "add images or remove the folder"
            )
        for path, rel, stamp in files:
            paths.append(path)
            names.append(rel)
            labels.append(label)
            stamps.append(f"{rel}:{stamp}:{label}")
    return FileSource(paths, names, labels, digest("imagefolder", folder, *stamps))


@register_dataset(name="imagefolder")
def imagefolder(cfg: dict) -> SplitSet:
    """Build train/val/test sources from ``cfg['root']`` (see the module docstring)."""
    if not cfg.get("root"):
        raise CnnBenchError(
            "dataset.root is required for dataset=imagefolder "
            "(a folder with train/ and val/ class folders, or one folder of class folders)"
        )
    root = resolve(cfg["root"])
    if not root.exists():
        raise CnnBenchError(f"dataset.root {root} does not exist")
    if not root.is_dir():
        raise CnnBenchError(f"dataset.root {root} is not a folder")

    train_dir = root / "train"
    if not train_dir.is_dir():
        split_dirs = [d for d in (*VAL_DIRS, "test") if (root / d).is_dir()]
        if split_dirs:
            raise CnnBenchError(f"dataset.root {root} has {split_dirs[0]}/ but no train/; "
                                "add train/<class>/ folders")
        classes = find_classes(root)
        train, val = split_source(scan(root, classes, root), cfg["val_fraction"], cfg["split_seed"])
        return SplitSet(train, val, None, classes)

    classes = find_classes(train_dir)
    train = scan(train_dir, classes, root)
    val_dir = next((root / d for d in VAL_DIRS if (root / d).is_dir()), None)
    if val_dir is None:
        train, val = split_source(train, cfg["val_fraction"], cfg["split_seed"])
    else:
        check_same_classes(val_dir, find_classes(val_dir), classes)
        val = scan(val_dir, classes, root)
    test = None
    if (root / "test").is_dir():
        check_same_classes(root / "test", find_classes(root / "test"), classes)
        test = scan(root / "test", classes, root)
    return SplitSet(train, val, test, classes)
