"""The step loops: one training epoch and one evaluation pass, with no per-step host sync."""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm import tqdm

from cnn_bench.finetune import FreezePlan, set_train_mode
from cnn_bench.runtime import Runtime


@dataclass
class TrainState:
    """Mutable counters of a training run (plain ints, so they go into checkpoints as they are)."""

    epoch: int = 0                 # completed epochs
    global_step: int = 0
    best_metric: float = float("-inf")
    best_epoch: int = 0
    es_best: float | None = None   # early stopping: best monitored value and epochs since
    es_wait: int = 0
    stop_reason: str | None = None
    wall_time_s: float = 0.0       # whole-run wall time up to the last checkpoint, all attempts
    train_time_s: float = 0.0
    train_images: int = 0
    history: list[dict] = field(default_factory=list)


class StepModel:
    """The module that runs the forward pass: compiled when asked, falling back to eager once.

    ``torch.compile`` fails lazily (on the first call), so the fallback sits where that happens.
    """

    def __init__(self, model: nn.Module, compile: bool):
        self.eager = model
        self.fn: Callable = model
        if compile:
            try:
                self.fn = torch.compile(model)
            except Exception as e:  # noqa: BLE001  (compile support varies by platform)
                self._fallback(e)

    def _fallback(self, e: Exception) -> None:
        warnings.warn(f"torch.compile failed, training eagerly: {str(e).splitlines()[0][:200]}")
        self.fn = self.eager

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.fn is self.eager:
            return self.eager(x)
        try:
            return self.fn(x)
        except Exception as e:  # noqa: BLE001
            self._fallback(e)
            return self.eager(x)


def _bar(total: int, desc: str, enabled: bool):
    return tqdm(total=total, desc=desc, leave=False, disable=not enabled, dynamic_ncols=True)


def train_one_epoch(step_model: StepModel, loader, criterion, optimizer, scheduler, scaler,
                    rt: Runtime, state: TrainState, *, limit: int | None, log_every: int,
                    grad_clip: float | None, log_steps: Callable, progress: bool,
                    freeze: FreezePlan | None = None) -> dict:
    """Train for one epoch; return mean loss, accuracy, images and seconds (synced once, at the end)."""
    model = step_model.eager
    set_train_mode(model, freeze)
    n_batches = len(loader) if limit is None else min(limit, len(loader))
    loss_sum = torch.zeros((), device=rt.device)
    correct = torch.zeros((), device=rt.device, dtype=torch.long)
    seen = 0
    pending: list[torch.Tensor] = []   # per-step losses, flushed to the log at log_every steps
    pending_lr: list[float] = []
    bar = _bar(n_batches, f"train {state.epoch + 1}", progress)
    t0 = time.perf_counter()
    for i, (x, y) in enumerate(loader):
        if i >= n_batches:
            break
        with rt.autocast():
            logits = step_model(x)
            loss = criterion(logits, y)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if grad_clip:
            scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        scaler.step(optimizer)
        scaler.update()
        pending_lr.append(optimizer.param_groups[0]["lr"])
        scheduler.step()
        loss = loss.detach()
        loss_sum += loss.float() * y.shape[0]
        correct += (logits.detach().argmax(1) == y).sum()
        seen += y.shape[0]
        pending.append(loss)
        state.global_step += 1
        bar.update(1)
        if len(pending) >= log_every or i == n_batches - 1:
            losses = torch.stack(pending).float().tolist()  # the one host sync per log interval
            log_steps(state.global_step - len(losses), losses, pending_lr)
            if progress:
                elapsed = time.perf_counter() - t0
                bar.set_postfix(loss=f"{losses[-1]:.3f}", acc=f"{correct.item() / seen:.3f}",
                                img_s=f"{seen / elapsed:.0f}")
            pending, pending_lr = [], []
    if rt.device.type == "cuda":
        torch.cuda.synchronize(rt.device)
    seconds = time.perf_counter() - t0
    bar.close()
    return {"loss": (loss_sum / max(seen, 1)).item(), "acc": correct.item() / max(seen, 1),
            "images": seen, "seconds": seconds}


@torch.no_grad()
def evaluate(model: nn.Module, loader, criterion, rt: Runtime, num_classes: int, *,
             limit: int | None = None, desc: str = "val", progress: bool = False) -> dict:
    """Loss, accuracy and confusion matrix (rows = true class) over a loader, accumulated on device."""
    model.eval()
    n_batches = len(loader) if limit is None else min(limit, len(loader))
    loss_sum = torch.zeros((), device=rt.device)
    confusion = torch.zeros(num_classes * num_classes, device=rt.device, dtype=torch.long)
    seen = 0
    bar = _bar(n_batches, desc, progress)
    t0 = time.perf_counter()
    for i, (x, y) in enumerate(loader):
        if i >= n_batches:
            break
        with rt.autocast():
            logits = model(x)
        loss_sum += criterion(logits.float(), y) * y.shape[0]
        confusion += torch.bincount(y * num_classes + logits.argmax(1), minlength=num_classes ** 2)
        seen += y.shape[0]
        bar.update(1)
    confusion = confusion.view(num_classes, num_classes).cpu()  # the one sync of the pass
    if progress:
        bar.set_postfix(loss=f"{loss_sum.item() / max(seen, 1):.3f}",
                        acc=f"{confusion.diag().sum().item() / max(seen, 1):.3f}",
                        img_s=f"{seen / (time.perf_counter() - t0):.0f}")
    bar.close()
    return {"loss": (loss_sum / max(seen, 1)).item(),
            "acc": confusion.diag().sum().item() / max(seen, 1),
            "images": seen, "seconds": time.perf_counter() - t0, "confusion": confusion}
