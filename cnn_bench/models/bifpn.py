"""RegNet + BiFPN classifier, a student study's model.

A RegNet backbone's stage outputs C3-C5 (strides 8, 16, 32 with the imagenet stem) become P3-P5
through 1x1 lateral convs; P6 and P7 come from stride-2 3x3 convs on C5 and P6 (as RetinaNet).
``num_layers`` BiFPN blocks (Tan et al., "EfficientDet", CVPR 2020) mix the five levels with fast
normalized fusion, then a head classifies: ``pooled`` (global average pool of every level,
averaged over levels, then a linear layer) or ``study`` (the study's concat + conv + MLP head).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cnn_bench.errors import CnnBenchError
from cnn_bench.models.layers import (ConvBNAct, check_choice, check_stem, check_width_mult,
                                     init_weights, make_divisible)
from cnn_bench.models.regnet import VARIANTS, RegNet
from cnn_bench.models.registry import register_model

HEADS = ("pooled", "study")


def _resize(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Bring ``x`` to ``like``'s spatial size: nearest upsampling or max pooling.

    Sizes, not factors of 2: odd inputs give levels like 7 -> 4 -> 2 -> 1 -> 1.
    """
    size = like.shape[-2:]
    if x.shape[-2:] == size:
        return x
    if x.shape[-2] < size[0]:
        return F.interpolate(x, size=size, mode="nearest")
    return F.adaptive_max_pool2d(x, size)


