"""scripts/build_cifar10_mini.py on a generated archive: a reproducible asset, and one line (not
an empty asset with exit 0) for an archive it cannot use."""

from __future__ import annotations

import subprocess
import sys
import tarfile

import pytest

from conftest import ROOT
from datagen import make_imagefolder

SCRIPT = ROOT / "scripts" / "build_cifar10_mini.py"


def _archive(tmp_path, name: str, splits, wrap: str | None = None, classes=("a", "b")):
    root = make_imagefolder(tmp_path / name, classes=classes, per_class=3, size=(32, 32),
                            splits=splits)
    out = tmp_path / f"{name}.tar.xz"
    with tarfile.open(out, "w:xz") as tf:
        for split in splits:
            tf.add(root / split, arcname=f"{wrap}/{split}" if wrap else split)
    return out


def _build(src, out, *extra) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), "--src", str(src), "--out", str(out),
                           "--train", "2", "--test", "1", *extra],
                          capture_output=True, text=True, timeout=120)


def test_the_asset_is_reproducible_and_holds_the_selection(tmp_path):
    src = _archive(tmp_path, "ok", ("train", "test"))
    first = _build(src, tmp_path / "a.tar.xz")
    assert _build(src, tmp_path / "b.tar.xz").returncode == 0
    assert first.returncode == 0 and "4 train + 2 test images" in first.stdout, first.stderr
    assert (tmp_path / "a.tar.xz").read_bytes() == (tmp_path / "b.tar.xz").read_bytes()
    with tarfile.open(tmp_path / "a.tar.xz") as tf:
        names = tf.getnames()
    assert names == sorted(names) and len(names) == 6 and all(n.endswith(".jpg") for n in names)


@pytest.mark.parametrize("case, message", [
    ("wrapped", "has no train/<class>/*.jpg or test/<class>/*.jpg at its top level"),
    ("no_test", "has no test/<class>/*.jpg at its top level"),
    ("other_classes", "train/ and test/ have other classes"),
])
def test_an_unusable_archive_is_one_line(tmp_path, case, message):
    # A wrapped archive gave "0 train + 0 test images" and exit 0: an empty asset.
    if case == "wrapped":
        src = _archive(tmp_path, case, ("train", "test"), wrap="cifar10")
    elif case == "no_test":
        src = _archive(tmp_path, case, ("train",))
    else:
        root = make_imagefolder(tmp_path / "both", classes=("a", "b"), per_class=3,
                                size=(32, 32), splits=("train",))
        make_imagefolder(root, classes=("a", "z"), per_class=3, size=(32, 32), splits=("test",))
        src = tmp_path / "both.tar.xz"
        with tarfile.open(src, "w:xz") as tf:
            for split in ("train", "test"):
                tf.add(root / split, arcname=split)
    proc = _build(src, tmp_path / "out.tar.xz")
    assert proc.returncode != 0 and message in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and not (tmp_path / "out.tar.xz").exists()
