"""``build_data``: dataset config + augmentation config -> ``DataBundle`` of device loaders."""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from cnn_bench.data.augment import BatchAugment
from cnn_bench.data.cache import default_cache_dir
from cnn_bench.data.loader import Loader
from cnn_bench.data.memory import MemoryLoader, channel_stats, load_split
from cnn_bench.data.registry import COMMON_KEYS, get_dataset
from cnn_bench.data.source import SplitSet, resolve
from cnn_bench.data.stream import StreamLoader, validate
from cnn_bench.errors import CnnBenchError, did_you_mean

# Used when neither the config nor the dataset knows its statistics and they cannot be
# measured cheaply (streaming path).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_DEFAULTS = {
    "root": None, "resolution": 32, "val_fraction": 0.1, "num_classes": None, "mean": None,
    "std": None, "in_memory": "auto", "max_memory_gb": 4.0, "cache_dir": None,
    "num_workers": 2, "split_seed": 0,
}


@dataclass
class DataBundle:
    """Everything the trainer needs from the data side.

    ``train`` yields augmented, normalised float32 [B,3,R,R] batches and int64 labels on the
    device; ``val``/``test`` only normalise (and are ``None`` when the dataset has no such split).
    ``skipped`` lists the files that could not be read (all named in one warning).
    """

    train: Loader
    val: Loader | None
    test: Loader | None
    classes: list[str]
    num_classes: int
    resolution: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    in_memory: bool
    skipped: list[str]


def _plain(cfg) -> dict:
    if cfg is None:
        return {}
    try:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(cfg, DictConfig):
            return OmegaConf.to_container(cfg, resolve=True)
    except ImportError:
        pass
    if isinstance(cfg, Mapping):
        return dict(cfg)
    raise TypeError(f"expected a mapping config, got {type(cfg).__name__}")


def _read_config(data_cfg):
    cfg = _plain(data_cfg)
    if not cfg.get("name"):
        raise CnnBenchError("dataset.name is missing (e.g. dataset=cifar10_mini)")
    builder = get_dataset(cfg["name"])
    allowed = COMMON_KEYS + getattr(builder, "options", ())
    for key in cfg:
        if key not in allowed:
            raise CnnBenchError(
                f"dataset '{cfg['name']}' has no option '{key}': {did_you_mean(key, allowed)}")
    cfg = {**_DEFAULTS, **cfg}
    mode = cfg["in_memory"]
    mode = {"auto": "auto", "true": True, "false": False}.get(str(mode).lower(), mode)
    if mode not in ("auto", True, False):
        raise CnnBenchError(f"dataset.in_memory must be auto, true or false, got {cfg['in_memory']!r}")
    cfg["in_memory"] = mode
    if not isinstance(cfg["resolution"], int) or cfg["resolution"] < 1:
        raise CnnBenchError(f"dataset.resolution must be a positive integer (px), got {cfg['resolution']!r}")
    return builder, cfg


def _check_num_classes(cfg: dict, classes: list[str]) -> None:
    want = cfg["num_classes"]
    if want is not None and int(want) != len(classes):
        shown = ", ".join(classes[:5]) + (", ..." if len(classes) > 5 else "")
        raise CnnBenchError(
            f"dataset.num_classes={want} but the data has {len(classes)} classes ({shown}); "
            f"set dataset.num_classes={len(classes)} or null"
        )


def _warn_skipped(failed: list[tuple[str, str]], root) -> None:
    base = str(root) if root else None

    def short(loc: str) -> str:
        if base and os.path.isabs(loc) and loc.startswith(base.rstrip(os.sep) + os.sep):
            return os.path.relpath(loc, base)
        return loc

    listed = ", ".join(f"{short(loc)} ({why})" for loc, why in failed)
    where = f" under {base}" if base else ""
    s = "s" if len(failed) != 1 else ""
    warnings.warn(f"skipped {len(failed)} unreadable file{s}{where}: {listed}", stacklevel=3)


def fits_on_device(decoded_bytes: int, max_memory_gb: float, device: torch.device) -> bool:
    """``in_memory: auto``: the decoded images fit ``max_memory_gb`` (GB, 1e9 bytes) and, on a
    GPU, half of its free memory (the rest is for the model's weights and activations; a
    raised ``max_memory_gb`` on a small GPU would otherwise end in an out-of-memory error)."""
    if decoded_bytes > max_memory_gb * 1e9:
        return False
    if device.type == "cuda":
        # blocks the caching allocator still holds (an earlier run in this process) count as free
        torch.cuda.empty_cache()
        free, _ = torch.cuda.mem_get_info(device)
        return decoded_bytes <= free / 2
    return True


