"""SpeedNet: a compact VGG-style network for fast CIFAR-scale training (the project's own).

Shaped after the airbench speedrun network: a 3x3 stem, then stages of
conv -> max-pool -> BN -> GELU -> conv -> BN -> GELU, global max pool and a linear head.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from cnn_bench.models.layers import check_stem, check_width_mult, make_divisible
from cnn_bench.models.registry import register_model


class SpeedBlock(nn.Module):
    """conv3x3 -> max-pool 2 -> BN -> GELU -> conv3x3 -> BN -> GELU (halves the resolution)."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
        self.pool = nn.MaxPool2d(2)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.bn1(self.pool(self.conv1(x))))
        return self.act(self.bn2(self.conv2(x)))


class SpeedNet(nn.Module):
    """Stem + len(widths) SpeedBlocks + global max pool + linear classifier."""

    def __init__(self, widths: Sequence[int] = (64, 256, 256), stem_width: int = 24,
                 num_classes: int = 10, width_mult: float = 1.0, stem: str = "cifar",
                 head_scale: float = 1 / 9):
        super().__init__()
        check_stem(stem)
        check_width_mult(width_mult)
        widths = [make_divisible(w * width_mult) for w in widths]
        stem_width = make_divisible(stem_width * width_mult)
        # NOTE: stem="imagenet" adds a stride-2 conv and a max-pool (4x downsampling) so 224 px
        # inputs cost about what 56 px would; the network was designed for 32 px.
        stem_stride = 2 if stem == "imagenet" else 1
        self.stem = nn.Sequential(
            nn.Conv2d(3, stem_width, 3, stem_stride, 1, bias=False),
            nn.BatchNorm2d(stem_width),
            nn.GELU(),
            *([nn.MaxPool2d(3, 2, 1)] if stem == "imagenet" else []),
        )
        chans = [stem_width, *widths]
        self.stages = nn.Sequential(*(SpeedBlock(a, b) for a, b in zip(chans[:-1], chans[1:])))
        self.pool = nn.AdaptiveMaxPool2d(1)
        self.fc = nn.Linear(widths[-1], num_classes, bias=False)
        # airbench scales the logits down: large max-pooled features otherwise saturate softmax.
        self.head_scale = head_scale
        self.num_features = widths[-1]
        self.classifier_name = "fc"
        self.stage_names = [f"stages.{i}" for i in range(len(self.stages))]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(self.stem(x))

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(x), 1)) * self.head_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _speednet(widths: Sequence[int], stem_width: int, num_classes: int, width_mult: float,
              stem: str) -> SpeedNet:
    return SpeedNet(widths, stem_width, num_classes, width_mult, stem)


@register_model
def speednet(num_classes: int = 10, width_mult: float = 1.0, stem: str = "cifar") -> SpeedNet:
    """SpeedNet with airbench94's widths (64, 256, 256): the CIFAR-10 speedrun network."""
    return _speednet((64, 256, 256), 24, num_classes, width_mult, stem)


@register_model
def speednet_s(num_classes: int = 10, width_mult: float = 1.0, stem: str = "cifar") -> SpeedNet:
    """A quarter-width SpeedNet (32, 64, 128): the CPU-friendly default model."""
    return _speednet((32, 64, 128), 16, num_classes, width_mult, stem)
