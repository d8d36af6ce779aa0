"""MobileNet v1 (Howard et al., "MobileNets: Efficient Convolutional Neural Networks for Mobile
Vision Applications", 2017): a 3x3 conv then 13 depthwise-separable blocks.

At 224 px and width 1.0: 4.2M params, 569M multiply-adds (the paper's Table 1).
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from cnn_bench.models.layers import (ConvBNAct, check_stem, check_width_mult, init_weights,
                                     make_divisible)
from cnn_bench.models.registry import register_model

# (output width, stride) of each depthwise-separable block, the paper's Table 1.
_BLOCKS = [(64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2),
           *[(512, 1)] * 5, (1024, 2), (1024, 1)]


class DepthwiseSeparable(nn.Sequential):
    """3x3 depthwise conv (carries the stride) -> BN -> ReLU -> 1x1 pointwise conv -> BN -> ReLU."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__(OrderedDict(
            dw=ConvBNAct(cin, cin, 3, stride, groups=cin),
            pw=ConvBNAct(cin, cout, 1),
        ))


class MobileNetV1(nn.Module):
    """``features`` (stem conv + 13 blocks) -> global average pool -> ``fc``."""

    def __init__(self, num_classes: int = 1000, stem: str = "imagenet", width_mult: float = 1.0,
                 dropout: float = 0.0):
        super().__init__()
        check_stem(stem)
        check_width_mult(width_mult)
        cin = make_divisible(32 * width_mult, 8)
        # NOTE: cifar stem: stride 1 instead of 2, so 32 px inputs end at 2x2 instead of 1x1.
        layers: list[nn.Module] = [ConvBNAct(3, cin, 3, 2 if stem == "imagenet" else 1)]
        for width, stride in _BLOCKS:
            # Unlike v2, the last width scales with alpha too (1024 * alpha), as in the paper.
            cout = make_divisible(width * width_mult, 8)
            layers.append(DepthwiseSeparable(cin, cout, stride))
            cin = cout
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        # The paper uses no dropout; kept as an option (0 by default) for small data sets.
        self.dropout = nn.Dropout(p=dropout)
        self.fc = nn.Linear(cin, num_classes)
        self.num_features = cin
        self.classifier_name = "fc"
        # The blocks of a flat ``features`` are the stages (features.0 is the stem).
        self.stage_names = [f"features.{i}" for i in range(1, len(self.features))]
        init_weights(self)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.dropout(torch.flatten(self.avgpool(x), 1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _mobilenet_v1(num_classes: int, stem: str, width_mult: float, dropout: float) -> MobileNetV1:
    return MobileNetV1(num_classes, stem, width_mult, dropout)


@register_model
def mobilenet_v1(num_classes: int = 1000, stem: str = "imagenet", width_mult: float = 1.0,
                 dropout: float = 0.0) -> MobileNetV1:
    """MobileNet v1 with width multiplier alpha = ``width_mult`` (paper: 1.0, 0.75, 0.5, 0.25)."""
    return _mobilenet_v1(num_classes, stem, width_mult, dropout)
