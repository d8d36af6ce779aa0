"""The in-memory path: decode a split once into uint8 [N,3,R,R], cache it on disk (see
``cache.py``), hold it on the device and take batches by index there.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from cnn_bench.data import workers
from cnn_bench.data.augment import BatchAugment
from cnn_bench.data.cache import cache_path, load_payload, save_payload
from cnn_bench.data.decode import try_decode
from cnn_bench.data.loader import EpochLoader
from cnn_bench.data.source import ImageSource

_DECODE_CHUNK = 256  # images per worker task: big enough to amortise IPC, small enough to balance
_MIN_PARALLEL = 1000  # below this many images, worker start-up costs more than it saves


class _DecodeItems(Dataset):
    """Sample i -> (i, uint8 [3,R,R] or None, failure reason); failures are data, not errors."""

    def __init__(self, source: ImageSource, resolution: int):
        self.source, self.resolution = source, resolution

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int):
        return (i, *try_decode(self.source, i, self.resolution))


def _collate(items):
    ok = [(i, img) for i, img, _ in items if img is not None]
    bad = [(i, why) for i, img, why in items if img is None]
    idx = torch.tensor([i for i, _ in ok], dtype=torch.int64)
    imgs = torch.stack([img for _, img in ok]) if ok else None
    return idx, imgs, bad


def decode_source(source: ImageSource, resolution: int, num_workers: int):
    """Decode every sample: (images uint8 [M,3,R,R], labels int64 [M], [(location, reason)])."""
    n = len(source)
    images = torch.empty((n, 3, resolution, resolution), dtype=torch.uint8)
    keep = torch.ones(n, dtype=torch.bool)
    failed: list[tuple[str, str]] = []
    batches = DataLoader(_DecodeItems(source, resolution), batch_size=_DECODE_CHUNK,
                         num_workers=num_workers if n >= _MIN_PARALLEL else 0, collate_fn=_collate)
    for idx, imgs, bad in workers.start(batches):
        if imgs is not None:
            images[idx] = imgs
        for i, why in bad:
            keep[i] = False
            failed.append((source.location(i), why))
    labels = source.labels.clone()
    if failed:
        images, labels = images[keep], labels[keep]
    return images, labels, failed


def load_split(source: ImageSource, resolution: int, *, dataset: str, split: str,
               cache_dir: Path | None, num_workers: int):
    """Decoded split from the disk cache, or decode it now and write the cache.

    Returns ``(images uint8 [M,3,R,R], labels int64 [M], [(location, reason)])`` on the CPU,
    where M excludes unreadable samples (they are listed with the reason instead).
    """
    path = None
    if cache_dir is not None:
        path = cache_path(cache_dir, dataset, split, f"{resolution}px", source, resolution)
    p = load_payload(path)
    if p is not None and {"images", "labels", "skipped", "reasons"} <= p.keys():
        return p["images"], p["labels"], list(zip(p["skipped"], p["reasons"]))
    images, labels, failed = decode_source(source, resolution, num_workers)
    save_payload({"images": images, "labels": labels,
                  "skipped": [loc for loc, _ in failed], "reasons": [why for _, why in failed]},
                 path)
    return images, labels, failed


def channel_stats(images: torch.Tensor, chunk: int = 4096):
    """Per-channel mean and std in [0, 1] units of a uint8 [N,3,H,W] tensor (float64 sums)."""
    total = torch.zeros(3, dtype=torch.float64, device=images.device)
    sq = torch.zeros_like(total)
    for start in range(0, len(images), chunk):
        x = images[start:start + chunk].to(torch.float64) / 255.0
        total += x.sum(dim=(0, 2, 3))
        sq += (x * x).sum(dim=(0, 2, 3))
    count = max(1, images.numel() // 3)
    mean = total / count
    std = (sq / count - mean * mean).clamp_min(1e-12).sqrt()
    return tuple(mean.tolist()), tuple(std.tolist())


class MemoryLoader(EpochLoader):
    """Batches of a split held on the device as uint8; augmentation runs on each batch there.

    The images are copied to the device once; an epoch costs one small host-to-device copy
    (the shuffled order) and no host syncs.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int, *,
                 shuffle: bool, augment: BatchAugment, device, seed: int, channels_last: bool):
        super().__init__(len(images), batch_size, shuffle=shuffle, augment=augment,
                         device=device, seed=seed, channels_last=channels_last)
        self.images = images.to(self.device)
        self.labels = labels.to(self.device)

    def __iter__(self):
        gen = self.augment_generator()
        flips = self.epoch_flips()
        order = self.schedule.order()
        if order is not None:
            if self.device.type == "cuda":
                order = order.pin_memory()
            order = order.to(self.device, non_blocking=True)
        for b in range(len(self)):
            ids = self.batch_ids(order, b)
            if order is None:
                x, y = self.images[ids], self.labels[ids]
            else:
                x, y = self.images.index_select(0, ids), self.labels.index_select(0, ids)
            yield self.finish(x, gen, None if flips is None else flips[ids]), y
