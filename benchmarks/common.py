"""What the benchmark scripts share: statistics and tables, machine facts, peak memory,
subprocess timing, small data helpers and the hand-written ("plain PyTorch") training loop.

The plain loop here is the baseline every comparison is made against: what a careful person
writes by hand (index a tensor or iterate a DataLoader, autocast, backward, step), with no
per-step host sync of its own, so that a ratio above 1 measures cnn_bench's own overhead. Its
optimizer is torch's default SGD: with fp16 on CUDA, GradScaler then reads the inf check on the
host every step (cnn_bench's fused SGD does not), which the throughput table notes.
"""

from __future__ import annotations

import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

REPO = Path(__file__).resolve().parent.parent
TRAIN_PY = REPO / "train.py"

# Per-channel statistics in [0, 1] units: ImageNet's (imagefolder's and timm's default) and
# CIFAR-10's (conf/dataset/cifar10.yaml).
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


# --------------------------------------------------------------------------- statistics, tables

@dataclass(frozen=True)
class Spread:
    """Median and range of repeated measurements (the machine is shared: report the spread)."""

    median: float
    low: float
    high: float
    n: int

    @classmethod
    def of(cls, values: Iterable[float]) -> Spread:
        vals = [float(v) for v in values if v is not None and math.isfinite(float(v))]
        if not vals:
            return cls(math.nan, math.nan, math.nan, 0)
        return cls(statistics.median(vals), min(vals), max(vals), len(vals))

    def fmt(self, digits: int = 1) -> str:
        """``median (low-high)``; just the value for a single measurement; ``-`` for none."""
        if self.n == 0:
            return "-"
        if self.n == 1:
            return f"{self.median:,.{digits}f}"
        return f"{self.median:,.{digits}f} ({self.low:,.{digits}f}-{self.high:,.{digits}f})"


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value; NaN for none)."""
    vals = [float(v) for v in values]
    if not vals:
        return math.nan, math.nan
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence]) -> str:
    """A GitHub markdown table; numbers are expected pre-formatted as strings."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def machine_lines(device: torch.device | str | None = None, threads: int | None = None) -> list[str]:
    """What the numbers were measured on: CPU model and cores, torch version, intra-op threads
    (``threads``: what the measured processes were given, if not this one's), GPU if used."""
    cpu = platform.processor() or platform.machine()
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        found = re.search(r"Model name:\s*(.+)", lscpu)
        cpu = found.group(1).strip() if found else cpu
    except (OSError, subprocess.SubprocessError):
        pass
    lines = [f"CPU: {cpu}, {os.cpu_count()} logical cores; torch {torch.__version__} "
             f"({threads or torch.get_num_threads()} intra-op threads); "
             f"Python {platform.python_version()}"]
    device = torch.device(device) if device is not None else None
    if device is not None and device.type == "cuda":
        lines.append(f"GPU: {torch.cuda.get_device_name(device)}, CUDA {torch.version.cuda}, "
                     f"cuDNN {torch.backends.cudnn.version()}")
    return lines


def emit(text: str, out: str | Path | None) -> None:
    """Print a report and, if asked, write it to ``out`` (the file BENCHMARKS.md pastes)."""
    print(text, flush=True)
    if out:
        path = Path(out)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n")


def command_line() -> str:
    """This process's command line, for the report header (reproducibility)."""
    return " ".join(["python", *(_quote(a) for a in sys.argv)])


def _quote(arg: str) -> str:
    return arg if re.fullmatch(r"[\w@%+=:,./-]+", arg) else "'" + arg.replace("'", "'\\''") + "'"


# --------------------------------------------------------------------------- device, memory

