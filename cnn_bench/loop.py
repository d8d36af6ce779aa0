"""The step loops: one training epoch and one evaluation pass, with no per-step host sync;
and the torch.compile warm-up that runs before them."""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm import tqdm

from cnn_bench.ema import ModelEma
from cnn_bench.finetune import FreezePlan, set_train_mode
from cnn_bench.lookahead import Lookahead
from cnn_bench.optim import base_lr
from cnn_bench.runtime import Runtime, rng_state, set_rng_state

TTA_MODES = ("none", "flip", "flip_translate")
# torch.compile modes; reduce-overhead and max-autotune capture CUDA graphs (on CUDA only)
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


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
    compile_s: float = 0.0         # torch.compile warm-ups, all attempts (not in train_time_s)
    history: list[dict] = field(default_factory=list)


class StepModel:
    """The module that runs the forward pass: compiled when asked, falling back to eager once.

    ``torch.compile`` fails lazily (on the first call), so the fallback sits where that happens.
    """

    def __init__(self, model: nn.Module, compile: bool, mode: str = "default"):
        if mode not in COMPILE_MODES:
            raise ValueError(f"compile mode must be one of {', '.join(COMPILE_MODES)}; got {mode!r}")
        self.eager = model
        self.fn: Callable = model
        self.mode = mode
        # CUDA graphs (reduce-overhead, max-autotune) replay into the same output buffers: an
        # output is overwritten by the next call, and flip TTA calls twice before reading.
        self.cudagraphs = compile and mode in ("reduce-overhead", "max-autotune")
        if compile:
            try:
                # dynamic=False: one static graph per batch shape (the train batch, the eval batch
                # and the eval split's last partial batch, all compiled by compile_warmup) instead
                # of a recompile to a symbolic batch size at the first odd-sized batch.
                self.fn = torch.compile(model, mode=None if mode == "default" else mode,
                                        dynamic=False)
            except Exception as e:  # noqa: BLE001  (compile support varies by platform)
                self._fallback(e)

    @property
    def compiled(self) -> bool:
        """Whether calls go through ``torch.compile`` (false when off or after a fallback)."""
        return self.fn is not self.eager

    def _fallback(self, e: Exception | None) -> None:
        """Run eagerly from now on; warn with the reason (``None``: quietly, already warned)."""
        if e is not None:
            warnings.warn(f"torch.compile failed, training eagerly: {str(e).splitlines()[0][:200]}")
        self.fn = self.eager

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.fn is self.eager:
            return self.eager(x)
        try:
            if not self.cudagraphs:
                return self.fn(x)
            # Each call is a new step for cudagraph trees; the clone (B x classes logits: a
            # few KB) keeps the result valid after the next replay reuses the graph's buffers.
            torch.compiler.cudagraph_mark_step_begin()
            return self.fn(x).clone()
        except torch.OutOfMemoryError:
            raise  # the batch does not fit, compiled or not: not a reason to drop compile
        except Exception as e:  # noqa: BLE001
            self._fallback(e)
            return self.eager(x)


def _bar(total: int, desc: str, enabled: bool):
    return tqdm(total=total, desc=desc, leave=False, disable=not enabled, dynamic_ncols=True)


def train_one_epoch(step_model: StepModel, loader, criterion, optimizer, scheduler, scaler,
                    rt: Runtime, state: TrainState, *, limit: int | None, log_every: int,
                    grad_clip: float | None, log_steps: Callable, progress: bool,
                    freeze: FreezePlan | None = None, ema: ModelEma | None = None,
                    lookahead: Lookahead | None = None) -> dict:
    """Train for one epoch; return mean loss, accuracy, images, seconds (synced once, at the end)
    and ``lr``, the schedule's lr of the epoch's last step (the ``train/lr`` logged with it).

    With ``ema``, the average is updated after every optimizer step (a skipped fp16 step still
    counts: telling would need a host sync; timm does the same); ``lookahead`` syncs first, so
    the average follows the pulled-back weights."""
    model = step_model.eager
    set_train_mode(model, freeze)
    n_batches = len(loader) if limit is None else min(limit, len(loader))
    loss_sum = torch.zeros((), device=rt.device)
    correct = torch.zeros((), device=rt.device, dtype=torch.long)
    seen = 0
    pending: list[torch.Tensor] = []   # per-step losses, flushed to the log at log_every steps
    pending_lr: list[float] = []
    last_lr = base_lr(optimizer)
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
        if lookahead is not None:
            lookahead.update(state.global_step)
        if ema is not None:
            ema.update(state.global_step)
        last_lr = base_lr(optimizer)  # the lr this step used: the scheduler moves it next
        pending_lr.append(last_lr)
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
            # step k's loss is logged at k (1-based: steps done), so epoch e's record, logged at
            # its last step, lines up with that step's loss
            log_steps(state.global_step - len(losses) + 1, losses, pending_lr)
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
            "images": seen, "seconds": seconds, "lr": last_lr}


