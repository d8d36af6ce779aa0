"""Early stopping on a monitored epoch metric (``trainer.early_stopping``)."""

from __future__ import annotations

import math

# The epoch metrics it can watch (keys of metrics.jsonl); config.validate rejects others.
MONITORS = ("val/acc", "val/loss", "train/acc", "train/loss")


def mode(monitor: str, setting: str) -> str:
    """``max`` or ``min`` for ``monitor``; ``auto``: a loss falls, an accuracy rises."""
    if setting != "auto":
        return setting
    return "min" if monitor.endswith("loss") else "max"


def improved(value: float, best: float | None, mode: str, min_delta: float) -> bool:
    """Whether ``value`` beats ``best`` by more than ``min_delta``; NaN never improves."""
    if value is None or not math.isfinite(value):
        return False
    if best is None:
        return True
    return value > best + min_delta if mode == "max" else value < best - min_delta


def check(cfg, record: dict, state) -> str | None:
    """Update ``state.es_best``/``state.es_wait`` from this epoch's record; return a stop reason."""
    if cfg is None or cfg.get("patience") is None:
        return None
    value = record.get(cfg.monitor)
    if improved(value, state.es_best, mode(cfg.monitor, cfg.get("mode", "auto")), cfg.min_delta):
        state.es_best, state.es_wait = value, 0
        return None
    state.es_wait += 1
    return exhausted(cfg, state)


def exhausted(cfg, state) -> str | None:
    """The stop reason when ``state.es_wait`` has used up the patience, else ``None``."""
    if cfg is None or cfg.get("patience") is None or state.es_wait < cfg.patience:
        return None
    # es_wait counts the epochs since the last improvement, so that one was epoch - wait
    best = ("no finite value yet" if state.es_best is None else
            f"best {state.es_best} at epoch {state.epoch - state.es_wait}")
    return (f"early stopping at epoch {state.epoch}: {cfg.monitor} did not improve by more "
            f"than {cfg.min_delta} for {cfg.patience} epochs ({best})")
