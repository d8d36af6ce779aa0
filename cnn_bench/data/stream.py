"""The streaming path for data too big to hold: a ``DataLoader`` decodes uint8 [3,R,R] images in
worker processes; batches go to the device with ``non_blocking=True`` and get the same batch
augmentation as the in-memory path there.

Encoded images (files, archive members) are validated up front (in parallel, result cached), so
a worker never meets an unreadable image; if one still fails (a file changed during the run),
the run ends with one line.
"""

from __future__ import annotations

import itertools
import signal
import threading
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

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
        workers = num_workers if len(source) >= _MIN_PARALLEL else 0
        checks = DataLoader(_CheckFiles(source), batch_size=_CHECK_CHUNK,
                            num_workers=workers, collate_fn=_as_list)
        bad = {i: why for chunk in checks for i, why in chunk if why}
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


def worker_failure(exc: BaseException) -> str | None:
    """One line for a data worker that died (killed, often by the out-of-memory killer) or ran
    out of shared memory; ``None`` for any other error."""
    text = str(exc).strip()
    if "shared memory" in text or "/dev/shm" in text:
        return ("the data-loading workers ran out of shared memory (/dev/shm; Docker gives 64 MB "
                "unless started with --shm-size): enlarge it, or lower trainer.batch_size or "
                "dataset.num_workers (0 decodes in the main process); resume with "
                "trainer.resume=auto")
    if text.startswith("DataLoader worker (pid"):
        first = text.splitlines()[0].rstrip(". ")
        return (f"{first} (often the system's out-of-memory killer): lower dataset.num_workers "
                "or trainer.batch_size, or free memory; resume with trainer.resume=auto")
    return None


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
        batches = self._start()
        for b in itertools.count():
            try:
                x, y = next(batches)
            except StopIteration:
                return
            except CnnBenchError as exc:
                self._stop_workers()
                raise CnnBenchError(_one_line(exc)) from None
            except (RuntimeError, OSError) as exc:
                why = worker_failure(exc)
                if why is None:
                    raise
                self._stop_workers()
                raise CnnBenchError(why) from None
            x = x.to(self.device, non_blocking=True)
            y = y.to(self.device, non_blocking=True)
            flip = None if flips is None else flips[self.batch_ids(order, b)]
            yield self.finish(x, gen, flip), y

    def _start(self):
        """``iter(self.loader)``, with a Ctrl-C that arrives while it forks the workers held
        until they are up: raised inside an at-fork hook (logging's), Python prints it as
        "Exception ignored" and the run went on."""
        if (self.loader.num_workers == 0 or self.loader._iterator is not None
                or threading.current_thread() is not threading.main_thread()):
            return iter(self.loader)  # no fork: workers absent, or persistent and running
        caught = []
        previous = signal.signal(signal.SIGINT, lambda *_: caught.append(True))
        try:
            batches = iter(self.loader)
        finally:
            signal.signal(signal.SIGINT, previous)
        if caught:
            raise KeyboardInterrupt
        return batches

    def _stop_workers(self) -> None:
        """Shut the workers down now: left to the garbage collector (the traceback keeps this
        frame alive), each takes a 5 s join timeout."""
        it = getattr(self.loader, "_iterator", None)
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()
        self.loader._iterator = None
