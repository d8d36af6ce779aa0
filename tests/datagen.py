"""Synthetic image folders for tests: learnable classes, odd image modes, broken files.

Images of class k share a base colour and a stripe orientation, plus per-image noise, so even a
tiny model separates them in a few steps. Everything is deterministic for a given seed.
"""

from __future__ import annotations

import colorsys
import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image


def class_image(k: int, n_classes: int, size: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """HxWx3 uint8 image for class ``k``: class colour + class stripes + noise.

    ``size`` is (width, height) like PIL.
    """
    w, h = size
    r, g, b = colorsys.hsv_to_rgb(k / max(1, n_classes), 0.8, 0.9)
    base = np.array([r, g, b]) * 255.0
    yy, xx = np.mgrid[0:h, 0:w]
    angle = np.pi * k / max(1, n_classes)
    stripes = np.sin((xx * np.cos(angle) + yy * np.sin(angle)) * 0.8)[..., None] * 30.0
    noise = rng.normal(0.0, 12.0, size=(h, w, 3))
    return np.clip(base + stripes + noise, 0, 255).astype(np.uint8)


def make_imagefolder(root, classes: Sequence[str] = ("a", "b", "c"), per_class: int = 8,
                     size: tuple[int, int] = (20, 28), splits: Sequence[str] | None = ("train", "val"),
                     seed: int = 0) -> Path:
    """Write ``root/<split>/<class>/NNN.{jpg,png}`` (alternating formats) and return ``root``.

    ``splits=None`` or ``()`` writes a single folder of class folders (``root/<class>/...``).
    ``size`` is (width, height) in px; images are not square on purpose.
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    for split in (splits or [None]):
        base = root / split if split else root
        for k, cls in enumerate(classes):
            d = base / cls
            d.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                img = Image.fromarray(class_image(k, len(classes), size, rng))
                if i % 2 == 0:
                    img.save(d / f"{i:03d}.jpg", quality=95)
                else:
                    img.save(d / f"{i:03d}.png")
    return root


def add_broken_files(class_dir) -> list[Path]:
    """Add a truncated JPEG, a zero-byte .jpg and a text file named .jpg; return their paths."""
    d = Path(class_dir)
    d.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    Image.fromarray(class_image(0, 3, (24, 24), np.random.default_rng(1))).save(buf, "JPEG")
    data = buf.getvalue()
    truncated, empty, text = d / "truncated.jpg", d / "empty.jpg", d / "text.jpg"
    truncated.write_bytes(data[: len(data) // 2])
    empty.write_bytes(b"")
    text.write_text("this is not an image\n")
    return [truncated, empty, text]


def add_odd_mode_images(class_dir, size: tuple[int, int] = (20, 28)) -> dict[str, Path]:
    """Add CMYK, RGBA, 16-bit greyscale (PNG and TIFF), palette, greyscale and 1-bit images,
    plus a ``notes.txt`` that must be ignored by extension. Returns {mode label: path}.

    The 16-bit images hold 128 * 257 everywhere, which must decode to 128 (not clip to 255).
    """
    d = Path(class_dir)
    d.mkdir(parents=True, exist_ok=True)
    w, h = size
    rgb = Image.fromarray(class_image(1, 3, size, np.random.default_rng(2)))
    gray16 = Image.fromarray(np.full((h, w), 128 * 257, dtype=np.uint16))
    files = {
        "CMYK": (rgb.convert("CMYK"), "cmyk.jpg"),
        "RGBA": (rgb.convert("RGBA"), "rgba.png"),
        "I;16": (gray16, "gray16.png"),
        "I;16-tiff": (gray16, "gray16.tif"),
        "P": (rgb.convert("P"), "palette.png"),
        "L": (rgb.convert("L"), "gray.jpg"),
        "1": (rgb.convert("1"), "bilevel.bmp"),
    }
    out = {}
    for label, (img, name) in files.items():
        img.save(d / name)
        out[label] = d / name
    (d / "notes.txt").write_text("not an image; ignored by extension\n")
    return out


def add_problem_files(class_dir, size: tuple[int, int] = (20, 28)):
    """Both of the above: ``(broken paths, {mode: path})``."""
    return add_broken_files(class_dir), add_odd_mode_images(class_dir, size)


def direct_stats(train_dir, resolution: int) -> tuple[list[float], list[float]]:
    """Per-channel mean/std of every train image: PIL decode, shorter side -> resolution
    (antialiased), centre crop, [0, 1] units, float64."""
    import torch
    import torchvision.transforms.v2.functional as TF

    imgs = []
    for path in sorted(p for p in train_dir.rglob("*") if p.suffix in (".jpg", ".png")):
        with Image.open(path) as im:
            t = TF.pil_to_tensor(im.convert("RGB"))
        t = TF.center_crop(TF.resize(t, [resolution], antialias=True), [resolution, resolution])
        imgs.append(t.double() / 255)
    x = torch.stack(imgs)
    return x.mean(dim=(0, 2, 3)).tolist(), x.std(dim=(0, 2, 3), unbiased=False).tolist()
