"""SpeedNet: a compact VGG-style network for fast CIFAR-scale training (the project's own).

Shaped after the airbench speedrun network: a 3x3 stem, then stages of
conv -> max-pool -> BN -> GELU -> conv -> BN -> GELU, global max pool and a linear head.
``whiten=True`` swaps the stem for airbench's whitening layer: a frozen 2x2 conv whose filters
are set from the training images by ``init_from_data`` (the trainer calls it before epoch 1).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from cnn_bench.errors import CnnBenchError
from cnn_bench.models.layers import check_stem, check_width_mult, make_divisible
from cnn_bench.models.registry import register_model


class SpeedBlock(nn.Module):
    """conv3x3 -> max-pool 2 -> BN -> GELU -> conv3x3 -> BN -> GELU (halves the resolution)."""

    def __init__(self, cin: int, cout: int, dirac: bool = False):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
        self.pool = nn.MaxPool2d(2)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.act = nn.GELU()
        if dirac:
            with torch.no_grad():
                for conv in (self.conv1, self.conv2):
                    # Identity on the first min(cin, cout) outputs: an implicit residual path.
                    nn.init.dirac_(conv.weight[: min(conv.in_channels, conv.out_channels)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.bn1(self.pool(self.conv1(x))))
        return self.act(self.bn2(self.conv2(x)))


# Whitening stem: 2x2 patches of 3 channels = 12 directions; each filter and its negative.
WHITEN_KERNEL = 2
WHITEN_WIDTH = 2 * 3 * WHITEN_KERNEL * WHITEN_KERNEL
WHITEN_EPS = 5e-4  # added to the patch covariance's eigenvalues (normalised-pixel units squared)


class SpeedNet(nn.Module):
    """Stem + len(widths) SpeedBlocks + global max pool + linear classifier.

    ``whiten=True``: the stem is a 2x2 conv (24 filters, no padding) + GELU whose weights are
    frozen and set by ``init_from_data`` to whiten the data's 2x2 patches; its bias trains.
    ``dirac=True``: the blocks' 3x3 convs start as identities on their first input-many output
    channels. ``bn_scale=False``: every BatchNorm scale is frozen at 1 (only the shifts train).
    """

    def __init__(self, widths: Sequence[int] = (64, 256, 256), stem_width: int = 24,
                 num_classes: int = 10, width_mult: float = 1.0, stem: str = "cifar",
                 head_scale: float = 1 / 9, whiten: bool = False, dirac: bool = False,
                 bn_scale: bool = True):
        super().__init__()
        check_stem(stem)
        check_width_mult(width_mult)
        widths = [make_divisible(w * width_mult) for w in widths]
        stem_width = make_divisible(stem_width * width_mult)
        # NOTE: stem="imagenet" adds a stride-2 conv and a max-pool (4x downsampling) so 224 px
        # inputs cost about what 56 px would; the network was designed for 32 px.
        stem_stride = 2 if stem == "imagenet" else 1
        pool = [nn.MaxPool2d(3, 2, 1)] if stem == "imagenet" else []
        self.whiten = bool(whiten)
        if self.whiten:
            # NOTE: airbench's whitening layer. Decorrelated, unit-variance inputs let the first
            # epochs learn at a high lr. Its width is fixed by the patch size (width_mult does not
            # apply), and the bias trains for the whole run (airbench freezes it after 3 epochs
            # to save the backward pass; here that would be one more schedule to tune).
            stem_width = WHITEN_WIDTH
            conv = nn.Conv2d(3, stem_width, WHITEN_KERNEL, stem_stride, 0, bias=True)
            conv.weight.requires_grad_(False)
            self.stem = nn.Sequential(conv, nn.GELU(), *pool)
        else:
            self.stem = nn.Sequential(
                nn.Conv2d(3, stem_width, 3, stem_stride, 1, bias=False),
                nn.BatchNorm2d(stem_width),
                nn.GELU(),
                *pool,
            )
        # NOTE: dirac and bn_scale=False are airbench's (its ablations: 94% in 18 instead of 21
        # epochs with dirac); off by default so the network trains like any other zoo model.
        # Identity-initialised filters let a 7-conv net start close to its inputs, and with the
        # scales frozen the BN shifts can take a much larger lr (optimizer.norm_bias_lr_mult).
        chans = [stem_width, *widths]
        self.stages = nn.Sequential(*(SpeedBlock(a, b, dirac)
                                      for a, b in zip(chans[:-1], chans[1:])))
        if not bn_scale:
            for m in self.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.weight.requires_grad_(False)  # stays 1: the conv before it sets the scale
        self.pool = nn.AdaptiveMaxPool2d(1)
        self.fc = nn.Linear(widths[-1], num_classes, bias=False)
        # airbench scales the logits down: large max-pooled features otherwise saturate softmax.
        self.head_scale = head_scale
        self.num_features = widths[-1]
        self.classifier_name = "fc"
        self.stage_names = [f"stages.{i}" for i in range(len(self.stages))]
        self.min_size = next(s for s in range(1, 1025) if self._out_size(s) >= 1)

    def _out_size(self, size: int) -> int:
        """Side of the last stage's map for a ``size`` px input (the stem conv, its max-pool with
        stem=imagenet, then each stage's 2x2 max-pool)."""
        conv = self.stem[0]
        k, st, p = conv.kernel_size[0], conv.stride[0], conv.padding[0]
        size = (size + 2 * p - k) // st + 1
        if any(isinstance(m, nn.MaxPool2d) for m in self.stem):
            size = (size - 1) // 2 + 1  # 3x3, stride 2, padding 1
        return size // 2 ** len(self.stages)

    @property
    def wants_data_init(self) -> bool:
        """True when the trainer should call ``init_from_data`` before training."""
        return self.whiten

    @torch.no_grad()
    def init_from_data(self, images: torch.Tensor) -> None:
        """Set the whitening stem's filters from normalised training images ``[N, 3, H, W]``:
        the eigenvectors of their 2x2 patch covariance, scaled by 1/sqrt(eigenvalue + eps), and
        their negatives (GELU keeps both signs' information). No-op without ``whiten``."""
        if not self.whiten:
            return
        conv = self.stem[0]
        k, s = conv.kernel_size[0], conv.stride[0]
        patches = images.float().unfold(2, k, s).unfold(3, k, s)  # N, C, H', W', k, k
        patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(-1, 3 * k * k)
        cov = patches.T @ patches / len(patches)
        # float64 on the CPU: a 12 x 12 eigendecomposition that is the same on every device.
        evals, evecs = torch.linalg.eigh(cov.double().cpu())  # ascending eigenvalues
        filters = (evecs / torch.sqrt(evals.clamp_min(0) + WHITEN_EPS)).T.flip(0)
        filters = filters.reshape(-1, 3, k, k).to(conv.weight)
        conv.weight.copy_(torch.cat([filters, -filters]))
        conv.bias.zero_()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        if min(x.shape[-2:]) < self.min_size:
            stem = "model.stem=cifar or " if self.stem[-1].__class__ is nn.MaxPool2d else ""
            raise CnnBenchError(f"SpeedNet with this stem needs inputs of at least {self.min_size} "
                                f"px, got {tuple(x.shape[-2:])}: use {stem}dataset.resolution="
                                f"{self.min_size} or more")
        return self.stages(self.stem(x))

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(x), 1)) * self.head_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _speednet(widths: Sequence[int], stem_width: int, num_classes: int, width_mult: float,
              stem: str, whiten: bool, dirac: bool, bn_scale: bool) -> SpeedNet:
    return SpeedNet(widths, stem_width, num_classes, width_mult, stem, whiten=whiten,
                    dirac=dirac, bn_scale=bn_scale)


@register_model
def speednet(num_classes: int = 10, width_mult: float = 1.0, stem: str = "cifar",
             whiten: bool = False, dirac: bool = False, bn_scale: bool = True) -> SpeedNet:
    """SpeedNet with airbench94's widths (64, 256, 256): the CIFAR-10 speedrun network."""
    return _speednet((64, 256, 256), 24, num_classes, width_mult, stem, whiten, dirac, bn_scale)


@register_model
def speednet_s(num_classes: int = 10, width_mult: float = 1.0, stem: str = "cifar",
               whiten: bool = False, dirac: bool = False, bn_scale: bool = True) -> SpeedNet:
    """A quarter-width SpeedNet (32, 64, 128): the CPU-friendly default model."""
    return _speednet((32, 64, 128), 16, num_classes, width_mult, stem, whiten, dirac, bn_scale)