class FastNormalizedFusion(nn.Module):
    """sum_i w_i * x_i / (sum_j w_j + eps) with w = relu(weight), then SiLU -> separable conv -> BN.

    ``weight`` starts at ones. The ReLU is applied out of place on every forward, so the
    effective weights stay non-negative without ever modifying the parameter in place.
    """

    def __init__(self, num_inputs: int, channels: int, eps: float = 1e-4):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_inputs))
        self.eps = eps
        self.act = nn.SiLU()
        self.conv = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1, groups=channels, bias=False),
            nn.Conv2d(channels, channels, 1, bias=False),
            nn.BatchNorm2d(channels),
        )

    def fusion_weights(self) -> torch.Tensor:
        w = F.relu(self.weight)
        return w / (w.sum() + self.eps)

    def forward(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        w = self.fusion_weights()
        fused = (w.view(-1, 1, 1, 1, 1) * torch.stack(inputs)).sum(0)
        return self.conv(self.act(fused))


class BiFPNLayer(nn.Module):
    """One BiFPN block over levels fine -> coarse: a top-down pass, then a bottom-up pass whose
    intermediate nodes also take the level's input (the cross-scale skip)."""

    def __init__(self, channels: int, num_levels: int = 5):
        super().__init__()
        self.top_down = nn.ModuleList(FastNormalizedFusion(2, channels)
                                      for _ in range(num_levels - 1))
        self.bottom_up = nn.ModuleList(FastNormalizedFusion(3 if i < num_levels - 1 else 2, channels)
                                       for i in range(1, num_levels))

    def forward(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        n = len(feats)
        td = list(feats)
        for i in range(n - 2, -1, -1):
            td[i] = self.top_down[i]([feats[i], _resize(td[i + 1], feats[i])])
        out = [td[0]]
        for i in range(1, n):
            down = _resize(out[-1], feats[i])
            inputs = [feats[i], td[i], down] if i < n - 1 else [feats[i], down]
            out.append(self.bottom_up[i - 1](inputs))
        return out


class BiFPNNeck(nn.Module):
    """C3-C5 -> laterals P3-P5, P6 = conv3x3/2(C5), P7 = conv3x3/2(relu(P6)) -> BiFPN layers."""

    def __init__(self, in_channels: list[int], channels: int, num_layers: int):
        super().__init__()
        self.laterals = nn.ModuleList(ConvBNAct(c, channels, 1, act=None) for c in in_channels)
        # On a 1x1 C5 (32 px inputs) these give 1x1 maps: padding 1 keeps the 3x3/2 conv valid.
        self.p6 = ConvBNAct(in_channels[-1], channels, 3, 2, act=None)
        self.p7 = nn.Sequential(nn.ReLU(), ConvBNAct(channels, channels, 3, 2, act=None))
        self.layers = nn.Sequential(*(BiFPNLayer(channels, 5) for _ in range(num_layers)))

    def forward(self, cs: list[torch.Tensor]) -> list[torch.Tensor]:
        ps = [lat(c) for lat, c in zip(self.laterals, cs)]
        p6 = self.p6(cs[-1])
        ps += [p6, self.p7(p6)]
        return self.layers(ps)


class PooledHead(nn.Module):
    """Global average pool of each level, mean over levels, dropout, ``fc``."""

    def __init__(self, channels: int, num_classes: int, dropout: float = 0.2):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        pooled = torch.stack([f.mean(dim=(-2, -1)) for f in feats]).mean(0)
        return self.fc(self.dropout(pooled))


class StudyHead(nn.Module):
    """The study's head: upsample every level to P3's size, concat, 3x3 conv, flatten, 2-layer MLP."""

    def __init__(self, channels: int, num_classes: int, num_levels: int = 5, pool_size: int = 4,
                 hidden: int = 256, dropout: float = 0.5):
        super().__init__()
        self.conv = ConvBNAct(channels * num_levels, channels, 3)
        # NOTE: the study flattened the whole P3 map, so its MLP only fit one input size (and
        # overfit: P3 is 28x28 at 224 px); pooling to a fixed pool_size x pool_size first makes
        # the head work at any resolution.
        self.pool = nn.AdaptiveAvgPool2d(pool_size)
        self.mlp = nn.Sequential(
            nn.Linear(channels * pool_size * pool_size, hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        x = torch.cat([feats[0], *(_resize(f, feats[0]) for f in feats[1:])], dim=1)
        return self.mlp(torch.flatten(self.pool(self.conv(x)), 1))


class RegNetBiFPN(nn.Module):
    """``backbone`` (RegNet trunk) -> ``neck`` (laterals, P6/P7, BiFPN) -> ``head``.

    ``forward_features`` returns the list of five pyramid levels P3..P7 (fine to coarse).
    """

    def __init__(self, num_classes: int = 1000, stem: str = "imagenet", width_mult: float = 1.0,
                 backbone: str = "regnetx_400mf", feature_size: int = 64, num_layers: int = 3,
                 head: str = "pooled"):
        super().__init__()
        check_stem(stem)
        check_width_mult(width_mult)
        check_choice("backbone", backbone, VARIANTS)
        check_choice("head", head, HEADS)
        if num_layers < 1:
            raise CnnBenchError(f"model.num_layers must be >= 1, got {num_layers}")
        if feature_size < 1:
            raise CnnBenchError(f"model.feature_size must be >= 1 (channels), got {feature_size}")
        # width_mult scales the backbone and the pyramid width alike.
        channels = make_divisible(feature_size * width_mult, 8)
        self.backbone = RegNet(VARIANTS[backbone], num_classes=0, stem=stem, width_mult=width_mult)
        self.neck = BiFPNNeck(self.backbone.stage_widths[1:], channels, num_layers)
        if head == "pooled":
            self.head: nn.Module = PooledHead(channels, num_classes)
            self.classifier_name = "head.fc"
        else:
            self.head = StudyHead(channels, num_classes)
            self.classifier_name = "head.mlp.3"
        self.num_features = channels
        self.stage_names = [f"backbone.{s}" for s in self.backbone.stage_names] + ["neck"]
        if head == "study":
            # The study head's hidden layers come after the neck, so they unfreeze as stages.
            self.stage_names += ["head.conv", "head.mlp.0"]
        init_weights(self)

    def forward_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.neck(self.backbone.forward_stages(x)[1:])

    def forward_head(self, feats: list[torch.Tensor]) -> torch.Tensor:
        return self.head(feats)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _regnet_bifpn(num_classes: int, stem: str, width_mult: float, backbone: str,
                  feature_size: int, num_layers: int, head: str) -> RegNetBiFPN:
    return RegNetBiFPN(num_classes, stem, width_mult, backbone, feature_size, num_layers, head)


@register_model
def regnet_bifpn(num_classes: int = 1000, stem: str = "imagenet", width_mult: float = 1.0,
                 backbone: str = "regnetx_400mf", feature_size: int = 64, num_layers: int = 3,
                 head: str = "pooled") -> RegNetBiFPN:
    """The study's RegNet + BiFPN classifier; ``backbone`` is any RegNet name in this zoo."""
    return _regnet_bifpn(num_classes, stem, width_mult, backbone, feature_size, num_layers, head)
