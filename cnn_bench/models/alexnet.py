"""AlexNet: torchvision's layout (``alexnet``) and the 2012 paper's network (``alexnet_v1``).

Krizhevsky, Sutskever & Hinton, "ImageNet Classification with Deep Convolutional Neural
Networks", NeurIPS 2012. torchvision's ``alexnet`` (the one with pretrained weights) is the
single-tower variant of Krizhevsky's "One weird trick" (2014): widths 64-192-384-256-256, no
local response normalization. ``alexnet_v1`` is the paper's: 96-256-384-384-256 with LRN.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from cnn_bench.errors import CnnBenchError
from cnn_bench.models.layers import check_stem, check_width_mult, init_weights, make_divisible
from cnn_bench.models.registry import register_model

# The paper's LRN constants: k=2, n=5, alpha=1e-4, beta=0.75. The paper divides by
# (k + alpha * sum a^2)^beta; nn.LocalResponseNorm divides alpha by n, so it gets alpha * n.
_LRN = dict(size=5, alpha=1e-4 * 5, beta=0.75, k=2.0)


class AlexNet(nn.Module):
    """Five convs (ReLU, optional LRN after conv1/conv2, overlapping 3x3/2 max-pools after conv1,
    conv2 and conv5) -> adaptive average pool to 6x6 -> dropout/linear/ReLU x2 -> linear."""

    def __init__(self, widths: Sequence[int] = (64, 192, 384, 256, 256), num_classes: int = 1000,
                 stem: str = "imagenet", width_mult: float = 1.0, hidden: int = 4096,
                 lrn: bool = False, groups: int = 1, dropout: float = 0.5):
        super().__init__()
        check_stem(stem)
        check_width_mult(width_mult)
        if not isinstance(groups, int) or groups < 1:
            raise CnnBenchError(f"model.groups must be an integer >= 1, got {groups!r}")
        w = [make_divisible(c * width_mult, 8 * groups) for c in widths]
        hidden = make_divisible(hidden * width_mult, 8)
        if stem == "imagenet":
            # NOTE: padding 2 gives the paper's 55x55 conv1 map from 224 px (the paper's
            # arithmetic only works for 227 px without padding).
            conv1 = nn.Conv2d(3, w[0], kernel_size=11, stride=4, padding=2)
            pool = lambda: nn.MaxPool2d(kernel_size=3, stride=2)  # noqa: E731
            # conv1 -> 55 px, pools -> 27, 13, 6 at 224 px; below 63 px the last pool has no input.
            self.min_size = 63
        else:
            # NOTE: cifar stem: an 11x11/4 conv and three unpadded pools collapse 32 px to nothing,
            # so conv1 is 3x3/1 and the (still overlapping) 3x3/2 pools are padded, halving the map
            # exactly: 32 -> 16 -> 8 -> 4 px.
            conv1 = nn.Conv2d(3, w[0], kernel_size=3, stride=1, padding=1)
            pool = lambda: nn.MaxPool2d(kernel_size=3, stride=2, padding=1)  # noqa: E731
            self.min_size = 1
        norm = (lambda: [nn.LocalResponseNorm(**_LRN)]) if lrn else (lambda: [])
        # NOTE: the paper split conv2, conv4 and conv5 into two groups, one per GPU (groups=2);
        # the default groups=1 is the single-GPU network every reimplementation trains.
        layers: list[nn.Module] = [
            conv1, nn.ReLU(inplace=True), *norm(), pool(),
            nn.Conv2d(w[0], w[1], kernel_size=5, padding=2, groups=groups), nn.ReLU(inplace=True),
            *norm(), pool(),
            nn.Conv2d(w[1], w[2], kernel_size=3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(w[2], w[3], kernel_size=3, padding=1, groups=groups), nn.ReLU(inplace=True),
            nn.Conv2d(w[3], w[4], kernel_size=3, padding=1, groups=groups), nn.ReLU(inplace=True),
            pool(),
        ]
        self.features = nn.Sequential(*layers)
        # Adaptive, so any resolution gives the 6x6 map the classifier expects (at 32 px with the
        # cifar stem the 4x4 map is replicated up to 6x6; the classifier stays the paper's).
        self.avgpool = nn.AdaptiveAvgPool2d((6, 6))
        self.classifier = nn.Sequential(
            nn.Dropout(p=dropout),
            nn.Linear(w[4] * 6 * 6, hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(p=dropout),
            nn.Linear(hidden, hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, num_classes),
        )
        self.num_features = w[4]
        self.classifier_name = "classifier.6"
        # conv1 (+ its pool) is the stem; the stages are conv2..conv5 and the two hidden linear
        # layers (fc6, fc7), so unfreezing every stage leaves nothing but the stem frozen.
        self.stage_names = [f"features.{i}" for i, m in enumerate(self.features)
                            if isinstance(m, nn.Conv2d)][1:] + ["classifier.1", "classifier.4"]
        init_weights(self)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        if min(x.shape[-2:]) < self.min_size:
            raise CnnBenchError(f"AlexNet's imagenet stem needs inputs of at least {self.min_size} px, "
                                f"got {tuple(x.shape[-2:])}: use model.stem=cifar, or (pretrained "
                                f"weights need this stem) dataset.resolution={self.min_size} or more")
        return self.features(x)

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(x), 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _alexnet(widths: Sequence[int], num_classes: int, stem: str, width_mult: float, **kw) -> AlexNet:
    return AlexNet(widths, num_classes, stem, width_mult, **kw)


@register_model
def alexnet(num_classes: int = 1000, stem: str = "imagenet", width_mult: float = 1.0,
            dropout: float = 0.5) -> AlexNet:
    """torchvision's AlexNet (64-192-384-256-256, no LRN); state-dict compatible with it."""
    return _alexnet((64, 192, 384, 256, 256), num_classes, stem, width_mult, dropout=dropout)


@register_model
def alexnet_v1(num_classes: int = 1000, stem: str = "imagenet", width_mult: float = 1.0,
               dropout: float = 0.5, lrn: bool = True, groups: int = 1) -> AlexNet:
    """The 2012 paper's AlexNet: 96-256-384-384-256 convs, LRN, overlapping pools, dropout 0.5."""
    return _alexnet((96, 256, 384, 384, 256), num_classes, stem, width_mult, dropout=dropout,
                    lrn=lrn, groups=groups)
