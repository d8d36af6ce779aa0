"""Building blocks shared by the model families."""

from __future__ import annotations

from torch import nn

from cnn_bench.errors import CnnBenchError, did_you_mean


def make_divisible(value: float, divisor: int = 8, min_value: int | None = None) -> int:
    """Round a scaled channel count to a multiple of ``divisor`` without dropping below 90% of it.

    The one helper every width multiplier goes through (torchvision's ``_make_divisible`` rule).
    """
    min_value = divisor if min_value is None else min_value
    new = max(min_value, int(value + divisor / 2) // divisor * divisor)
    if new < 0.9 * value:
        new += divisor
    return new


class ConvBNAct(nn.Sequential):
    """Conv2d (no bias) -> BatchNorm2d -> activation; ``act=None`` leaves the output linear."""

    def __init__(self, cin: int, cout: int, kernel_size: int = 3, stride: int = 1,
                 groups: int = 1, act: type[nn.Module] | None = nn.ReLU, padding: int | None = None):
        padding = (kernel_size - 1) // 2 if padding is None else padding
        layers: list[nn.Module] = [
            nn.Conv2d(cin, cout, kernel_size, stride, padding, groups=groups, bias=False),
            nn.BatchNorm2d(cout),
        ]
        if act is not None:
            layers.append(act(inplace=True) if "inplace" in act.__init__.__code__.co_varnames else act())
        super().__init__(*layers)
        self.out_channels = cout


STEMS = ("imagenet", "cifar")


def check_stem(stem: str) -> str:
    """Validate a ``stem`` option (``auto`` is resolved earlier, by ``build_model``)."""
    if stem not in STEMS:
        hint = " ('auto' is resolved by build_model from the resolution)" if stem == "auto" else ""
        raise CnnBenchError(f"model.stem must be one of {', '.join(STEMS)}, got '{stem}'{hint}")
    return stem


def check_width_mult(width_mult: float) -> float:
    if not width_mult > 0:
        raise CnnBenchError(f"model.width_mult must be > 0, got {width_mult}")
    return float(width_mult)


def check_choice(option: str, value: str, choices) -> str:
    """Raise a one-line error naming the closest valid choices when ``value`` is not one of them."""
    if value not in choices:
        raise CnnBenchError(f"model.{option} '{value}' is not valid: {did_you_mean(str(value), choices)}")
    return value


def init_weights(model: nn.Module) -> None:
    """Kaiming-normal (fan_out) convs with zero bias, BN weight 1 / bias 0, linear N(0, 0.01).

    torchvision's MobileNetV2 and RegNet init, used for every zoo family except SpeedNet (which,
    like airbench, keeps PyTorch's default init) so that architectures are compared from the
    same start. torchvision's own differ in three places: AlexNet keeps
    PyTorch's default init, ResNet's ``fc`` the default Linear init, RegNetY's SE conv biases
    their default init."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, 0.01)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
