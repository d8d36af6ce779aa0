"""What the in-memory and streaming loaders share: the ``Loader`` protocol, epoch-seeded
shuffling and augmentation randomness, batch counting, and the per-batch finish step.

Everything random in an epoch is drawn from generators seeded by ``(seed, epoch)`` only, so a
run resumed at epoch k sees exactly the batches of an uninterrupted run, and both paths give the
same batches for the same data (the order is drawn on the CPU, augmentation on the device).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator
from typing import Protocol, runtime_checkable

import torch

from cnn_bench.data.augment import BatchAugment

_ORDER_STREAM, _AUGMENT_STREAM, _FLIP_STREAM = 0, 1, 2


@runtime_checkable
class Loader(Protocol):
    """Yields ``(x, y)`` on the device: x float32 [B,3,R,R] normalised, y int64 [B]."""

    num_samples: int

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]: ...

    def __len__(self) -> int: ...

    def set_epoch(self, epoch: int) -> None: ...


def derive_seed(seed: int, epoch: int, stream: int) -> int:
    """A 63-bit seed that depends only on its arguments (not on Python's hash salt)."""
    h = hashlib.sha256(f"{int(seed)}:{int(epoch)}:{int(stream)}".encode()).digest()
    return int.from_bytes(h[:8], "little") >> 1


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The sample order of a shuffled epoch: an int64 CPU permutation of ``range(n)``."""
    g = torch.Generator().manual_seed(derive_seed(seed, epoch, _ORDER_STREAM))
    return torch.randperm(n, generator=g)


class EpochSchedule:
    """Which samples form each batch of an epoch; also the streaming path's batch sampler.

    Kept separate from the loaders so a DataLoader holding it as ``batch_sampler`` forms no
    reference cycle with its owner (a cycle delays worker shutdown by 5 s per worker).
    Train schedules (``shuffle=True``) drop the last partial batch when at least one full batch
    exists, so every step sees the same batch size; eval schedules keep order and every sample.
    """

    def __init__(self, num_samples: int, batch_size: int, *, shuffle: bool, seed: int):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.num_samples = int(num_samples)
        self.batch_size = int(batch_size)
        self.shuffle = shuffle
        self.drop_last = shuffle and num_samples >= batch_size
        self.seed = int(seed)
        self.epoch = 0

    def __len__(self) -> int:
        if self.drop_last:
            return self.num_samples // self.batch_size
        return math.ceil(self.num_samples / self.batch_size)

    def order(self) -> torch.Tensor | None:
        """This epoch's CPU sample order, or ``None`` for the natural order (eval)."""
        return epoch_order(self.num_samples, self.seed, self.epoch) if self.shuffle else None

    def __iter__(self) -> Iterator[list[int]]:
        order = self.order()
        idx = order.tolist() if order is not None else range(self.num_samples)
        for b in range(len(self)):
            yield list(idx[b * self.batch_size:(b + 1) * self.batch_size])


class EpochLoader:
    """Base for both loaders: epoch state, batch counting and the on-device finish step."""

    def __init__(self, num_samples: int, batch_size: int, *, shuffle: bool, augment: BatchAugment,
                 device: torch.device, seed: int, channels_last: bool):
        self.schedule = EpochSchedule(num_samples, batch_size, shuffle=shuffle, seed=seed)
        self.num_samples = self.schedule.num_samples
        self.batch_size = self.schedule.batch_size
        self.augment = augment
        self.device = torch.device(device)
        self.seed = int(seed)
        self.channels_last = channels_last
        self._flip_half: torch.Tensor | None = None

    @property
    def epoch(self) -> int:
        return self.schedule.epoch

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order and augmentation the next iteration reproduces."""
        self.schedule.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.schedule)

    def augment_generator(self) -> torch.Generator:
        """A fresh generator on the device for this epoch's augmentation draws."""
        g = torch.Generator(device=self.device)
        g.manual_seed(derive_seed(self.seed, self.epoch, _AUGMENT_STREAM))
        return g

    def epoch_flips(self) -> torch.Tensor | None:
        """With ``augment.hflip_alternate``: bool [num_samples] on the device, which samples
        this epoch flips - a fixed random half (seeded by ``seed`` alone) in even epochs, the
        other half in odd ones. ``None`` otherwise (the augmentation draws its own flips)."""
        if not self.augment.hflip_alternate:
            return None
        if self._flip_half is None:
            g = torch.Generator().manual_seed(derive_seed(self.seed, 0, _FLIP_STREAM))
            half = torch.rand(self.num_samples, generator=g) < 0.5
            self._flip_half = half.to(self.device)
        return self._flip_half ^ bool(self.epoch % 2)

    def batch_ids(self, order: torch.Tensor | None, b: int) -> torch.Tensor | slice:
        """The samples of batch ``b``: a slice of ``order`` (the device copy), or of the natural
        order when ``order`` is ``None``."""
        part = slice(b * self.batch_size, (b + 1) * self.batch_size)
        return part if order is None else order[part]

    def finish(self, x: torch.Tensor, gen: torch.Generator,
               flip: torch.Tensor | None = None) -> torch.Tensor:
        """uint8 batch on the device -> augmented, normalised float32 in the requested layout;
        ``flip``: this batch's flip decisions (see :meth:`epoch_flips`)."""
        x = self.augment(x, gen, flip)
        if self.channels_last:
            return x.contiguous(memory_format=torch.channels_last)
        return x.contiguous()
