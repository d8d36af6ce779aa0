"""Build the bundled ``cifar10_mini`` dataset from the full CIFAR-10 JPEG archive.

Selection is deterministic: for every class, the first ``--train`` files of ``train/<class>/``
and the first ``--test`` files of ``test/<class>/``, by sorted file name. The original JPEG bytes
are copied unchanged (no re-encoding) into an xz-compressed tar in ImageFolder layout
(``train/<class>/NNNN.jpg``, ``test/<class>/NNNN.jpg``). Tar headers are normalised (mtime 0,
uid/gid 0, mode 0644, sorted member order) so the same inputs give a byte-identical file.

    python scripts/build_cifar10_mini.py --src ../shared/data/cifar10-jpeg.tar.xz \
        --out cnn_bench/data/assets/cifar10_mini.tar.xz
"""

from __future__ import annotations

import argparse
import io
import lzma
import sys
import tarfile
from collections import defaultdict
from pathlib import Path

MAX_BYTES = 5 * 1024 * 1024  # the bundled asset must stay small enough to ship in the package


def select(src: Path, n_train: int, n_test: int) -> dict[str, bytes]:
    """Read the source archive once; return {member name: jpeg bytes} for the selected files."""
    by_dir: dict[tuple[str, str], dict[str, bytes]] = defaultdict(dict)
    with tarfile.open(src, "r:*") as tf:
        for m in tf:
            parts = m.name.strip("./").split("/")
            if not m.isfile() or len(parts) != 3 or parts[0] not in ("train", "test"):
                continue
            if not parts[2].lower().endswith((".jpg", ".jpeg")):
                continue
            # Keep all bytes of the directory for now: member order in the source is not sorted.
            by_dir[(parts[0], parts[1])][parts[2]] = tf.extractfile(m).read()
    classes = {split: sorted(c for s, c in by_dir if s == split) for split in ("train", "test")}
    if not classes["train"] or not classes["test"]:
        missing = [s for s in ("train", "test") if not classes[s]]
        sys.exit(f"error: {src} has no {' or '.join(f'{s}/<class>/*.jpg' for s in missing)} at its "
                 "top level (a folder wrapping train/ and test/?)")
    if classes["train"] != classes["test"]:
        sys.exit(f"error: train/ and test/ have other classes: {classes['train']} vs {classes['test']}")
    chosen: dict[str, bytes] = {}
    for (split, cls), files in sorted(by_dir.items()):
        n = n_train if split == "train" else n_test
        names = sorted(files)
        if len(names) < n:
            sys.exit(f"error: {split}/{cls} has only {len(names)} images, need {n}")
        for name in names[:n]:
            chosen[f"{split}/{cls}/{name}"] = files[name]
    return chosen


def write(files: dict[str, bytes], out: Path) -> int:
    """Write a reproducible xz tar of ``files``; return its size in bytes."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        for name in sorted(files):
            info = tarfile.TarInfo(name)
            info.size = len(files[name])
            info.mtime, info.uid, info.gid, info.mode = 0, 0, 0, 0o644
            info.uname = info.gname = ""
            tf.addfile(info, io.BytesIO(files[name]))
    # Extreme preset: many near-identical JPEG headers make a big dictionary/slow search pay off.
    data = lzma.compress(buf.getvalue(), format=lzma.FORMAT_XZ, preset=9 | lzma.PRESET_EXTREME)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(out)
    return len(data)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--src", type=Path, required=True, help="full CIFAR-10 JPEG tar(.xz)")
    p.add_argument("--out", type=Path, required=True, help="output .tar.xz")
    p.add_argument("--train", type=int, default=1000, help="train images per class")
    p.add_argument("--test", type=int, default=200, help="test images per class")
    args = p.parse_args(argv)
    if not args.src.is_file():
        sys.exit(f"error: source archive {args.src} not found")
    files = select(args.src, args.train, args.test)
    size = write(files, args.out)
    n_train = sum(k.startswith("train/") for k in files)
    print(f"wrote {args.out}: {size / 1e6:.2f} MB, {n_train} train + {len(files) - n_train} test images")
    if size > MAX_BYTES:
        sys.exit(f"error: {size} bytes exceeds the {MAX_BYTES}-byte budget; lower --train/--test")


if __name__ == "__main__":
    main()
