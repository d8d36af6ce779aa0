#!/usr/bin/env python
"""Training and evaluation throughput: cnn_bench's trainer path vs a hand-written loop.

For each ``MODEL:RESOLUTION:BATCH[:PRECISION]`` on the command line, in one process and on the
same device, data tensor, model, batch size, precision and memory format:

(a) **cnn_bench**: the trainer's own components - the in-memory ``MemoryLoader`` (uint8 on the
    device, batch-wise augmentation and normalisation), ``build_model``, ``build_optimizer``
    (foreach/fused SGD), ``build_scheduler``, and ``cnn_bench.loop.train_one_epoch`` /
    ``evaluate``, configured through the real Hydra config tree;
(b) **plain**: a hand-written loop (``benchmarks.common.plain_train``): index the same uint8
    tensor, normalise, autocast, backward, ``torch.optim.SGD`` with torch's defaults.

They run alternately (a, b, a, b, ...), each repeat from freshly initialised weights (same
seed), after untimed warm-up steps; the table gives medians and ranges over the repeats and the
per-repeat ratio cnn_bench / plain (> 1: cnn_bench is faster). Peak memory is the CUDA
allocator's peak on GPU, the process's peak RSS on CPU. "data %" is the time the cnn_bench
loader alone needs per batch (index + augment + normalise, synced) over the training step time;
the steps train without augmentation, and ``--loader-experiment cifar10_speedrun`` times the
loader with that recipe's augmentation instead (and builds that recipe's model, speednet, with
its options: whitening stem, dirac init, frozen BN scales, BN momentum).

Examples::

    python benchmarks/throughput.py speednet_s:32:128 resnet18:32:64 mobilenet_v2:32:64
    python benchmarks/throughput.py resnet50:224:256:bf16 --steps 50 --repeats 5   # GPU
    python benchmarks/throughput.py --smoke speednet_s:16:8
"""

from __future__ import annotations

