#!/usr/bin/env python
"""The airbench94 speedrun itself (PyPI ``airbench`` 0.1.8, Keller Jordan) on an ImageFolder
copy of CIFAR-10: the peer ``cifar10_speedrun`` is measured against, on the same data.

Not a cnn_bench dependency: ``pip install airbench==0.1.8`` where you run this. The images are
decoded once into airbench's own file format (``<workdir>/cifar10/{train,test}.pt``: uint8
NHWC images, labels, classes). On CUDA the published ``airbench.train94`` runs unchanged (fp16,
channels_last). On a CPU it cannot (it times with CUDA events and casts to fp16 on the GPU), so
the same recipe runs in fp32 from airbench's own pieces - its network modules, data loader,
whitening init, Lookahead and hyperparameters - in the order its ``train`` uses them.

Prints, and with ``--out`` writes, one markdown row per seed: test accuracy without TTA, with
flip TTA and with airbench's flip + translate TTA (its default), and the seconds. On CUDA they
are airbench's own figure, as its published 3.09 s: its CUDA-event timer over the whitening
init, the training epochs and one final TTA evaluation, after its warm-up run (cuDNN autotuning
untimed), read from the table ``train94`` prints. On CPU: whitening init + training, wall clock.

    python benchmarks/airbench_ref.py --data /tmp/cifar --seeds 0
    python benchmarks/airbench_ref.py --data /tmp/cifar --smoke    # 3 steps on 512 images per split
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
import tempfile
import time
from math import ceil
from pathlib import Path

import numpy as np
import torch
from torch import nn

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import common


def _airbench():
    try:
        import airbench.lib_airbench94 as a94
        import airbench.utils as utils
    except ImportError:
        sys.exit("airbench_ref.py needs airbench: pip install airbench==0.1.8")
    return a94, utils


def write_airbench_files(root: Path, dest: Path, limit: int | None = None) -> Path:
    """Decode ``root/{train,test}/<class>/*`` into airbench's ``{train,test}.pt`` under ``dest``
    (kept: later calls on the same ``root`` and ``limit`` reuse them). ``limit`` keeps that many
    images per split (smoke runs)."""
    from PIL import Image

    dest.mkdir(parents=True, exist_ok=True)
    stamp = dest / "source.json"
    want = {"root": str(Path(root).resolve()), "limit": limit}
    if stamp.exists() and json.loads(stamp.read_text()) == want \
            and all((dest / f"{s}.pt").exists() for s in ("train", "test")):
        return dest
    stamp.unlink(missing_ok=True)  # written last: a cut-short decode is redone
    for split in ("train", "test"):
        path = dest / f"{split}.pt"
        classes = sorted(p.name for p in (root / split).iterdir() if p.is_dir())
        files = [(f, i) for i, c in enumerate(classes) for f in sorted((root / split / c).iterdir())]
        if limit is not None:
            files = files[:: max(1, len(files) // limit)][:limit]
        if split == "train":
            # airbench whitens from images[:5000]; in class order those are all airplanes.
            # torchvision's CIFAR-10 order mixes the classes: so does a fixed shuffle.
            perm = torch.randperm(len(files), generator=torch.Generator().manual_seed(0))
            files = [files[i] for i in perm.tolist()]
        images = [np.asarray(Image.open(f).convert("RGB")) for f, _ in files]
        if any(im.shape != (32, 32, 3) for im in images):
            sys.exit(f"airbench_ref.py: {root / split} must hold 32x32 images (CIFAR-10)")
        images = np.stack(images)
        torch.save({"images": torch.from_numpy(images),
                    "labels": torch.tensor([i for _, i in files]), "classes": classes}, path)
    stamp.write_text(json.dumps(want))
    return dest


def _cpu_net(a94) -> nn.Module:
    """``make_net94``'s network in fp32 on the CPU (it hard-codes ``.half().cuda()``)."""
    w, m = a94.hyp["net"]["widths"], a94.hyp["net"]["batchnorm_momentum"]
    net = nn.Sequential(
        a94.Conv(3, 24, 2, padding=0, bias=True), nn.GELU(),
        a94.ConvGroup(24, w["block1"], m), a94.ConvGroup(w["block1"], w["block2"], m),
        a94.ConvGroup(w["block2"], w["block3"], m), nn.MaxPool2d(3), a94.Flatten(),
        nn.Linear(w["block3"], 10, bias=False), a94.Mul(a94.hyp["net"]["scaling_factor"]))
    net[0].weight.requires_grad = False
    return net


def _cpu_loader(utils, data: dict, train: bool, batch_size: int, aug: dict | None = None):
    """airbench's ``CifarLoader`` over tensors in fp32 on the CPU (its constructor loads to a
    GPU in fp16); iteration, augmentation and alternating flips are airbench's own code."""
    import torchvision.transforms as T

    loader = utils.CifarLoader.__new__(utils.CifarLoader)
    object.__setattr__(loader, "epoch", 0)
    loader.images = (data["images"].float() / 255).permute(0, 3, 1, 2).contiguous()
    loader.labels, loader.classes = data["labels"], data["classes"]
    loader.normalize = T.Normalize(utils.CIFAR_MEAN, utils.CIFAR_STD)
    loader.proc_images, loader.aug = {}, aug or {}
    loader.batch_size, loader.drop_last, loader.shuffle, loader.altflip = batch_size, train, train, train
    return loader


def train_cpu(files: Path, epochs: float, batch_size: int, steps: int | None = None):
    """airbench94's ``train`` in fp32 on the CPU; returns (model, test loader, train seconds)."""
    a94, utils = _airbench()
    h = a94.hyp["opt"]
    train_loader = _cpu_loader(utils, torch.load(files / "train.pt"), True, batch_size, a94.hyp["aug"])
    test_loader = _cpu_loader(utils, torch.load(files / "test.pt"), False, 2000)
    # airbench's units: lr per 1024 images, decoupled from momentum; decay decoupled from the lr.
    kilostep_scale = 1024 * (1 + 1 / (1 - h["momentum"]))
    lr = h["lr"] / kilostep_scale
    wd = h["weight_decay"] * batch_size / kilostep_scale
    lr_biases = lr * h["bias_scaler"]
    loss_fn = nn.CrossEntropyLoss(label_smoothing=h["label_smoothing"], reduction="none")
    if len(train_loader) == 0:
        sys.exit(f"airbench_ref.py: fewer training images than one batch of {batch_size}")
    total = steps or ceil(len(train_loader) * epochs)
    model = _cpu_net(a94)
    norm_biases = [p for k, p in model.named_parameters() if "norm" in k and p.requires_grad]
    other = [p for k, p in model.named_parameters() if "norm" not in k and p.requires_grad]
    opt = torch.optim.SGD([dict(params=norm_biases, lr=lr_biases, weight_decay=wd / lr_biases),
                           dict(params=other, lr=lr, weight_decay=wd / lr)],
                          momentum=h["momentum"], nesterov=True)
    # airbench 0.1.8's triangle: 0.2x -> 1x at 23% of the steps -> 0.07x at the end.
    sched = np.interp(np.arange(total + 1), [0, int(0.23 * total), total], [0.2, 1.0, 0.07])
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: float(sched[i]))
    alpha = 0.95 ** 5 * (torch.arange(total + 1) / total) ** 3
    lookahead = utils.LookaheadState(model)
    t0 = time.perf_counter()
    utils.init_whitening_conv(model[0], train_loader.normalize(train_loader.images[:5000]))
    step = 0
    for epoch in range(ceil(total / max(1, len(train_loader)))):
        model[0].bias.requires_grad = epoch < h["whiten_bias_epochs"]
        model.train()
        for x, y in train_loader:
            loss = loss_fn(model(x), y).sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            scheduler.step()
            step += 1
            if step % 5 == 0:
                lookahead.update(model, decay=alpha[step].item())
            if step >= total:
                lookahead.update(model, decay=1.0)
                break
        if step >= total:
            break
    return model, test_loader, time.perf_counter() - t0


def airbench_seconds(printed: str) -> float:
    """airbench's own time from the table ``train94(verbose=True)`` prints: the
    ``total_time_seconds`` cell of its final row (epoch ``eval``)."""
    for line in reversed(printed.splitlines()):
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 7 and cells[1] == "eval":
            return float(cells[6])
    raise ValueError("no final 'eval' row in airbench's output")


def run_seed(files: Path, seed: int, epochs: float, batch_size: int, device: torch.device,
             steps: int | None, warmup: bool = False) -> dict:
    torch.manual_seed(seed)
    a94, utils = _airbench()
    if device.type == "cuda":
        cwd = os.getcwd()
        os.chdir(files.parent)  # airbench reads ./cifar10/{train,test}.pt
        try:
            loader = utils.CifarLoader("cifar10", train=True, batch_size=batch_size,
                                       aug=a94.hyp["aug"], altflip=True)
            printed = io.StringIO()
            with contextlib.redirect_stdout(printed):
                if warmup:  # airbench's own warm-up: one step (with verbose, it stops there)
                    a94.train94(loader, epochs=epochs, run=-1, verbose=True)
                model = a94.train94(loader, epochs=epochs, verbose=True)
            train_s = airbench_seconds(printed.getvalue())
            test_loader = utils.CifarLoader("cifar10", train=False, batch_size=2000)
        finally:
            os.chdir(cwd)
    else:
        model, test_loader, train_s = train_cpu(files, epochs, batch_size, steps)
    accs = [utils.evaluate(model, test_loader, tta_level=level) for level in (0, 1, 2)]
    return {"seed": seed, "acc": accs, "train_s": train_s}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True, help="ImageFolder root with train/, test/")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--epochs", type=float, default=9.9, help="airbench94's 9.9")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "airbench_ref")
    p.add_argument("--smoke", action="store_true", help="512 images per split, 3 steps of 16, CPU")
    p.add_argument("--out", type=Path, help="also write the markdown table here")
    args = p.parse_args(argv)
    device = common.pick_device("cpu" if args.smoke else args.device)
    files = write_airbench_files(args.data, args.workdir / ("smoke" if args.smoke else "full-mixed") /
                                 "cifar10", limit=512 if args.smoke else None)
    batch_size, steps = (16, 3) if args.smoke else (1024, None)
    rows = []
    for k, seed in enumerate(args.seeds):
        r = run_seed(files, seed, args.epochs, batch_size, device, steps, warmup=k == 0)
        rows.append(r)
        print(f"seed {seed}: test acc {r['acc'][0]:.4f} (flip {r['acc'][1]:.4f}, flip + translate "
              f"{r['acc'][2]:.4f}), train {r['train_s']:.1f} s", flush=True)
    table = common.markdown_table(
        ["seed", "epochs", "device", "test acc", "flip TTA", "flip + translate TTA",
         "s (CUDA: airbench's timer; CPU: whiten + train)"],
        [[r["seed"], "3 steps" if args.smoke else args.epochs, device.type, f"{r['acc'][0]:.4f}",
          f"{r['acc'][1]:.4f}", f"{r['acc'][2]:.4f}", f"{r['train_s']:.1f}"] for r in rows])
    lines = [f"Command: `{common.command_line()}`", *common.machine_lines(device)]
    common.emit("\n\n".join(["\n".join(f"- {ln}" for ln in lines), table]), args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
