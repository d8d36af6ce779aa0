#!/usr/bin/env python
"""The hand-written baseline: a plain PyTorch training script on an ImageFolder.

What a careful person writes without a framework, doing the same work as a cnn_bench run with
``augmentation=none scheduler=cosine dataset.val_fraction=0``: the same model, epochs, batch,
SGD (Nesterov momentum, weight decay on weights only), per-step cosine lr to 0, no
augmentation, evaluation of the ``--val-split`` folder after every epoch, and the best model's
state dict saved (``best.pt``). Two data paths (``--loader``):

- ``folder``: torchvision ``ImageFolder`` + ``DataLoader`` (``--workers`` processes decode JPEGs
  every epoch), as the studies cnn_bench replaces did;
- ``tensor``: decode every image once (same DataLoader, ``--workers`` processes) into a uint8
  tensor on the device, optionally cached with ``torch.save`` (``--cache FILE``), then batches by
  shuffled index, normalised on the device - the same data path as cnn_bench's in-memory loader.

Results go to ``<out-dir>/result.json`` (final/best accuracy, training seconds, images/s).

Example::

    python benchmarks/handwritten.py --data /tmp/cifar --val-split test --model speednet_s \\
        --resolution 32 --epochs 2 --batch-size 128 --loader tensor --out-dir /tmp/hw
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

T_START = time.perf_counter()

if __package__ in (None, ""):  # run as a script: make `benchmarks` and `cnn_bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
from torch.utils.data import DataLoader
from torchvision import datasets, transforms

from benchmarks import common


def build_model(source: str, name: str, num_classes: int, resolution: int) -> torch.nn.Module:
    """The model: a cnn_bench zoo model built from its conf/model YAML (so it is exactly the
    network cnn_bench trains), or torchvision's / timm's by name."""
    if source == "torchvision":
        import torchvision

        return torchvision.models.get_model(name, weights=None, num_classes=num_classes)
    if source == "timm":
        import timm

        return timm.create_model(name, pretrained=False, num_classes=num_classes)
    from omegaconf import OmegaConf

    from cnn_bench.models.build import build_model as zoo_build

    return zoo_build(OmegaConf.load(common.REPO / "conf" / "model" / f"{name}.yaml"),
                     num_classes, resolution)


def folder_set(root: Path, resolution: int, to_float: bool, mean, std) -> datasets.ImageFolder:
    """torchvision's ImageFolder; shorter side resized to ``resolution``, centre-cropped square
    (what cnn_bench's decoder does), then float + normalise or kept uint8."""
    tail = [transforms.ToTensor(), transforms.Normalize(mean, std)] if to_float else [
        transforms.PILToTensor()]
    tf = transforms.Compose([transforms.Resize(resolution), transforms.CenterCrop(resolution), *tail])
    return datasets.ImageFolder(str(root), transform=tf)


def decode_all(ds: datasets.ImageFolder, resolution: int, workers: int):
    """Every image of an ImageFolder as uint8 [N,3,R,R] + int64 labels (decoded in parallel)."""
    images = torch.empty((len(ds), 3, resolution, resolution), dtype=torch.uint8)
    labels = torch.as_tensor(ds.targets, dtype=torch.int64)
    loader = DataLoader(ds, batch_size=256, num_workers=workers)
    at = 0
    for x, _ in loader:
        images[at:at + len(x)] = x
        at += len(x)
    return images, labels


def load_tensors(args, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Decoded split, from ``--cache`` when present (written on first use). The file name holds
    a hash of the file list and resolution, so other data never reads a stale cache."""
    ds = folder_set(args.data / split, args.resolution, False, None, None)
    cache = None
    if args.cache:
        key = hashlib.sha1(repr((ds.samples, args.resolution)).encode()).hexdigest()[:16]
        cache = Path(f"{args.cache}.{split}.{args.resolution}px.{key}.pt")
    if cache is not None and cache.exists():
        d = torch.load(cache, weights_only=True)
        return d["images"], d["labels"]
    images, labels = decode_all(ds, args.resolution, args.workers)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"images": images, "labels": labels}, cache)
    return images, labels


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--data", type=Path, required=True, help="ImageFolder root with train/ and the val split")
    p.add_argument("--val-split", default="test", help="folder evaluated after each epoch (test)")
    p.add_argument("--model", default="speednet_s", help="model name (speednet_s)")
    p.add_argument("--source", default="zoo", choices=["zoo", "torchvision", "timm"],
                   help="zoo = cnn_bench's conf/model/<model>.yaml; torchvision / timm by name")
    p.add_argument("--resolution", type=int, default=32, help="image side, px (32)")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.2, help="peak lr, cosine to 0 per step (0.2)")
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--weight-decay", type=float, default=5e-4, help="on weights only (5e-4)")
    p.add_argument("--loader", default="tensor", choices=["tensor", "folder"])
    p.add_argument("--workers", type=int, default=2, help="decode/loader processes (2)")
    p.add_argument("--cache", help="tensor loader: cache file prefix for the decoded splits")
    p.add_argument("--limit-train-batches", type=int, help="stop each epoch after N batches")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda (auto)")
    p.add_argument("--precision", default="auto", choices=["auto", *common.PRECISIONS],
                   help="auto = bf16 on CUDA (fp16 without bf16), fp32 on CPU")
    p.add_argument("--channels-last", default="auto", choices=["auto", "true", "false"],
                   help="auto = on for CUDA")
    p.add_argument("--mean", type=float, nargs=3, default=common.IMAGENET_MEAN)
    p.add_argument("--std", type=float, nargs=3, default=common.IMAGENET_STD)
    p.add_argument("--out-dir", type=Path, required=True, help="result.json and best.pt go here")
    args = p.parse_args(argv)

    device = common.pick_device(args.device)
    prec = args.precision
    if prec == "auto":
        prec = "fp32"
        if device.type == "cuda":  # native bf16 only (Ampere+): emulated is slower than fp16
            prec = "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp16"
    channels_last = device.type == "cuda" if args.channels_last == "auto" else args.channels_last == "true"
    if device.type == "cuda":  # the flags any tuned script sets (cnn_bench sets the same)
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    amp_dtype = common.PRECISIONS[prec]

    t0 = time.perf_counter()
    if args.loader == "tensor":
        tr_x, tr_y = (t.to(device) for t in load_tensors(args, "train"))
        va_x, va_y = (t.to(device) for t in load_tensors(args, args.val_split))
        num_classes = len(datasets.folder.find_classes(str(args.data / "train"))[0])
        norm = common.normalizer(args.mean, args.std, device)
        steps_per_epoch = len(tr_x) // args.batch_size

        def train_batches(epoch: int):
            g = torch.Generator().manual_seed(args.seed * 1000 + epoch)
            order = torch.randperm(len(tr_x), generator=g).to(device)
            return common.tensor_batches(tr_x, tr_y, args.batch_size, order=order, norm=norm,
                                         channels_last=channels_last, drop_last=True)

        def val_batches():
            return common.tensor_batches(va_x, va_y, args.batch_size, order=None, norm=norm,
                                         channels_last=channels_last, drop_last=False)
    else:
        train_set = folder_set(args.data / "train", args.resolution, True, args.mean, args.std)
        val_set = folder_set(args.data / args.val_split, args.resolution, True, args.mean, args.std)
        num_classes = len(train_set.classes)
        opts = {"batch_size": args.batch_size, "num_workers": args.workers,
                "pin_memory": device.type == "cuda", "persistent_workers": args.workers > 0}
        train_loader = DataLoader(train_set, shuffle=True, drop_last=True, **opts)
        val_loader = DataLoader(val_set, shuffle=False, **opts)
        steps_per_epoch = len(train_loader)

        def train_batches(epoch: int):
            return common.to_device(train_loader, device, channels_last)

        def val_batches():
            return common.to_device(val_loader, device, channels_last)
    data_s = time.perf_counter() - t0
    if args.limit_train_batches:
        steps_per_epoch = min(steps_per_epoch, args.limit_train_batches)

    fmt = torch.channels_last if channels_last else torch.contiguous_format
    # Seeded after the data is set up (DataLoader workers draw from the global RNG), so the
    # initial weights are the same whether the decoded data came from the cache or not.
    torch.manual_seed(args.seed)
    model = build_model(args.source, args.model, num_classes, args.resolution).to(device, memory_format=fmt)
    opt = common.plain_sgd(model, args.lr, args.momentum, args.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, steps_per_epoch * args.epochs))
    scaler = torch.amp.GradScaler(device.type) if prec == "fp16" else None

    history, best, train_s, images = [], -1.0, 0.0, 0
    args.out_dir.mkdir(parents=True, exist_ok=True)
    for epoch in range(args.epochs):
        tr = common.plain_train(model, opt, train_batches(epoch), device=device, amp_dtype=amp_dtype,
                                scaler=scaler, scheduler=sched, limit=steps_per_epoch)
        ev = common.plain_evaluate(model, val_batches(), device=device, amp_dtype=amp_dtype)
        train_s += tr["seconds"]
        images += tr["images"]
        history.append({"epoch": epoch + 1, "train_loss": tr["loss"], "val_acc": ev["acc"],
                        "val_loss": ev["loss"], "val_images": ev["images"],
                        "epoch_time_s": tr["seconds"]})
        print(f"epoch {epoch + 1}/{args.epochs}: train loss {tr['loss']:.4f}, {args.val_split} acc "
              f"{ev['acc']:.4f}, {tr['seconds']:.1f} s, {tr['images'] / tr['seconds']:.0f} img/s",
              flush=True)
        if ev["acc"] > best:
            best = ev["acc"]
            torch.save(model.state_dict(), args.out_dir / "best.pt")

    result = {"loader": args.loader, "model": args.model, "source": args.source,
              "device": str(device), "precision": prec, "epochs": args.epochs,
              "final_acc": history[-1]["val_acc"], "best_acc": best, "train_time_s": train_s,
              "train_images_per_s": images / max(train_s, 1e-9), "data_setup_s": data_s,
              "in_process_s": time.perf_counter() - T_START, "history": history}
    (args.out_dir / "result.json").write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
