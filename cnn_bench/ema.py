"""An exponential moving average (EMA) of a model's weights, like timm's ``--model-ema``.

``trainer.ema_decay`` turns it on: after every optimizer step each floating tensor of the copy
moves towards the trained model's, ``ema = decay * ema + (1 - decay) * raw``. Validation, the
best-checkpoint choice, early stopping and the test accuracy then use the copy.

Not ``torch.optim.swa_utils.AveragedModel``: its ``update_parameters`` tests
``self.n_averaged == 0`` (a device tensor) in Python, a host sync on every step.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from cnn_bench.errors import CnnBenchError


def averaged_tensors(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """What weight averaging (EMA, Lookahead) averages, by state-dict name: the trainable
    parameters (detached) and the floating buffers (BatchNorm running statistics). Frozen
    parameters never move and integer buffers (``num_batches_tracked``) cannot be averaged."""
    params = [(n, p.detach()) for n, p in model.named_parameters() if p.requires_grad]
    return params + [(n, b) for n, b in model.named_buffers() if b.is_floating_point()]


class ModelEma:
    """An eval-only copy of ``model`` whose weights track the model's moving average.

    The pairs of tensors are taken once, here: the trainer updates the model's tensors in place
    (optimizer steps, ``load_state_dict``), so they stay the same objects for the whole run.
    Averaged: trainable parameters and floating buffers (BatchNorm running mean/var). Copied:
    integer buffers (``num_batches_tracked``). Left out: frozen parameters (``finetune``), which
    never move, so they stay equal in both copies.
    """

    def __init__(self, model: nn.Module, decay: float, warmup: bool = True):
        if not 0.0 <= decay < 1.0:
            raise CnnBenchError(f"trainer.ema_decay must be in [0, 1) or null, got {decay}")
        self.decay = float(decay)
        self.warmup = bool(warmup)
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        ema_state = self.module.state_dict(keep_vars=True)
        averaged = averaged_tensors(model)
        self._avg_src: list[torch.Tensor] = [t for _, t in averaged]
        self._avg_dst: list[torch.Tensor] = [ema_state[name].detach() for name, _ in averaged]
        self._copy: list[tuple[torch.Tensor, torch.Tensor]] = [
            (b, ema_state[name]) for name, b in model.named_buffers() if not b.is_floating_point()]

    def decay_at(self, step: int) -> float:
        """The decay of update number ``step`` (0-based): with ``warmup``,
        ``min(decay, (1 + step) / (10 + step))`` - 0.1 at the first update, 0.9 after 80 - so the
        average of a short run is not dominated by the initial weights."""
        if self.warmup:
            return min(self.decay, (1 + step) / (10 + step))
        return self.decay

    @torch.no_grad()
    def update(self, step: int) -> None:
        """One EMA update after optimizer step number ``step`` (0-based). No host sync: the
        decay is a Python float computed from a Python int."""
        weight = 1.0 - self.decay_at(step)  # lerp_(end, w): self + w * (end - self)
        if self._avg_dst:
            torch._foreach_lerp_(self._avg_dst, self._avg_src, weight)
        for src, dst in self._copy:
            dst.copy_(src)

    def state_dict(self) -> dict:
        """The averaged weights as a model state dict (what ``model_ema`` holds in checkpoints)."""
        return self.module.state_dict()

    def load_state_dict(self, state: dict) -> None:
        """Restore averaged weights saved by :meth:`state_dict` (in place: the pairs stay valid)."""
        self.module.load_state_dict(state)