def hflip(x: torch.Tensor) -> torch.Tensor:
    """Mirror a [B,C,H,W] batch left-right (keeps channels_last: same strides, no recompile)."""
    return x.flip(3)


def translate(x: torch.Tensor, shift: int) -> torch.Tensor:
    """Shift a [B,C,H,W] batch by ``shift`` px down and right (up-left if negative), filling the
    border by reflection; same shape and memory format (a compiled model sees the same strides)."""
    padded = nn.functional.pad(x, (abs(shift),) * 4, mode="reflect")
    h, w = x.shape[2:]
    top = abs(shift) - shift
    out = padded[:, :, top:top + h, top:top + w]
    fmt = (torch.channels_last if x.is_contiguous(memory_format=torch.channels_last)
           and not x.is_contiguous() else torch.contiguous_format)
    return out.contiguous(memory_format=fmt)


def _mirror_mean(model: nn.Module | StepModel, x: torch.Tensor) -> torch.Tensor:
    return (model(x).float() + model(hflip(x)).float()) / 2


def eval_logits(model: nn.Module | StepModel, x: torch.Tensor, tta: str = "none") -> torch.Tensor:
    """The logits evaluation scores (averages in fp32: under autocast the logits are bf16).

    ``none``: ``model(x)``. ``flip``: the mean over ``x`` and its mirror image.
    ``flip_translate`` (airbench's multi-crop TTA, 6 passes): half the ``flip`` logits of ``x``,
    half their mean over ``x`` shifted 1 px down-right and 1 px up-left.
    """
    if tta == "none":
        return model(x)
    if tta == "flip":
        return _mirror_mean(model, x)
    if tta == "flip_translate":
        shifted = (_mirror_mean(model, translate(x, 1)) + _mirror_mean(model, translate(x, -1))) / 2
        return (_mirror_mean(model, x) + shifted) / 2
    raise ValueError(f"tta must be one of {', '.join(TTA_MODES)}; got {tta!r}")


@torch.no_grad()
def evaluate(model: nn.Module | StepModel, loader, criterion, rt: Runtime, num_classes: int, *,
             limit: int | None = None, desc: str = "val", progress: bool = False,
             tta: str = "none") -> dict:
    """Loss, accuracy and confusion matrix (rows = true class) over a loader, accumulated on device.

    ``model`` is a module or the trainer's :class:`StepModel` (compiled forward); ``tta="flip"``
    scores the mean logits of each image and its mirror image (see :func:`eval_logits`).
    """
    (model.eager if isinstance(model, StepModel) else model).eval()
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
            logits = eval_logits(model, x, tta)
        loss_sum += criterion(logits.float(), y) * y.shape[0]
        # index_add_, not bincount: CUDA's bincount reads min/max back to the host every call
        cell = y * num_classes + logits.argmax(1)
        confusion.index_add_(0, cell, torch.ones_like(cell))
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


def first_batch(loader):
    """The first batch of the loader's current epoch. The loaders draw order and augmentation
    from generators seeded by (seed, epoch) alone, so this costs the epoch nothing; the
    streaming path's DataLoader draws a worker base seed from the global RNG, which the caller
    restores."""
    it = iter(loader)
    try:
        return next(it)
    finally:
        close = getattr(it, "close", None)  # a generator: end it now (workers reset on next iter)
        if close is not None:
            close()