import argparse
import gc
import itertools
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `benchmarks` and `cnn_bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
from torch import nn

from benchmarks import common
from cnn_bench.config import CONF_DIR
from cnn_bench.runtime import peak_memory_mb, reset_peak_memory

DEFAULT_CPU = ["speednet_s:32:128", "resnet18:32:64", "mobilenet_v2:32:64"]
DEFAULT_GPU = ["resnet50:224:256:bf16", "resnet18:32:512:bf16", "speednet:32:1024:bf16"]
# The plain loop keeps torch's default (foreach) SGD; with GradScaler that optimizer's step reads
# the inf check on the host (one sync per step), while cnn_bench's fused SGD takes it on the GPU.
FP16_NOTE = ("- fp16 rows: the plain loop's GradScaler step syncs with the host once per step "
             "(torch's default SGD); cnn_bench's fused SGD does not, and the ratio includes that")


@dataclass(frozen=True)
class Spec:
    model: str
    resolution: int
    batch_size: int
    precision: str  # auto | fp32 | bf16 | fp16

    @classmethod
    def parse(cls, text: str) -> Spec:
        parts = text.split(":")
        if len(parts) not in (3, 4):
            raise argparse.ArgumentTypeError(
                f"'{text}': expected MODEL:RESOLUTION:BATCH[:PRECISION], e.g. resnet18:32:64:fp32")
        try:
            res, bs = int(parts[1]), int(parts[2])
        except ValueError:
            raise argparse.ArgumentTypeError(f"'{text}': resolution and batch must be integers") from None
        prec = parts[3] if len(parts) == 4 else "auto"
        if prec not in ("auto", *common.PRECISIONS):
            raise argparse.ArgumentTypeError(f"'{text}': precision must be auto, fp32, bf16 or fp16")
        return cls(parts[0], res, bs, prec)


@dataclass
class Measured:
    """Per-repeat figures of one path (lists over repeats)."""

    train_ips: list[float] = field(default_factory=list)   # images/s
    eval_ips: list[float] = field(default_factory=list)
    peak_mb: list[float] = field(default_factory=list)     # MiB
    data_pct: list[float] = field(default_factory=list)    # % of the training step time


def compose(overrides: list[str]):
    """The run's config from the project's conf/ tree, exactly as train.py would compose it."""
    from hydra import compose as hydra_compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=overrides)


def load_data(args, cfg, rt, n_images: int):
    """uint8 images [N,3,R,R] and labels on the device: synthetic, or an ImageFolder decoded
    (and disk-cached) by cnn_bench's own ``build_data``. Returns (images, labels, classes)."""
    res = cfg.dataset.resolution
    if args.data == "synthetic":
        images, labels = common.synthetic_uint8(n_images, res, 10, seed=0, device=rt.device)
        return images, labels, 10
    from cnn_bench.data import build_data

    data = build_data(cfg.dataset, cfg.augmentation, batch_size=cfg.trainer.batch_size,
                      device=rt.device, seed=0, channels_last=rt.channels_last)
    return data.train.images, data.train.labels, data.num_classes


def data_init(model, x) -> None:
    """The data-dependent initialisation the trainer does (SpeedNet's whitening stem), from a
    first normalised batch: the same network in both paths, whatever the spec's options."""
    if getattr(model, "wants_data_init", False):
        model.init_from_data(x)


def run_cnn_bench(cfg, rt, images, labels, num_classes, args, seed: int, loader_aug=None) -> dict:
    """One repeat of path (a): cnn_bench's loader, model, optimizer and loop functions;
    ``loader_aug`` (an augmentation config) is the one the loader-alone pass times."""
    from cnn_bench.data.augment import BatchAugment
    from cnn_bench.data.memory import MemoryLoader
    from cnn_bench.loop import StepModel, TrainState, evaluate, train_one_epoch
    from cnn_bench.models.build import build_model
    from cnn_bench.optim import build_optimizer, build_scheduler

    tr, res, bs = cfg.trainer, cfg.dataset.resolution, cfg.trainer.batch_size
    mean, std = common.IMAGENET_MEAN, common.IMAGENET_STD

    def shuffled(aug_cfg) -> MemoryLoader:
        return MemoryLoader(images, labels, bs, shuffle=True,
                            augment=BatchAugment.from_config(aug_cfg, mean, std, res),
                            device=rt.device, seed=seed, channels_last=rt.channels_last)

    train_loader = shuffled(cfg.augmentation)
    eval_loader = MemoryLoader(images, labels, bs, shuffle=False,
                               augment=BatchAugment.normalize_only(mean, std),
                               device=rt.device, seed=seed, channels_last=rt.channels_last)
    torch.manual_seed(seed)
    model = build_model(cfg.model, num_classes, res).to(rt.device, memory_format=rt.memory_format)
    train_loader.set_epoch(0)
    data_init(model, next(iter(train_loader))[0])
    optimizer = build_optimizer(cfg.optimizer, model, rt.device)
    steps_per_epoch = len(train_loader)
    scheduler = build_scheduler(cfg.scheduler, optimizer, steps_per_epoch, 2)
    scaler = torch.amp.GradScaler(rt.device.type, enabled=rt.use_scaler)
    criterion = nn.CrossEntropyLoss()
    state = TrainState()
    step_model = StepModel(model, tr.compile)

    def epoch(limit: int) -> dict:
        train_loader.set_epoch(state.epoch)
        out = train_one_epoch(step_model, train_loader, criterion, optimizer, scheduler, scaler,
                              rt, state, limit=limit, log_every=tr.log_every_n_steps,
                              grad_clip=tr.grad_clip, log_steps=lambda *a: None, progress=False)
        state.epoch += 1
        return out

    epoch(args.warmup_steps)                       # untimed: allocator, cudnn autotune, compile
    reset_peak_memory(rt.device)
    train = epoch(args.steps)
    # through the step model, compiled as the trainer's evaluation is; one untimed batch first
    # compiles the eval graph (the plain loop below does the same)
    evaluate(step_model, eval_loader, criterion, rt, num_classes, limit=1)
    ev = evaluate(step_model, eval_loader, criterion, rt, num_classes, limit=args.eval_steps)
    peak = peak_memory_mb(rt.device)

    # The loader alone: what the data path costs per step, with the trained augmentation or
    # (--loader-experiment) a recipe's, e.g. the speedrun's reflect crops and alternating flips.
    loader = train_loader if loader_aug is None else shuffled(loader_aug)
    loader.set_epoch(state.epoch)
    for x, _ in itertools.islice(loader, 1):    # untimed: the augmentation's first call
        pass
    common.sync(rt.device)
    t0 = time.perf_counter()
    for x, _ in itertools.islice(loader, args.steps):
        pass
    common.sync(rt.device)
    data_s = time.perf_counter() - t0
    return {"train_ips": train["images"] / train["seconds"],
            "eval_ips": ev["images"] / ev["seconds"], "peak_mb": peak,
            "data_pct": 100.0 * data_s / train["seconds"]}


def run_plain(cfg, rt, images, labels, num_classes, args, seed: int) -> dict:
    """One repeat of path (b): the hand-written loop on the same tensor, model and settings."""
    from cnn_bench.models.build import build_model

    res, bs = cfg.dataset.resolution, cfg.trainer.batch_size
    amp_dtype = common.PRECISIONS[rt.precision]
    torch.manual_seed(seed)
    model = build_model(cfg.model, num_classes, res).to(rt.device, memory_format=rt.memory_format)
    opt = common.plain_sgd(model, cfg.optimizer.lr, cfg.optimizer.momentum,
                           cfg.optimizer.weight_decay, cfg.optimizer.nesterov)
    scaler = torch.amp.GradScaler(rt.device.type) if rt.precision == "fp16" else None
    fn = torch.compile(model) if cfg.trainer.compile else model
    norm = common.normalizer(common.IMAGENET_MEAN, common.IMAGENET_STD, rt.device)
    g = torch.Generator(device="cpu").manual_seed(seed)

    def batches(shuffle: bool):
        order = torch.randperm(len(images), generator=g).to(rt.device) if shuffle else None
        return common.tensor_batches(images, labels, bs, order=order, norm=norm,
                                     channels_last=rt.channels_last, drop_last=shuffle)

    data_init(model, next(iter(batches(True)))[0])
    kw = {"device": rt.device, "amp_dtype": amp_dtype}
    common.plain_train(fn, opt, batches(True), scaler=scaler, limit=args.warmup_steps, **kw)
    reset_peak_memory(rt.device)
    train = common.plain_train(fn, opt, batches(True), scaler=scaler, limit=args.steps, **kw)
    common.plain_evaluate(fn, batches(False), limit=1, **kw)
    ev = common.plain_evaluate(fn, batches(False), limit=args.eval_steps, **kw)
    peak = peak_memory_mb(rt.device)
    return {"train_ips": train["images"] / train["seconds"],
            "eval_ips": ev["images"] / ev["seconds"], "peak_mb": peak}


def bench_spec(spec: Spec, args) -> tuple[list[list[str]], str, dict]:
    """Both paths for one spec, alternately; returns table rows, the device and raw figures."""
    overrides = [f"model={spec.model}", f"dataset.resolution={spec.resolution}",
                 f"trainer.batch_size={spec.batch_size}", f"trainer.precision={spec.precision}",
                 f"trainer.device={args.device}", f"trainer.channels_last={args.channels_last}",
                 f"trainer.compile={str(args.compile).lower()}",
                 # Constant lr and no augmentation: the plain loop does neither, and both are
                 # cheap next to a step; what remains is the trainer's own per-step work.
                 "scheduler=none", "augmentation=none"]
    if args.data != "synthetic":
        # val_fraction=0: every train/ image trains, and the decoded-data cache is the one
        # time_to_accuracy.py's runs fill (the split's file list is part of its key)
        overrides += ["dataset=imagefolder", f"dataset.root={args.data}", "dataset.in_memory=true",
                      "dataset.val_fraction=0",
                      f"dataset.mean={list(common.IMAGENET_MEAN)}",
                      f"dataset.std={list(common.IMAGENET_STD)}"]
        # dataset=... must come before the dataset.* keys it resets
        overrides = [o for o in overrides if o.startswith("dataset=")] + [
            o for o in overrides if not o.startswith("dataset=")]
    cfg = compose(overrides)
    loader_aug = None
    if args.loader_experiment:
        exp = compose([common.experiment_override(args.loader_experiment)])
        loader_aug = exp.augmentation
        if exp.model.name == spec.model:  # the recipe's network, not the YAML's defaults
            cfg.model = exp.model         # (the speedrun's speednet: whitening stem, dirac...)
    from cnn_bench.runtime import resolve_runtime

    rt = resolve_runtime(cfg.trainer)
    n_images = spec.batch_size * max(args.steps, args.warmup_steps, args.eval_steps)
    images, labels, num_classes = load_data(args, cfg, rt, n_images)
    if len(images) < spec.batch_size * max(args.steps, args.warmup_steps, args.eval_steps):
        raise SystemExit(f"error: {args.data} has {len(images)} training images; need batch x "
                         f"steps = {n_images} (lower --steps)")
    results = {"cnn_bench": Measured(), "plain": Measured()}
    ratios_train, ratios_eval = [], []
    for r in range(args.repeats):
        a = run_cnn_bench(cfg, rt, images, labels, num_classes, args, seed=r, loader_aug=loader_aug)
        gc.collect()
        b = run_plain(cfg, rt, images, labels, num_classes, args, seed=r)
        gc.collect()
        for name, m in (("cnn_bench", a), ("plain", b)):
            res = results[name]
            res.train_ips.append(m["train_ips"])
            res.eval_ips.append(m["eval_ips"])
            res.peak_mb.append(m["peak_mb"])
            if "data_pct" in m:
                res.data_pct.append(m["data_pct"])
        ratios_train.append(a["train_ips"] / b["train_ips"])
        ratios_eval.append(a["eval_ips"] / b["eval_ips"])
        print(f"  {spec.model} {spec.resolution}px b{spec.batch_size} {rt.precision} repeat {r + 1}/"
              f"{args.repeats}: cnn_bench {a['train_ips']:.1f} img/s, plain {b['train_ips']:.1f} "
              f"img/s (ratio {ratios_train[-1]:.3f})", file=sys.stderr, flush=True)
    rows = []
    for name, m in results.items():
        is_a = name == "cnn_bench"
        rows.append([spec.model, spec.resolution, spec.batch_size, rt.precision
                     + (", channels_last" if rt.channels_last else "")
                     + (", compile" if args.compile else ""), name,
                     common.Spread.of(m.train_ips).fmt(1), common.Spread.of(m.eval_ips).fmt(1),
                     common.Spread.of(ratios_train).fmt(3) if is_a else "-",
                     common.Spread.of(ratios_eval).fmt(3) if is_a else "-",
                     common.Spread.of(m.peak_mb).fmt(0),
                     common.Spread.of(m.data_pct).fmt(1) if is_a else "-"])
    raw = {"spec": spec.__dict__, "precision": rt.precision, "channels_last": rt.channels_last,
           "ratio_train": ratios_train, "ratio_eval": ratios_eval,
           **{f"{k}_{f}": getattr(v, f) for k, v in results.items()
              for f in ("train_ips", "eval_ips", "peak_mb", "data_pct")}}
    del images, labels
    return rows, str(rt.device), raw


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("specs", nargs="*", type=Spec.parse, metavar="MODEL:RES:BATCH[:PRECISION]",
                   help=f"what to measure (precision auto|fp32|bf16|fp16, default auto: bf16 on "
                        f"CUDA, fp32 on CPU); default CPU: {' '.join(DEFAULT_CPU)}; "
                        f"default CUDA: {' '.join(DEFAULT_GPU)}")
    p.add_argument("--steps", type=int, default=10, help="timed training steps per repeat (10)")
    p.add_argument("--warmup-steps", type=int, default=3, help="untimed steps first (3)")
    p.add_argument("--eval-steps", type=int, default=5, help="timed eval batches per repeat (5)")
    p.add_argument("--repeats", type=int, default=3, help="alternating a/b repeats (3)")
    p.add_argument("--data", default="synthetic",
                   help="'synthetic' (random uint8, default) or an ImageFolder root (e.g. "
                        "/tmp/cifar), decoded and cached by cnn_bench's build_data")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (auto)")
    p.add_argument("--channels-last", default="auto", choices=["auto", "true", "false"],
                   help="memory format for both paths; auto = cnn_bench's rule (on for CUDA)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model in both paths")
    p.add_argument("--threads", type=int,
                   help="torch intra-op CPU threads (default: torch's). On a shared, busy CPU "
                        "use 1: spinning OpenMP threads then wait for descheduled peers")
    p.add_argument("--loader-experiment", metavar="NAME",
                   help="time the loader-alone pass ('data %% of step') with the augmentation of "
                        "conf/experiment/NAME.yaml (default: the trained one, augmentation=none); "
                        "a spec of NAME's model is built with NAME's model options")
    p.add_argument("--smoke", action="store_true",
                   help="a few steps, two repeats each way (checks the code path, not speed)")
    p.add_argument("--out", help="also write the markdown report to this file")
    p.add_argument("--json", help="also write the raw per-repeat figures to this JSON file")
    args = p.parse_args(argv)
    if args.smoke:
        args.steps, args.warmup_steps, args.eval_steps, args.repeats = 2, 1, 1, 2
    if args.threads:
        torch.set_num_threads(args.threads)
    device = common.pick_device(args.device)
    specs = args.specs or [Spec.parse(s) for s in (DEFAULT_GPU if device.type == "cuda" else DEFAULT_CPU)]

    rows, raws = [], []
    for spec in specs:
        spec_rows, _, raw = bench_spec(spec, args)
        rows += spec_rows
        raws.append(raw)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    mem = "peak CUDA MiB" if device.type == "cuda" else "peak RSS MiB"
    table = common.markdown_table(
        ["model", "px", "batch", "precision", "path", "train img/s", "eval img/s",
         "train vs plain", "eval vs plain", mem, "data % of step"], rows)
    header = [f"### Throughput: cnn_bench trainer path vs hand-written loop ({device.type})", "",
              *[f"- {ln}" for ln in common.machine_lines(device)],
              f"- `{common.command_line()}`",
              f"- data: {args.data}; {args.warmup_steps} warm-up + {args.steps} timed train steps "
              f"and {args.eval_steps} eval batches per repeat; {args.repeats} repeats run "
              f"alternately (cnn_bench, plain, cnn_bench, ...); cells: median (min-max)",
              "- train/eval vs plain: per-repeat ratio of images/s, cnn_bench / plain (> 1 = "
              "cnn_bench faster); data % of step: the cnn_bench loader alone, per batch, over "
              "the step time" + (f", its augmentation {args.loader_experiment}'s"
                                 if args.loader_experiment else " (no augmentation)"),
              *([f"- a model that {args.loader_experiment} trains is built with its options "
                 f"there (both paths)"] if args.loader_experiment else []),
              *([FP16_NOTE] if device.type == "cuda" and any(r["precision"] == "fp16" for r in raws)
                else []), ""]
    common.emit("\n".join(header) + "\n" + table, args.out)
    if args.json:
        import json

        Path(args.json).write_text(json.dumps(raws, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
