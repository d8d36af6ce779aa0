"""MobileNet v2 (Sandler et al., "MobileNetV2: Inverted Residuals and Linear Bottlenecks", CVPR 2018)
and ``c_mobilenet_v2``, a student study's variant with a residual path in every block.

Module names follow torchvision's, so with ``stem="imagenet"`` and ``width_mult=1`` a torchvision
MobileNetV2's state dict loads into ``mobilenet_v2`` with ``strict=True``.
At 224 px and width 1.0: 3.5M params, 300M multiply-adds.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn

from cnn_bench.models.layers import (ConvBNAct, check_stem, check_width_mult, init_weights,
                                     make_divisible)
from cnn_bench.models.registry import register_model

# (expansion t, width c, repeats n, first stride s), the paper's Table 2.
_SETTINGS = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
             (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]


class InvertedResidual(nn.Module):
    """1x1 expand -> 3x3 depthwise -> 1x1 linear projection (no activation: the linear bottleneck).

    The input is added back only when the shapes match (stride 1 and cin == cout).
    """

    def __init__(self, cin: int, cout: int, stride: int, expand_ratio: int):
        super().__init__()
        hidden = int(round(cin * expand_ratio))
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(ConvBNAct(cin, hidden, 1, act=nn.ReLU6))
        layers += [
            ConvBNAct(hidden, hidden, 3, stride, groups=hidden, act=nn.ReLU6),
            nn.Conv2d(hidden, cout, 1, bias=False),
            nn.BatchNorm2d(cout),
        ]
        self.conv = nn.Sequential(*layers)
        self.use_res_connect = stride == 1 and cin == cout
        self.out_channels = cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class CInvertedResidual(InvertedResidual):
    """The study's block: the same main branch, a shortcut on every block, LeakyReLU after the add.

    Where stride or width changes, the shortcut is a 1x1 conv (with the block's stride) + BN +
    ReLU6; elsewhere it is the identity.
    """

    def __init__(self, cin: int, cout: int, stride: int, expand_ratio: int,
                 negative_slope: float = 0.01):
        super().__init__(cin, cout, stride, expand_ratio)
        # NOTE: unlike the paper, every block has a residual path (a projection where the shape
        # changes) and the sum goes through a LeakyReLU: the study's modification.
        self.use_res_connect = True
        if stride == 1 and cin == cout:
            self.shortcut: nn.Module = nn.Identity()
        else:
            self.shortcut = ConvBNAct(cin, cout, 1, stride, act=nn.ReLU6)
        self.act = nn.LeakyReLU(negative_slope)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv(x) + self.shortcut(x))


class MobileNetV2(nn.Module):
    """``features`` (stem conv, 17 inverted-residual blocks, 1x1 conv to 1280) -> global average
    pool -> ``classifier`` (dropout, linear)."""

    def __init__(self, num_classes: int = 1000, stem: str = "imagenet", width_mult: float = 1.0,
                 dropout: float = 0.2, block: type[InvertedResidual] | partial = InvertedResidual):
        super().__init__()
        check_stem(stem)
        check_width_mult(width_mult)
        cin = make_divisible(32 * width_mult, 8)
        # The paper keeps the last conv at 1280 for alpha < 1 (it only widens it for alpha > 1).
        last = make_divisible(1280 * max(1.0, width_mult), 8)
        # NOTE: cifar stem: stride 1 instead of 2, so 32 px inputs end at 2x2 instead of 1x1.
        layers: list[nn.Module] = [ConvBNAct(3, cin, 3, 2 if stem == "imagenet" else 1,
                                             act=nn.ReLU6)]
        for t, c, n, s in _SETTINGS:
            cout = make_divisible(c * width_mult, 8)
            for i in range(n):
                layers.append(block(cin, cout, s if i == 0 else 1, t))
                cin = cout
        layers.append(ConvBNAct(cin, last, 1, act=nn.ReLU6))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.classifier = nn.Sequential(nn.Dropout(p=dropout), nn.Linear(last, num_classes))
        self.num_features = last
        self.classifier_name = "classifier.1"
        # The blocks of a flat ``features`` are the stages (features.0 is the stem; the last
        # entry is the 1x1 conv to 1280).
        self.stage_names = [f"features.{i}" for i in range(1, len(self.features))]
        init_weights(self)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(x), 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _mobilenet_v2(block: type[InvertedResidual] | partial, num_classes: int, stem: str,
                  width_mult: float, dropout: float) -> MobileNetV2:
    return MobileNetV2(num_classes, stem, width_mult, dropout, block)


@register_model
def mobilenet_v2(num_classes: int = 1000, stem: str = "imagenet", width_mult: float = 1.0,
                 dropout: float = 0.2) -> MobileNetV2:
    """MobileNet v2 with width multiplier alpha = ``width_mult`` (paper: 0.35 to 1.4)."""
    return _mobilenet_v2(InvertedResidual, num_classes, stem, width_mult, dropout)


@register_model
def c_mobilenet_v2(num_classes: int = 1000, stem: str = "imagenet", width_mult: float = 1.0,
                   dropout: float = 0.2, negative_slope: float = 0.01) -> MobileNetV2:
    """The study's MobileNet v2: residual path in every block, LeakyReLU after each add."""
    block = partial(CInvertedResidual, negative_slope=negative_slope)
    return _mobilenet_v2(block, num_classes, stem, width_mult, dropout)
