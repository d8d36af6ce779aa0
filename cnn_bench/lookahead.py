"""Lookahead (Zhang et al., 2019) as the airbench speedrun uses it: a slow copy of the weights
that the trained model is pulled back to every few optimizer steps.

``trainer.lookahead_every: k`` turns it on. After every k-th optimizer step (1-based count n)
``slow = slow + w * (model - slow)``, then ``model = slow``, with
``w = 1 - lookahead_decay * (n / total_steps) ** 3``: early in the run the slow copy simply follows
the model (w = 1), near the end it keeps ``lookahead_decay`` of itself per sync. After the run's
last step the model takes the slow weights, so validation, checkpoints and the test score them
(an early-stopped run ends where it stopped, on the weights its last validation scored).

Unlike EMA (``trainer.ema_decay``), this changes the trajectory of training itself, not only
the weights that are scored. Both can be on at once (the EMA then averages the pulled-back model).
"""

from __future__ import annotations

import torch
from torch import nn

from cnn_bench.ema import averaged_tensors
from cnn_bench.errors import CnnBenchError

# The pull-back grows as (progress) ** RAMP_POWER: airbench's schedule. A lower power would
# average over the high-lr phase, whose weights are far from where the run ends.
RAMP_POWER = 3


class Lookahead:
    """The slow weights of ``model``: its trainable parameters and floating buffers (BatchNorm
    running statistics), taken once; the trainer updates those tensors in place for the whole
    run, so the pairs stay valid (as in :class:`cnn_bench.ema.ModelEma`)."""

    def __init__(self, model: nn.Module, every: int, decay: float, total_steps: int):
        if not (isinstance(every, int) and every >= 1):
            raise CnnBenchError(f"trainer.lookahead_every must be an integer >= 1 or null, "
                                f"got {every!r}")
        if not 0.0 <= decay < 1.0:
            raise CnnBenchError(f"trainer.lookahead_decay must be in [0, 1), got {decay}")
        self.every, self.decay, self.total_steps = every, float(decay), max(1, int(total_steps))
        averaged = averaged_tensors(model)
        self.names: list[str] = [name for name, _ in averaged]
        self._fast: list[torch.Tensor] = [t for _, t in averaged]
        self._slow = [t.detach().clone() for t in self._fast]

    def decay_at(self, n: int) -> float:
        """The slow copy's decay at the sync after optimizer step ``n`` (1-based)."""
        return self.decay * min(1.0, n / self.total_steps) ** RAMP_POWER

    @torch.no_grad()
    def update(self, step: int) -> None:
        """Call after optimizer step number ``step`` (0-based). No host sync: the weight is a
        Python float."""
        n = step + 1
        if not self._fast:
            return
        if n % self.every == 0:
            torch._foreach_lerp_(self._slow, self._fast, 1.0 - self.decay_at(n))
            torch._foreach_copy_(self._fast, self._slow)
        elif n == self.total_steps:  # the run ends between syncs: it ends on the slow weights
            torch._foreach_copy_(self._fast, self._slow)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The slow weights by parameter/buffer name (what checkpoints hold as ``lookahead``)."""
        return dict(zip(self.names, self._slow))

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore slow weights saved by :meth:`state_dict` (a resumed run)."""
        missing = [n for n in self.names if n not in state]
        if missing:
            raise CnnBenchError(f"the checkpoint's lookahead weights lack {', '.join(missing[:3])}"
                                f": it was written for another model")
        for name, slow in zip(self.names, self._slow):
            slow.copy_(state[name])

    @torch.no_grad()
    def reset_to_model(self) -> None:
        """Start the slow weights from the model's current ones."""
        torch._foreach_copy_(self._slow, self._fast)
