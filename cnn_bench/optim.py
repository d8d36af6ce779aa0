"""Optimizers and per-step learning-rate schedules built from the ``optimizer``/``scheduler`` groups."""

from __future__ import annotations

import math

import torch
from torch import nn

from cnn_bench.errors import CnnBenchError, did_you_mean

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULERS = ("none", "cosine", "step", "onecycle")


NORM_LAYERS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, nn.GroupNorm,
               nn.LayerNorm)


def param_groups(model: nn.Module, weight_decay: float, head_lr_mult: float = 1.0,
                 norm_bias_lr_mult: float = 1.0, decay_norm_and_bias: bool = False) -> list[dict]:
    """Trainable parameters only; no weight decay on BN/bias (1-d) parameters unless
    ``decay_norm_and_bias``, which decays them by as much per step as the weights (the
    normalisation shifts' decay divided by their lr multiplier: airbench's convention), nor on
    what the model's ``no_weight_decay()`` names (timm's ViT tokens and position embeddings:
    timm's train.py leaves them undecayed too).

    ``head_lr_mult`` scales the classifier's lr (the module named by ``model.classifier_name``),
    ``norm_bias_lr_mult`` the lr of normalisation layers' shifts (BatchNorm/GroupNorm/LayerNorm
    biases; not their scales, not conv/linear biases). Each group keeps its ``lr_mult``, so
    ``base_lr`` can read the schedule's lr back.
    """
    head_prefix = getattr(model, "classifier_name", None)
    no_decay = _no_weight_decay_names(model)
    norm_biases = {id(m.bias) for m in model.modules()
                   if isinstance(m, NORM_LAYERS) and getattr(m, "bias", None) is not None}
    groups: dict[tuple[bool, bool, bool], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        is_head = bool(head_prefix) and (name == head_prefix or name.startswith(head_prefix + "."))
        is_norm_bias = norm_bias_lr_mult != 1.0 and id(p) in norm_biases
        decays = (p.ndim > 1 or decay_norm_and_bias) and name not in no_decay
        key = (decays, is_head and head_lr_mult != 1.0, is_norm_bias)
        groups.setdefault(key, []).append(p)
    return [
        {"params": ps,
         # coupled decay moves a parameter by lr * decay per step: divided by the shifts' lr
         # multiplier, theirs moves as much as the weights'
         "weight_decay": (weight_decay / (norm_bias_lr_mult if norm_bias else 1.0)) if decay else 0.0,
         "lr_mult": (head_lr_mult if head else 1.0) * (norm_bias_lr_mult if norm_bias else 1.0)}
        for (decay, head, norm_bias), ps in sorted(groups.items())
    ]


def _no_weight_decay_names(model: nn.Module) -> set[str]:
    """Parameter names a timm model asks to keep undecayed, for the model or the library model
    a passthrough wraps (as ``model.``)."""
    names: set[str] = set()
    for prefix, m in (("", model), ("model.", getattr(model, "model", None))):
        fn = getattr(m, "no_weight_decay", None)
        if isinstance(m, nn.Module) and callable(fn):
            names |= {prefix + n for n in fn()}
    return names


def base_lr(optimizer: torch.optim.Optimizer) -> float:
    """The scheduled lr before per-group multipliers (what the logs call ``lr``); 0 when every
    group's multiplier is 0."""
    for group in optimizer.param_groups:
        if group.get("lr_mult", 1.0):
            return group["lr"] / group.get("lr_mult", 1.0)
    return 0.0


def build_optimizer(cfg, model: nn.Module, device: torch.device) -> torch.optim.Optimizer:
    """SGD (momentum/nesterov), Adam or AdamW over the model's trainable parameters."""
    name = cfg.name
    if name not in OPTIMIZERS:
        raise CnnBenchError(f"unknown optimizer '{name}': {did_you_mean(name, OPTIMIZERS)}")
    groups = param_groups(model, cfg.weight_decay, cfg.get("head_lr_mult", 1.0),
                          cfg.get("norm_bias_lr_mult", 1.0), cfg.get("decay_norm_and_bias", False))
    if not groups:
        raise CnnBenchError("the model has no trainable parameters: check finetune settings")
    for g in groups:
        g["lr"] = cfg.lr * g["lr_mult"]
    # foreach kernels batch the per-parameter updates; fused ones exist for CUDA Adam(W)/SGD.
    fast = {"fused": True} if device.type == "cuda" else {"foreach": True}
    if name == "sgd":
        opt = torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum,
                              nesterov=cfg.nesterov and cfg.momentum > 0, **fast)
        if fast.get("fused") and cfg.momentum > 0:
            # NOTE: fused SGD allocates its momentum with empty_like on the first step, and a
            # step GradScaler skips (fp16 overflow, usual at the start) leaves it uninitialised
            # but stored: the next step adds garbage. Zeros give the same first update (g).
            for p in (p for g in opt.param_groups for p in g["params"]):
                opt.state[p]["momentum_buffer"] = torch.zeros_like(p)
        return opt
    cls = torch.optim.Adam if name == "adam" else torch.optim.AdamW
    return cls(groups, lr=cfg.lr, betas=tuple(cfg.betas), **fast)


