"""Decode any image to RGB uint8 and fit it to the run's resolution.

``decode_resized`` is the single decode+resize function shared by the in-memory and the
streaming path, so both see bit-identical pixels for the same file.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
import torch
import torchvision.io as tvio
import torchvision.transforms.v2.functional as TF
from PIL import Image, UnidentifiedImageError
from torchvision.datasets.folder import IMG_EXTENSIONS

__all__ = [
    "IMG_EXTENSIONS",
    "UnreadableImage",
    "decode_image",
    "decode_resized",
    "fit_resolution",
    "check_image",
]

# Formats libjpeg-turbo/libpng inside torchvision decode ~4x faster than PIL; the rest go to PIL.
_TV_MAGIC = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"RIFF", b"GIF8")


class UnreadableImage(Exception):
    """The bytes are not a decodable image; ``reason`` is a short phrase for the user."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def _reason(exc: BaseException) -> str:
    msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    if isinstance(exc, UnidentifiedImageError):
        return "not an image"
    if "truncat" in msg.lower():
        return "truncated"
    return f"corrupt: {msg[:60]}"


def _u16_to_u8(a: np.ndarray | torch.Tensor):
    """Map the full 16-bit range onto 8 bits (65535 -> 255) instead of clipping at 255."""
    if isinstance(a, torch.Tensor):
        return ((a.to(torch.int32).clamp(0, 65535) * 255 + 32767) // 65535).to(torch.uint8)
    return ((np.clip(a.astype(np.int64), 0, 65535) * 255 + 32767) // 65535).astype(np.uint8)


def _pil_to_rgb(im: Image.Image) -> np.ndarray:
    """Any PIL mode -> HxWx3 uint8 (first frame of animations; alpha dropped like torchvision)."""
    if im.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        # 'I' is how PIL opens most 16-bit greyscale files; treat it as 16-bit range.
        gray = _u16_to_u8(np.asarray(im))
        return np.repeat(gray[..., None], 3, axis=2)
    if im.mode == "F":
        a = np.asarray(im, dtype=np.float64)
        a = a * 255.0 if a.size and a.max() <= 1.0 else a  # float images are usually 0..1
        gray = np.clip(np.rint(a), 0, 255).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=2)
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")  # avoids PIL's palette-transparency warning
    return np.asarray(im.convert("RGB"))


def _decode_pil(data: bytes) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            rgb = _pil_to_rgb(im)
    return torch.tensor(rgb).permute(2, 0, 1).contiguous()  # copies: PIL arrays are read-only


def decode_image(data: bytes) -> torch.Tensor:
    """Decode image bytes of any format/mode to an RGB uint8 tensor [3,H,W].

    Greyscale, palette, RGBA, CMYK and 16-bit images are converted to 8-bit RGB.
    Raises ``UnreadableImage`` for empty, truncated or non-image data.
    """
    if not data:
        raise UnreadableImage("empty file")
    if data.startswith(_TV_MAGIC):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                buf = torch.frombuffer(bytearray(data), dtype=torch.uint8)
                img = tvio.decode_image(buf, mode=tvio.ImageReadMode.RGB)
            img = img[0] if img.dim() == 4 else img  # animated GIF: first frame, like PIL
            return _u16_to_u8(img) if img.dtype == torch.uint16 else img
        except Exception:  # noqa: BLE001 - PIL below either succeeds or names the problem
            pass
    try:
        return _decode_pil(data)
    except Exception as exc:  # noqa: BLE001 - any decoder failure means "unreadable"
        raise UnreadableImage(_reason(exc)) from None


def fit_resolution(img: torch.Tensor, resolution: int) -> torch.Tensor:
    """Resize the shorter side to ``resolution`` (antialiased) and center-crop a square.

    A square image already at ``resolution`` (CIFAR at 32 px) is returned unchanged.
    """
    h, w = img.shape[-2:]
    if h == w == resolution:
        return img.contiguous()
    if min(h, w) != resolution:
        img = TF.resize(img, resolution, antialias=True)
    return TF.center_crop(img, [resolution, resolution]).contiguous()


def decode_resized(raw: bytes | torch.Tensor, resolution: int) -> torch.Tensor:
    """Encoded bytes, or an already-decoded uint8 [3,H,W] tensor -> uint8 [3,R,R]."""
    img = raw if isinstance(raw, torch.Tensor) else decode_image(raw)
    return fit_resolution(img, resolution)


def try_decode(source, i: int, resolution: int) -> tuple[torch.Tensor | None, str]:
    """Decode sample ``i`` of an ``ImageSource``: (uint8 [3,R,R], "") or (None, the reason it is
    unreadable). Failures are data here; each caller decides whether to skip or stop."""
    try:
        return decode_resized(source.raw(i), resolution), ""
    except UnreadableImage as exc:
        return None, exc.reason
    except OSError as exc:
        return None, f"cannot open: {exc.strerror or exc}"


def check_image(source, i: int) -> str | None:
    """Cheap readability check of sample ``i`` of an ``ImageSource`` for up-front validation
    (a file or an archive member): ``None`` if fine, else the reason.

    JPEGs are decoded at 1/8 scale (PIL draft), which still walks the whole entropy-coded
    stream, so truncation is caught at a fraction of a full decode's cost.
    """
    try:
        data = source.raw(i)
    except OSError as exc:
        return f"cannot open: {exc.strerror or exc}"
    if isinstance(data, torch.Tensor):  # decoded pixels: nothing to read
        return None
    if not data:
        return "empty file"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data)) as im:
                if im.format == "JPEG":
                    im.draft(im.mode, (max(1, im.width // 8), max(1, im.height // 8)))
                im.load()
        return None
    except Exception:  # noqa: BLE001 - fall through to the decoder the loaders use
        pass
    try:
        decode_image(data)  # PIL may refuse a file torchvision reads; trust the real decoder
        return None
    except UnreadableImage as exc:
        return exc.reason
