"""``imagefolder``: any folder of class folders of images.

Accepted layouts under ``dataset.root``:

- ``train/<class>/...``, plus ``val/`` (or ``validation/``, ``valid/``) and optional ``test/``;
  without a val folder, val is carved from train by ``val_fraction``;
- ``<class>/...`` directly: split into train/val by ``val_fraction`` with ``split_seed``.

Split folder names match in any case (``Train/``, ``VAL/``), so they are never taken for classes.

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
SPLIT_DIRS = {"train": ("train",), "val": VAL_DIRS, "test": ("test",)}


def split_folders(names, where) -> dict[str, str]:
    """{split: folder name} among ``names`` (the folders under a root), matched ignoring case;
    ``val`` takes the first of ``VAL_DIRS`` present. Two folders for one name (``train/`` and
    ``Train/``) are an error: which one is meant is not ours to guess."""
    by_lower: dict[str, list[str]] = {}
    for name in names:
        by_lower.setdefault(name.lower(), []).append(name)
    found = {}
    for split, candidates in SPLIT_DIRS.items():
        for cand in candidates:
            hits = sorted(by_lower.get(cand, []))
            if len(hits) > 1:
                raise CnnBenchError(f"{where} has both {hits[0]}/ and {hits[1]}/; keep one")
            if hits:
                found[split] = hits[0]
                break
    return found


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

    splits = {k: root / v for k, v in split_folders(
        [e.name for e in os.scandir(root) if e.is_dir()], f"dataset.root {root}").items()}
    if "train" not in splits:
        if splits:
            other = next(iter(splits.values())).name
            raise CnnBenchError(f"dataset.root {root} has {other}/ but no train/; "
                                "add train/<class>/ folders")
        classes = find_classes(root)
        train, val = split_source(scan(root, classes, root), cfg["val_fraction"], cfg["split_seed"])
        return SplitSet(train, val, None, classes)

    train_dir = splits["train"]
    classes = find_classes(train_dir)
    train = scan(train_dir, classes, root)
    val_dir = splits.get("val")
    if val_dir is None:
        train, val = split_source(train, cfg["val_fraction"], cfg["split_seed"])
    else:
        check_same_classes(val_dir, find_classes(val_dir), classes)
        val = scan(val_dir, classes, root)
    test = None
    if "test" in splits:
        check_same_classes(splits["test"], find_classes(splits["test"]), classes)
        test = scan(splits["test"], classes, root)
    return SplitSet(train, val, test, classes)