def load_optimizer_state(optimizer: torch.optim.Optimizer, state_dict: dict) -> None:
    """``optimizer.load_state_dict``, then each per-parameter state tensor in its parameter's
    memory layout: loading casts dtype and device but keeps the saved strides, and the fused
    CUDA kernels refuse momentum/moments whose layout differs from the parameter's (a run saved
    NCHW, e.g. on CPU, resumed channels_last on a GPU)."""
    optimizer.load_state_dict(state_dict)
    with torch.no_grad():
        for p, st in optimizer.state.items():
            for k, v in st.items():
                if torch.is_tensor(v) and v.shape == p.shape and v.stride() != p.stride():
                    st[k] = torch.empty_like(p, dtype=v.dtype).copy_(v)


def lr_factor(cfg, step: int, total_steps: int, steps_per_epoch: int) -> float:
    """Multiplier of the base lr at ``step`` (0-based): linear warmup, then the named schedule."""
    warmup = round(cfg.get("warmup_epochs", 0.0) * steps_per_epoch)
    if step < warmup:
        start = cfg.get("warmup_start_factor", 0.1)
        return start + (1 - start) * step / warmup
    name = cfg.name
    if name == "none":
        return 1.0
    if name == "cosine":
        t = (step - warmup) / max(1, total_steps - warmup)
        lo = cfg.get("min_lr_factor", 0.0)
        return lo + (1 - lo) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))
    if name == "step":
        return cfg.gamma ** (step // max(1, round(cfg.step_epochs * steps_per_epoch)))
    if name == "onecycle":
        # Linear up from lr/div_factor to lr over pct_start, then linear down to the final lr.
        peak = max(1, round(cfg.pct_start * total_steps))
        start = 1 / cfg.div_factor
        end = start / cfg.final_div_factor
        if step < peak:
            return start + (1 - start) * step / peak
        t = (step - peak) / max(1, total_steps - peak)
        return 1 + (end - 1) * min(1.0, t)
    raise CnnBenchError(f"unknown scheduler '{name}': {did_you_mean(name, SCHEDULERS)}")


def build_scheduler(cfg, optimizer: torch.optim.Optimizer, steps_per_epoch: int, epochs: int):
    """A ``LambdaLR`` stepped once per optimizer step.

    A closure (not a callable object) keeps the state dict to plain numbers, so checkpoints load
    with ``weights_only=True``; the schedule itself is rebuilt from the config on resume.
    """
    if cfg.name not in SCHEDULERS:
        raise CnnBenchError(f"unknown scheduler '{cfg.name}': {did_you_mean(cfg.name, SCHEDULERS)}")
    total = max(1, steps_per_epoch * epochs)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(cfg, step, total, steps_per_epoch)
    )


def load_scheduler_state(scheduler: torch.optim.lr_scheduler.LambdaLR, state_dict: dict) -> None:
    """``scheduler.load_state_dict``, then the rebuilt schedule's lr at the step reached.

    The optimizer's saved lr is the old schedule's next one; ``LambdaLR`` applies its (rebuilt)
    lambda only at the next ``step()``. After a resume with more ``trainer.epochs`` the first
    step would train at the old schedule's end (0 for cosine): set it from the new one now.
    """
    scheduler.load_state_dict(state_dict)
    groups = scheduler.optimizer.param_groups
    for g, base, lam in zip(groups, scheduler.base_lrs, scheduler.lr_lambdas):
        g["lr"] = base * lam(scheduler.last_epoch)
    scheduler._last_lr = [g["lr"] for g in groups]
