"""Model size and cost: parameter counts and forward FLOPs."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def count_params(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (each shared tensor once); only ``requires_grad`` ones if asked."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def count_flops(model: nn.Module, resolution: int) -> int:
    """Forward FLOPs for one ``resolution`` x ``resolution`` RGB image (batch 1, eval mode, no grad).

    Counted by ``torch.utils.flop_counter.FlopCounterMode``: convolutions and matrix products
    only (not BN, activations, pooling or additions), and a multiply-add counts as 2 FLOPs, so
    multiply-adds (MACs, the papers' "mult-adds") = FLOPs / 2. Each module's train/eval mode is
    restored afterwards.
    """
    modes = {m: m.training for m in model.modules()}
    p = next(model.parameters(), None)
    x = torch.zeros(1, 3, resolution, resolution, device=p.device if p is not None else None,
                    dtype=p.dtype if p is not None and p.is_floating_point() else None)
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(x)
    finally:
        for m, training in modes.items():
            m.training = training
    return int(counter.get_total_flops())
