"""The on-disk cache shared by the in-memory path (decoded splits) and the streaming path
(validation results).

Files are ``<cache_dir>/<dataset>-<split>-<kind>-<key>.pt`` where the key hashes the source's
fingerprint (paths + sizes + mtimes + ctimes, or the archive's hash, plus the split's sample
list) and whatever else shapes the content (the resolution; the torch, torchvision and Pillow
versions), so changed files or decoders get a new key. Payloads are plain tensors and lists,
written with ``torch.save`` and read with ``weights_only=True``. Old files are never deleted
automatically; remove the folder to reclaim space.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch

from cnn_bench.checkpoint import atomic_write
from cnn_bench.data.source import ImageSource, digest

# Bump when decode/resize/validation output changes, so stale caches are not reused.
# 2: archive roots follow links, nested folders and any compression (1 decoded .tar.gz as junk).
CACHE_VERSION = 2


def default_cache_dir(configured: str | None) -> Path:
    """``dataset.cache_dir``, else ``$CNN_BENCH_CACHE``, else ``~/.cache/cnn_bench``."""
    path = configured or os.environ.get("CNN_BENCH_CACHE") or "~/.cache/cnn_bench"
    return Path(path).expanduser()


def cache_path(cache_dir: Path, dataset: str, split: str, kind: str, source: ImageSource,
               *extra) -> Path:
    """Where the ``kind`` payload (e.g. ``32px``, ``check``) of this exact split lives."""
    key = digest(CACHE_VERSION, _pixel_libraries(), kind, source.fingerprint, *extra)[:20]
    return cache_dir / f"{dataset}-{split}-{kind}-{key}.pt"


def _pixel_libraries() -> str:
    """The versions that decide decoded pixels (decoders in Pillow and torchvision, resizing in
    torch): an upgrade decodes again rather than serve pixels the streaming path would not."""
    import PIL
    import torchvision

    return f"torch {torch.__version__} torchvision {torchvision.__version__} Pillow {PIL.__version__}"


def load_payload(path: Path | None) -> dict | None:
    """The cached dict, or ``None`` if absent or unreadable (a damaged cache is rebuilt)."""
    if path is None or not path.is_file():
        return None
    try:
        payload = torch.load(path, weights_only=True)
    except Exception:  # noqa: BLE001 - never fatal: the caller recomputes
        return None
    return payload if isinstance(payload, dict) else None


def save_payload(payload: dict, path: Path | None) -> None:
    """Write via a temp file in the same folder + ``os.replace``: readers never see half a file.

    An unwritable cache only costs recomputation next run, so it warns instead of failing.
    """
    if path is None:
        return
    try:
        atomic_write(path, lambda f: torch.save(payload, f))
    # torch.save reports a full disk (ENOSPC, EFBIG) as RuntimeError, not OSError
    except (OSError, RuntimeError) as exc:
        warnings.warn(f"could not write the dataset cache {path} ({exc}); "
                      "it will be recomputed next run", stacklevel=3)
