"""ResNet-18/34/50/101/152 (He et al., "Deep Residual Learning for Image Recognition", CVPR 2016).

Module names follow torchvision's, so with ``stem="imagenet"`` and ``width_mult=1`` a torchvision
ResNet's state dict loads with ``strict=True``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from cnn_bench.models.layers import check_stem, check_width_mult, init_weights, make_divisible
from cnn_bench.models.registry import register_model


class BasicBlock(nn.Module):
    """Two 3x3 convs; the residual branch ends in ``bn2``."""

    expansion = 1

    def __init__(self, cin: int, width: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, width, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(width, width, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.downsample = downsample

    def zero_init_last(self) -> None:
        nn.init.zeros_(self.bn2.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 reduce -> 3x3 -> 1x1 expand (x4); the residual branch ends in ``bn3``."""

    expansion = 4

    def __init__(self, cin: int, width: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        cout = width * self.expansion
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        # NOTE: the stride sits on the 3x3 conv ("ResNet v1.5"), not on the first 1x1 as in the
        # paper: torchvision's pretrained weights assume it (it costs 4.1 vs 3.8 GMACs for
        # ResNet-50 at 224 px and is slightly more accurate).
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def zero_init_last(self) -> None:
        nn.init.zeros_(self.bn3.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """Stem -> four stages (``layer1``..``layer4``, strides 1, 2, 2, 2) -> global pool -> ``fc``."""

    def __init__(self, block: type[BasicBlock | Bottleneck], depths: Sequence[int],
                 num_classes: int = 1000, stem: str = "imagenet", width_mult: float = 1.0,
                 zero_init_residual: bool = False, widths: Sequence[int] = (64, 128, 256, 512)):
        super().__init__()
        check_stem(stem)
        check_width_mult(width_mult)
        widths = [make_divisible(w * width_mult, 8) for w in widths]
        self.inplanes = widths[0]
        if stem == "imagenet":
            self.conv1 = nn.Conv2d(3, self.inplanes, 7, 2, 3, bias=False)
            self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        else:
            # NOTE: cifar stem: a 7x7/2 conv + max-pool would shrink 32 px to 8 px before the first
            # stage; a 3x3/1 conv and no pool keep 32 px (He et al.'s CIFAR networks do the same).
            self.conv1 = nn.Conv2d(3, self.inplanes, 3, 1, 1, bias=False)
            self.maxpool = nn.Identity()
        self.bn1 = nn.BatchNorm2d(self.inplanes)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_layer(block, widths[0], depths[0], stride=1)
        self.layer2 = self._make_layer(block, widths[1], depths[1], stride=2)
        self.layer3 = self._make_layer(block, widths[2], depths[2], stride=2)
        self.layer4 = self._make_layer(block, widths[3], depths[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.num_features = widths[3] * block.expansion
        self.fc = nn.Linear(self.num_features, num_classes)
        self.classifier_name = "fc"
        self.stage_names = ["layer1", "layer2", "layer3", "layer4"]
        init_weights(self)
        if zero_init_residual:
            # Each block then starts as the identity (Goyal et al. 2017, "ImageNet in 1 hour").
            for m in self.modules():
                if isinstance(m, (BasicBlock, Bottleneck)):
                    m.zero_init_last()

    def _make_layer(self, block: type[BasicBlock | Bottleneck], width: int, depth: int,
                    stride: int) -> nn.Sequential:
        cout = width * block.expansion
        downsample = None
        if stride != 1 or self.inplanes != cout:
            # Projection shortcut (option B) only where the shape changes; identity elsewhere.
            downsample = nn.Sequential(nn.Conv2d(self.inplanes, cout, 1, stride, bias=False),
                                       nn.BatchNorm2d(cout))
        blocks = [block(self.inplanes, width, stride, downsample)]
        self.inplanes = cout
        blocks += [block(cout, width) for _ in range(1, depth)]
        return nn.Sequential(*blocks)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.avgpool(x), 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _resnet(block: type[BasicBlock | Bottleneck], depths: Sequence[int], num_classes: int,
            stem: str, width_mult: float, zero_init_residual: bool) -> ResNet:
    return ResNet(block, depths, num_classes, stem, width_mult, zero_init_residual)


@register_model
def resnet18(num_classes: int = 1000, stem: str = "imagenet", width_mult: float = 1.0,
             zero_init_residual: bool = False) -> ResNet:
    """ResNet-18: BasicBlocks, depths (2, 2, 2, 2); 11.7M params, 1.8 GMACs at 224 px."""
    return _resnet(BasicBlock, (2, 2, 2, 2), num_classes, stem, width_mult, zero_init_residual)


@register_model
def resnet34(num_classes: int = 1000, stem: str = "imagenet", width_mult: float = 1.0,
             zero_init_residual: bool = False) -> ResNet:
    """ResNet-34: BasicBlocks, depths (3, 4, 6, 3); 21.8M params, 3.7 GMACs at 224 px."""
    return _resnet(BasicBlock, (3, 4, 6, 3), num_classes, stem, width_mult, zero_init_residual)


@register_model
def resnet50(num_classes: int = 1000, stem: str = "imagenet", width_mult: float = 1.0,
             zero_init_residual: bool = False) -> ResNet:
    """ResNet-50: Bottlenecks, depths (3, 4, 6, 3); 25.6M params, 4.1 GMACs at 224 px."""
    return _resnet(Bottleneck, (3, 4, 6, 3), num_classes, stem, width_mult, zero_init_residual)


@register_model
def resnet101(num_classes: int = 1000, stem: str = "imagenet", width_mult: float = 1.0,
              zero_init_residual: bool = False) -> ResNet:
    """ResNet-101: Bottlenecks, depths (3, 4, 23, 3); 44.5M params, 7.8 GMACs at 224 px."""
    return _resnet(Bottleneck, (3, 4, 23, 3), num_classes, stem, width_mult, zero_init_residual)


@register_model
def resnet152(num_classes: int = 1000, stem: str = "imagenet", width_mult: float = 1.0,
              zero_init_residual: bool = False) -> ResNet:
    """ResNet-152: Bottlenecks, depths (3, 8, 36, 3); 60.2M params, 11.5 GMACs at 224 px."""
    return _resnet(Bottleneck, (3, 8, 36, 3), num_classes, stem, width_mult, zero_init_residual)
