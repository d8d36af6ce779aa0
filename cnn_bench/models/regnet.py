"""RegNetX / RegNetY (Radosavovic et al., "Designing Network Design Spaces", CVPR 2020).

A variant is data: the paper's (w0, wa, wm, depth, group width) plus the squeeze-excitation ratio
(RegNetY = RegNetX + SE 0.25). The per-stage widths and depths follow from the paper's quantized
linear rule (``RegNetSpec.stages``). Module names follow torchvision's, so with
``stem="imagenet"`` and ``width_mult=1`` a torchvision RegNet state dict loads with ``strict=True``.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import nn

from cnn_bench.models.layers import (ConvBNAct, check_stem, check_width_mult, init_weights,
                                     make_divisible)
from cnn_bench.models.registry import register_model

_QUANTUM = 8  # block widths are multiples of 8 channels


@dataclass(frozen=True)
class RegNetSpec:
    """One RegNet: initial width w0, slope wa, log-step wm, total depth, group width, SE ratio."""

    w0: int
    wa: float
    wm: float
    depth: int
    group_width: int
    se_ratio: float = 0.0

    def block_widths(self) -> list[int]:
        """Per-block widths: u_j = w0 + wa*j, snapped to w0 * wm^round(log_wm(u_j / w0)), /8."""
        widths = []
        for j in range(self.depth):
            u = self.w0 + self.wa * j
            s = round(math.log(u / self.w0) / math.log(self.wm))
            widths.append(int(round(self.w0 * self.wm ** s / _QUANTUM)) * _QUANTUM)
        return widths

    def stages(self, width_mult: float = 1.0) -> list[tuple[int, int, int]]:
        """(width, depth, group width) per stage: runs of equal block widths form a stage.

        ``width_mult`` scales each stage width (multiple of 8); the width is then rounded to the
        nearest multiple of the group width (``make_divisible``: never below 90% of it), which is
        capped at the width (bottleneck ratio 1 throughout).

        NOTE: torchvision's rounding, so its weights load; pycls and timm round down instead
        (RegNetX-400MF's last stage: 400 here and in torchvision, 384 there; 5.50M vs 5.16M
        parameters at 1000 classes).
        """
        runs: list[list[int]] = []
        for w in self.block_widths():
            if runs and runs[-1][0] == w:
                runs[-1][1] += 1
            else:
                runs.append([w, 1])
        out = []
        for w, d in runs:
            w = make_divisible(w * width_mult, 8)
            g = min(self.group_width, w)
            out.append((make_divisible(w, g), d, g))
        return out


# The paper's Table / Appendix C values (RegNetX-400MF and RegNetY-400MF as torchvision's).
VARIANTS: dict[str, RegNetSpec] = {
    "regnetx_200mf": RegNetSpec(w0=24, wa=36.44, wm=2.49, depth=13, group_width=8),
    "regnetx_400mf": RegNetSpec(w0=24, wa=24.48, wm=2.54, depth=22, group_width=16),
    "regnety_400mf": RegNetSpec(w0=48, wa=27.89, wm=2.09, depth=16, group_width=8, se_ratio=0.25),
}


class SqueezeExcitation(nn.Module):
    """Channel gates: global pool -> 1x1 conv (squeeze) -> ReLU -> 1x1 conv -> sigmoid -> scale."""

    def __init__(self, channels: int, squeeze: int):
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, squeeze, 1)
        self.activation = nn.ReLU(inplace=True)
        self.fc2 = nn.Conv2d(squeeze, channels, 1)
        self.scale_activation = nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.fc2(self.activation(self.fc1(self.avgpool(x))))
        return x * self.scale_activation(scale)


class BottleneckTransform(nn.Sequential):
    """``a`` 1x1 -> ``b`` 3x3 group conv (carries the stride) -> [``se``] -> ``c`` 1x1 (linear)."""

    def __init__(self, cin: int, cout: int, stride: int, group_width: int, se_ratio: float):
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        layers["a"] = ConvBNAct(cin, cout, 1)
        layers["b"] = ConvBNAct(cout, cout, 3, stride, groups=cout // group_width)
        if se_ratio:
            # The paper sizes the squeeze relative to the block's input width, not the bottleneck.
            layers["se"] = SqueezeExcitation(cout, int(round(se_ratio * cin)))
        layers["c"] = ConvBNAct(cout, cout, 1, act=None)
        super().__init__(layers)


class ResBottleneckBlock(nn.Module):
    """x + f(x), with a 1x1 projection (``proj``) of x only where the shape changes, then ReLU."""

    def __init__(self, cin: int, cout: int, stride: int, group_width: int, se_ratio: float):
        super().__init__()
        self.proj = None
        if stride != 1 or cin != cout:
            self.proj = ConvBNAct(cin, cout, 1, stride, act=None)
        self.f = BottleneckTransform(cin, cout, stride, group_width, se_ratio)
        self.activation = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.proj is None else self.proj(x)
        return self.activation(shortcut + self.f(x))


class RegNet(nn.Module):
    """``stem`` -> ``trunk_output`` (stages ``block1``..``block4``, each starting with stride 2)
    -> global average pool -> ``fc``. ``num_classes=0`` builds the trunk only (``fc`` is an
    identity), for use as a backbone."""

    def __init__(self, spec: RegNetSpec, num_classes: int = 1000, stem: str = "imagenet",
                 width_mult: float = 1.0, stem_width: int = 32):
        super().__init__()
        check_stem(stem)
        check_width_mult(width_mult)
        width = make_divisible(stem_width * width_mult, 8)
        # NOTE: cifar stem: stride 1 instead of 2, so 32 px inputs end at 2x2 instead of 1x1.
        self.stem = ConvBNAct(3, width, 3, 2 if stem == "imagenet" else 1)
        stages: OrderedDict[str, nn.Module] = OrderedDict()
        self.stage_widths: list[int] = []
        for i, (cout, depth, group_width) in enumerate(spec.stages(width_mult), start=1):
            stage = nn.Sequential()
            for j in range(depth):
                stage.add_module(f"block{i}-{j}", ResBottleneckBlock(
                    width, cout, 2 if j == 0 else 1, group_width, spec.se_ratio))
                width = cout
            stages[f"block{i}"] = stage
            self.stage_widths.append(cout)
        self.trunk_output = nn.Sequential(stages)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(width, num_classes) if num_classes > 0 else nn.Identity()
        self.num_features = width
        self.classifier_name = "fc"
        self.stage_names = [f"trunk_output.{name}" for name in stages]
        init_weights(self)

    def forward_stages(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Each stage's output, input to output order (strides 4, 8, 16, 32 with the imagenet stem)."""
        outs = []
        x = self.stem(x)
        for stage in self.trunk_output:
            x = stage(x)
            outs.append(x)
        return outs

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.trunk_output(self.stem(x))

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.avgpool(x), 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _regnet(variant: str, num_classes: int, stem: str, width_mult: float) -> RegNet:
    return RegNet(VARIANTS[variant], num_classes, stem, width_mult)


@register_model
def regnetx_200mf(num_classes: int = 1000, stem: str = "imagenet",
                  width_mult: float = 1.0) -> RegNet:
    """RegNetX-200MF: widths (24, 56, 152, 368), depths (1, 1, 4, 7); 2.7M params."""
    return _regnet("regnetx_200mf", num_classes, stem, width_mult)


@register_model
def regnetx_400mf(num_classes: int = 1000, stem: str = "imagenet",
                  width_mult: float = 1.0) -> RegNet:
    """RegNetX-400MF: widths (32, 64, 160, 400), depths (1, 2, 7, 12); 5.5M params."""
    return _regnet("regnetx_400mf", num_classes, stem, width_mult)


@register_model
def regnety_400mf(num_classes: int = 1000, stem: str = "imagenet",
                  width_mult: float = 1.0) -> RegNet:
    """RegNetY-400MF: widths (48, 104, 208, 440), depths (1, 3, 6, 6), SE 0.25; 4.3M params."""
    return _regnet("regnety_400mf", num_classes, stem, width_mult)