def build_data(data_cfg, aug_cfg, *, batch_size: int, device: torch.device | str, seed: int,
               channels_last: bool = False, eval_batch_size: int | None = None,
               train_for_eval: bool = False) -> DataBundle:
    """Build train/val/test loaders for the ``dataset`` and ``augmentation`` configs.

    ``train_for_eval``: the train split is loaded like val/test (in order, every image, no
    augmentation), for scoring a model on its training images (``evaluate.py split=train``).

    Chooses the in-memory path (decode once, cache on disk, hold uint8 on ``device``) when the
    decoded splits fit ``dataset.max_memory_gb`` and ``dataset.in_memory`` allows, else streams
    through a DataLoader. Raises ``CnnBenchError`` (one line) for any user mistake.
    """
    builder, cfg = _read_config(data_cfg)
    device = torch.device(device)
    name, res = cfg["name"], cfg["resolution"]
    aug_opts = _plain(aug_cfg)
    BatchAugment.from_config(aug_opts, IMAGENET_MEAN, IMAGENET_STD, res)  # typos fail before decoding
    sets: SplitSet = builder(cfg)
    _check_num_classes(cfg, sets.classes)
    splits = sets.splits()

    decoded_bytes = sum(len(s) for s in splits.values()) * 3 * res * res
    in_memory = cfg["in_memory"]
    if in_memory == "auto":
        in_memory = fits_on_device(decoded_bytes, float(cfg["max_memory_gb"]), device)
    cache_dir = default_cache_dir(cfg["cache_dir"])
    workers = int(cfg["num_workers"])
    common = {"device": device, "seed": seed, "channels_last": channels_last}
    eval_bs = eval_batch_size or batch_size
    failed: list[tuple[str, str]] = []
    data = {}
    if in_memory:
        for split, source in splits.items():
            images, labels, bad = load_split(source, res, dataset=name, split=split,
                                             cache_dir=cache_dir, num_workers=workers)
            data[split] = (images, labels)
            failed += bad
            _check_some_readable(split, source, len(images), bad)
        mean, std = _stats(cfg, sets, data["train"][0])
    else:
        for split, source in splits.items():
            ok, bad = validate(source, dataset=name, split=split, cache_dir=cache_dir,
                               num_workers=workers)
            data[split] = ok
            failed += bad
            _check_some_readable(split, source, len(ok), bad)
        mean, std = _stats(cfg, sets, None)

    train_aug = BatchAugment.from_config(aug_opts, mean, std, res)
    eval_aug = BatchAugment.normalize_only(mean, std)
    loaders: dict[str, Loader] = {}
    for split, item in data.items():
        train = split == "train" and not train_for_eval
        opts = {"shuffle": train, "augment": train_aug if train else eval_aug, **common}
        bs = batch_size if train else eval_bs
        if in_memory:
            loaders[split] = MemoryLoader(item[0], item[1], bs, **opts)
        else:
            loaders[split] = StreamLoader(item, res, bs, num_workers=workers, **opts)

    if failed:
        _warn_skipped(failed, cfg["root"] and resolve(cfg["root"]))
    return DataBundle(
        train=loaders["train"], val=loaders.get("val"), test=loaders.get("test"),
        classes=list(sets.classes), num_classes=len(sets.classes), resolution=res,
        mean=mean, std=std, in_memory=bool(in_memory), skipped=[loc for loc, _ in failed],
    )


def _check_some_readable(split: str, source, kept: int, bad: list[tuple[str, str]]) -> None:
    # A split with no readable image would score 0/0: a val loss of 0.0 looks perfect to early
    # stopping and best.pt, where skipping a few files is only worth a warning.
    if len(source) and not kept:
        example = f" (e.g. {bad[0][0]}: {bad[0][1]})" if bad else ""
        raise CnnBenchError(f"none of the {len(source)} images of the {split} split is readable"
                            f"{example}; fix or replace them")


def _stats(cfg: dict, sets: SplitSet, train_images: torch.Tensor | None):
    """Config mean/std, else the dataset's known ones, else measured (in-memory) or ImageNet's."""
    if cfg["mean"] is not None and cfg["std"] is not None:
        return tuple(float(v) for v in cfg["mean"]), tuple(float(v) for v in cfg["std"])
    if sets.mean is not None and sets.std is not None:
        return sets.mean, sets.std
    if train_images is not None and len(train_images):
        return channel_stats(train_images)
    # The same command measures in memory and not here (in_memory=auto follows free memory):
    # say which normalisation this run got, and how to pin one.
    warnings.warn("dataset.mean/std are null and the data streams (too big to hold, or "
                  "in_memory=false): normalising with ImageNet's statistics instead of measured "
                  "ones; python -m cnn_bench.stats measures them to set in dataset.mean/std",
                  stacklevel=3)
    return IMAGENET_MEAN, IMAGENET_STD