def _last_batch_size(loader, limit: int | None) -> int | None:
    """The size of the loader's last batch when it is partial and reached, else ``None``."""
    n, bs = getattr(loader, "num_samples", None), getattr(loader, "batch_size", None)
    if not n or not bs or n % bs == 0 or n < bs:
        return None
    if limit is not None and limit < len(loader):
        return None  # evaluation stops before the partial batch
    return n % bs


def _cudagraph_skips() -> int:
    """How many compiled graphs inductor has run without CUDA graphs so far (its counter)."""
    from torch._dynamo.utils import counters

    return counters["inductor"]["cudagraph_skips"]


def compile_warmup(train_model: StepModel, train_loader, eval_model: StepModel | None,
                   eval_loader, criterion, rt: Runtime, *, freeze: FreezePlan | None = None,
                   tta: str = "none", eval_limit: int | None = None) -> float:
    """Compile what the run will execute, before its first epoch; return the seconds it took.

    Runs one forward + backward in train mode (frozen modules in eval, as ``train_one_epoch``
    sets them) on the first training batch, under the run's autocast, and one no-grad forward
    in eval mode (with the run's TTA) on the first batch of ``eval_loader``. Compiled shapes:
    the training batch size (the train loader drops its last partial batch, so it is the only
    training shape), the eval batch size and, when the eval split is not a multiple of it (and
    ``eval_limit`` does not stop short of it), the size of its last batch - every static shape
    validation will run (a test split of another size costs one compile at the end).

    Leaves no trace: no optimizer step, gradients set to ``None``, every buffer (BatchNorm
    running statistics, ``num_batches_tracked``) and the CPU/CUDA/Python RNG states restored,
    so the run's numbers are those of a run without warm-up. A compile failure falls back to
    eager with one warning (the time returned is then the failed attempt's).
    """
    models = [m for m in (train_model, eval_model) if m is not None]
    if not any(m.compiled for m in models):
        return 0.0
    modules = {id(m.eager): m.eager for m in models}.values()
    saved = [(b, b.detach().clone()) for mod in modules for b in mod.buffers()]
    rng = rng_state()
    train_batch = first_batch(train_loader)
    eval_batch = None if eval_model is None or eval_loader is None else first_batch(eval_loader)
    if rt.device.type == "cuda":
        torch.cuda.synchronize(rt.device)
    skips = _cudagraph_skips()
    t0 = time.perf_counter()
    try:
        x, y = train_batch
        set_train_mode(train_model.eager, freeze)
        with rt.autocast():
            loss = criterion(train_model(x), y)
        try:
            # The backward graph compiles lazily, on the first backward. Unscaled: a GradScaler
            # multiplies the loss outside the compiled graph, so the graph is the same.
            loss.backward()
        except Exception as e:  # noqa: BLE001  (same fallback as a failing forward)
            if not train_model.compiled:
                raise
            train_model._fallback(e)
        if eval_model is not None and not train_model.compiled and eval_model.compiled:
            eval_model._fallback(None)  # the same compiler would fail again: warned once above
        if eval_batch is not None:
            eval_model.eager.eval()
            last = _last_batch_size(eval_loader, eval_limit)
            with torch.no_grad(), rt.autocast():
                eval_logits(eval_model, eval_batch[0], tta)
                if last is not None and last < eval_batch[0].shape[0]:
                    eval_logits(eval_model, eval_batch[0][:last], tta)
        if rt.device.type == "cuda":
            torch.cuda.synchronize(rt.device)
        skipped = _cudagraph_skips() - skips
        graphed = [m for m in models if m.cudagraphs and m.compiled]
        # on the CPU inductor counts every graph as a skipped CUDA graph: there are none to skip
        if skipped and graphed and rt.device.type == "cuda":
            # inductor logs why only with TORCH_LOGS=cudagraphs; the run stays compiled
            warnings.warn(f"CUDA graphs skipped for {skipped} compiled graph(s): compile_mode="
                          f"{graphed[0].mode} runs those without them (TORCH_LOGS=cudagraphs "
                          f"says why)")
        return time.perf_counter() - t0
    finally:
        train_model.eager.zero_grad(set_to_none=True)
        with torch.no_grad():
            for buf, value in saved:
                buf.copy_(value)
        set_rng_state(rng)
