"""User-facing errors: printed as one line, never as a traceback."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class CnnBenchError(Exception):
    """A mistake the user can fix (bad name, bad path, bad data). The CLI prints it as one line."""


def did_you_mean(name: str, choices: Iterable[str], n: int = 3) -> str:
    """' (did you mean: a, b?)' for the closest choices, or a short list of valid ones."""
    choices = sorted(set(choices))
    close = difflib.get_close_matches(name, choices, n=n, cutoff=0.5)
    if close:
        return f"did you mean: {', '.join(close)}?"
    shown = ", ".join(choices[:12]) + (", ..." if len(choices) > 12 else "")
    return f"valid choices: {shown}"


def out_of_memory(e: Exception, cfg) -> str:
    """One line for a GPU out-of-memory error: the settings that size memory, and torch's
    first sentence (what it tried to allocate)."""
    from omegaconf import OmegaConf

    keys = ("trainer.batch_size", "trainer.eval_batch_size", "dataset.resolution", "batch_size")
    now = [f"{k}={v}" for k in keys if (v := OmegaConf.select(cfg, k, default=None)) is not None]
    first = ". ".join(str(e).strip().splitlines()[0].split(". ")[:2])
    return (f"out of GPU memory ({', '.join(now) or 'batch size'}): lower the batch size or the "
            f"resolution; torch: {first}")