def pick_device(name: str = "auto") -> torch.device:
    """``auto`` -> cuda when available, else cpu."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def sync(device: torch.device) -> None:
    """Wait for queued GPU work, so wall clocks measure it (a no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --------------------------------------------------------------------------- subprocesses

@dataclass
class ProcResult:
    """A finished subprocess: whole-process wall time (s), exit code and its log file."""

    wall_s: float
    returncode: int
    log: Path

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    def tail(self, lines: int = 1) -> str:
        text = self.log.read_text(errors="replace").strip().splitlines() if self.log.exists() else []
        return " / ".join(text[-lines:]) if text else f"exit code {self.returncode}"


def run_timed(cmd: Sequence[str], log: Path, *, env: dict | None = None,
              cwd: Path = REPO, timeout: float | None = None) -> ProcResult:
    """Run ``cmd`` with stdout+stderr to ``log``; the wall time covers interpreter start-up,
    imports, data loading, training, evaluation and writing results: the whole process."""
    log.parent.mkdir(parents=True, exist_ok=True)
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    with open(log, "w") as f:
        f.write("$ " + " ".join(_quote(str(c)) for c in cmd) + "\n")
        f.flush()
        t0 = time.perf_counter()
        try:
            rc = subprocess.run([str(c) for c in cmd], stdout=f, stderr=subprocess.STDOUT,
                                cwd=cwd, env=full_env, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            rc = -9
        wall = time.perf_counter() - t0
    return ProcResult(wall, rc, log)


def cnn_bench_cmd(overrides: Sequence[str]) -> list[str]:
    """``python train.py <overrides>`` with this interpreter (the project's own CLI)."""
    return [sys.executable, str(TRAIN_PY), *overrides]


def experiment_override(name: str) -> str:
    """``+experiment=<name>``, or ``experiment=<name>`` once conf/config.yaml's defaults list
    has an ``experiment`` entry (Hydra refuses ``+`` for a key that already exists)."""
    defaults = (REPO / "conf" / "config.yaml").read_text()
    listed = re.search(r"^\s*-\s*(optional\s+)?experiment\s*:", defaults, re.MULTILINE)
    return f"{'' if listed else '+'}experiment={name}"


def read_jsonl(path: Path) -> list[dict]:
    """One dict per non-empty line (``metrics.jsonl``); empty list if the file is missing."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# --------------------------------------------------------------------------- data helpers

def synthetic_uint8(n: int, resolution: int, num_classes: int = 10, seed: int = 0,
                    device: str | torch.device = "cpu"):
    """Random uint8 images [n,3,R,R] and int64 labels [n] on ``device`` (throughput only:
    content is irrelevant to speed, the shapes and dtypes are what real decoded data has).
    Drawn on the device itself: 7,680 images at 224 px are 1.2 GB, ~9 s for one CPU core."""
    g = torch.Generator(device=device).manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, resolution, resolution), dtype=torch.uint8,
                           generator=g, device=device)
    return images, torch.randint(0, num_classes, (n,), generator=g, device=device)


def has_split(root: Path, split: str) -> bool:
    return (Path(root) / split).is_dir()


def make_subset(src: Path, dst: Path, per_class: dict[str, int | None]) -> Path:
    """An ImageFolder ``dst/<split>/<class>/`` of symlinks to the first N files (sorted) of each
    class of ``src/<split>/`` (``None`` = all), so short runs see a fixed, balanced subset.
    Rebuilt when asked for different counts; returns ``dst``."""
    src, dst = Path(src).resolve(), Path(dst)
    stamp = dst / ".subset.json"
    want = {"src": str(src), "per_class": per_class}
    if stamp.exists() and json.loads(stamp.read_text()) == want:
        return dst
    if dst.exists():
        import shutil

        shutil.rmtree(dst)
    for split, n in per_class.items():
        for cls_dir in sorted(p for p in (src / split).iterdir() if p.is_dir()):
            files = sorted(p for p in cls_dir.iterdir() if p.is_file())[:n]
            out = dst / split / cls_dir.name
            out.mkdir(parents=True, exist_ok=True)
            for f in files:
                (out / f.name).symlink_to(f)
    stamp.write_text(json.dumps(want))
    return dst


def same_splits_view(root: Path, val_split: str, view: Path) -> Path:
    """``root``, or a view of it with only ``train/`` and ``val_split/`` when it has other split
    folders: cnn_bench validates on the first of val/, validation/, valid/ it finds and also
    scores test/ at the end when both exist, while the other runners evaluate ``val_split`` once
    per epoch; with only those two folders every runner evaluates the same images, once."""
    from cnn_bench.data.imagefolder import VAL_DIRS

    others = [d for d in (*VAL_DIRS, "test") if d != val_split and (root / d).is_dir()]
    if not others:
        return root
    return make_subset(root, view, {"train": None, val_split: None})


# --------------------------------------------------------------------------- the plain loop

def plain_sgd(model: nn.Module, lr: float, momentum: float, weight_decay: float,
              nesterov: bool = True) -> torch.optim.SGD:
    """SGD with torch's defaults (no foreach/fused flags); weight decay on weights only (the
    common recipe, and what cnn_bench and timm do), so all runners optimise the same thing."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]
    return torch.optim.SGD([{"params": decay, "weight_decay": weight_decay},
                            {"params": no_decay, "weight_decay": 0.0}],
                           lr=lr, momentum=momentum, nesterov=nesterov and momentum > 0)


def normalizer(mean: Sequence[float], std: Sequence[float], device: torch.device):
    """``uint8 [B,3,H,W] -> float`` normalised, as one fused multiply-add per element."""
    m = torch.tensor(mean, device=device).view(1, 3, 1, 1)
    s = torch.tensor(std, device=device).view(1, 3, 1, 1)
    scale, bias = 1.0 / (255.0 * s), -m / s

    def norm(x: torch.Tensor) -> torch.Tensor:
        return torch.addcmul(bias, x.float(), scale)

    return norm


def tensor_batches(images: torch.Tensor, labels: torch.Tensor, batch_size: int, *,
                   order: torch.Tensor | None, norm, channels_last: bool,
                   drop_last: bool) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Batches of a uint8 tensor held on the device: index, normalise, lay out."""
    n = images.shape[0]
    stop = n - n % batch_size if drop_last and n >= batch_size else n
    for start in range(0, stop, batch_size):
        if order is None:
            x, y = images[start:start + batch_size], labels[start:start + batch_size]
        else:
            idx = order[start:start + batch_size]
            x, y = images[idx], labels[idx]
        x = norm(x)
        yield (x.contiguous(memory_format=torch.channels_last) if channels_last else x), y


def to_device(batches: Iterable, device: torch.device, channels_last: bool):
    """DataLoader batches (CPU float) -> the device, in the requested layout."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    for x, y in batches:
        yield (x.to(device, non_blocking=True, memory_format=fmt),
               y.to(device, non_blocking=True))


def plain_train(model: nn.Module, optimizer: torch.optim.Optimizer, batches: Iterable, *,
                device: torch.device, amp_dtype: torch.dtype | None, scaler=None,
                scheduler=None, limit: int | None = None) -> dict:
    """One pass of the hand-written loop; returns mean loss, images and seconds (synced once)."""
    model.train()
    loss_sum = torch.zeros((), device=device)
    seen = 0
    sync(device)
    t0 = time.perf_counter()
    for i, (x, y) in enumerate(batches):
        if limit is not None and i >= limit:
            break
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        if scheduler is not None:
            scheduler.step()
        loss_sum += loss.detach().float() * y.shape[0]
        seen += y.shape[0]
    sync(device)
    seconds = time.perf_counter() - t0
    return {"loss": (loss_sum / max(seen, 1)).item(), "images": seen, "seconds": seconds}


@torch.no_grad()
def plain_evaluate(model: nn.Module, batches: Iterable, *, device: torch.device,
                   amp_dtype: torch.dtype | None, limit: int | None = None) -> dict:
    """Accuracy and loss over batches, accumulated on the device; synced once at the end."""
    model.eval()
    correct = torch.zeros((), device=device, dtype=torch.long)
    loss_sum = torch.zeros((), device=device)
    seen = 0
    sync(device)
    t0 = time.perf_counter()
    for i, (x, y) in enumerate(batches):
        if limit is not None and i >= limit:
            break
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = model(x)
        loss_sum += F.cross_entropy(logits.float(), y, reduction="sum")
        correct += (logits.argmax(1) == y).sum()
        seen += y.shape[0]
    acc, loss = correct.item() / max(seen, 1), loss_sum.item() / max(seen, 1)
    return {"acc": acc, "loss": loss, "images": seen, "seconds": time.perf_counter() - t0}
