"""The streaming path for data too big to hold: a ``DataLoader`` decodes uint8 [3,R,R] images in
worker processes; batches go to the device with ``non_blocking=True`` and get the same batch
augmentation as the in-memory path there.

Encoded images (files, archive members) are validated up front (in parallel, result cached), so
a worker never meets an unreadable image; if one still fails (a file changed during the run),
the run ends with one line.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from cnn_bench.data import workers
from cnn_bench.data.augment import BatchAugment
from cnn_bench.data.cache import cache_path, load_payload, save_payload
from cnn_bench.data.decode import check_image, try_decode
from cnn_bench.data.loader import EpochLoader
from cnn_bench.data.source import ImageSource
from cnn_bench.errors import CnnBenchError

_CHECK_CHUNK = 64  # files per worker task during validation
_MIN_PARALLEL = 1000  # below this many files, worker start-up costs more than it saves


class _CheckFiles(Dataset):
    def __init__(self, source: ImageSource):
        self.source = source

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int) -> tuple[int, str]:
        return i, check_image(self.source, i) or ""


def _as_list(items):
    return items


def validate(source: ImageSource, *, dataset: str, split: str, cache_dir: Path | None,
             num_workers: int) -> tuple[ImageSource, list[tuple[str, str]]]:
    """(readable subset of ``source``, [(location, reason)] of the rest), cached per fingerprint."""
    if not source.needs_validation:
        return source, []
    path = cache_path(cache_dir, dataset, split, "check", source) if cache_dir else None
    p = load_payload(path)
    if p is not None and {"bad", "reasons"} <= p.keys():
        bad = dict(zip(p["bad"], p["reasons"]))
    else:
        n_workers = num_workers if len(source) >= _MIN_PARALLEL else 0
        checks = DataLoader(_CheckFiles(source), batch_size=_CHECK_CHUNK,
                            num_workers=n_workers, collate_fn=_as_list)
        bad = {i: why for chunk in workers.start(checks) for i, why in chunk if why}
        save_payload({"bad": sorted(bad), "reasons": [bad[i] for i in sorted(bad)]}, path)
    if not bad:
        return source, []
    failed = [(source.location(i), bad[i]) for i in sorted(bad)]
    return source.subset(i for i in range(len(source)) if i not in bad), failed


class _Decoded(Dataset):
    """Sample i -> (uint8 [3,R,R], label) through the same ``decode_resized`` as the cache."""

    def __init__(self, source: ImageSource, resolution: int):
        self.source, self.resolution = source, resolution

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int):
        img, why = try_decode(self.source, i, self.resolution)
        if img is None:
            raise CnnBenchError(
                f"{self.source.location(i)} became unreadable during the run ({why}); "
                "fix or remove it and run again"
            ) from None
        return img, self.source.labels[i]


def _one_line(exc: CnnBenchError) -> str:
    """A worker's CnnBenchError arrives wrapped with its traceback; keep only our message."""
    last = str(exc).strip().splitlines()[-1] if str(exc).strip() else ""
    _, sep, msg = last.partition("CnnBenchError: ")
    return msg if sep else last


class StreamLoader(EpochLoader):
    """Decodes in ``num_workers`` persistent worker processes (pinned memory on CUDA)."""

    def __init__(self, source: ImageSource, resolution: int, batch_size: int, *, shuffle: bool,
                 augment: BatchAugment, device, seed: int, channels_last: bool, num_workers: int):
        super().__init__(len(source), batch_size, shuffle=shuffle, augment=augment,
                         device=device, seed=seed, channels_last=channels_last)
        self.loader = DataLoader(
            _Decoded(source, resolution),
            batch_sampler=self.schedule,
            num_workers=num_workers,
            pin_memory=self.device.type == "cuda",
            persistent_workers=num_workers > 0,
            # Its own generator: each iterator draws the workers' base seed from it, otherwise
            # from the global RNG, shifting dropout's CPU masks by how often iterators start
            # (per epoch with 0 workers, per attempt with persistent ones, never in memory).
            generator=torch.Generator().manual_seed(seed),
        )

    def __iter__(self):
        gen = self.augment_generator()
        flips = self.epoch_flips()
        # The schedule is the DataLoader's batch sampler: batch b holds the same samples here.
        order = self.schedule.order() if flips is not None else None
        if order is not None:
            order = order.to(self.device)
        batches = workers.start(self.loader)
        for b in itertools.count():
            try:
                x, y = next(batches)
            except StopIteration:
                return
            except CnnBenchError as exc:
                self._stop_workers()
                raise CnnBenchError(_one_line(exc)) from None
            except (RuntimeError, OSError) as exc:
                why = workers.worker_failure(exc)
                if why is None:
                    raise
                self._stop_workers()
                raise CnnBenchError(why) from None
            x = x.to(self.device, non_blocking=True)
            y = y.to(self.device, non_blocking=True)
            flip = None if flips is None else flips[self.batch_ids(order, b)]
            yield self.finish(x, gen, flip), y

    def _stop_workers(self) -> None:
        """Shut the workers down now: left to the garbage collector (the traceback keeps this
        frame alive), each takes a 5 s join timeout."""
        it = getattr(self.loader, "_iterator", None)
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()
        self.loader._iterator = None
