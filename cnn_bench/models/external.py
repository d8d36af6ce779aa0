"""Passthroughs: any torchvision or timm classification model by name.

``model=torchvision model.name=efficientnet_b0`` builds ``torchvision.models.get_model(name,
weights=None, num_classes=...)``; ``model=timm model.name=...`` builds ``timm.create_model``.
The result is wrapped in ``PassthroughModel`` so it exposes the zoo's interface; its state dict
keys are the library model's, prefixed with ``model.``. These models take no ``stem`` or
``width_mult``: they are built exactly as their library defines them. Extra options (e.g.
``+model.dropout=0.3``) are passed on to the library's builder.
"""

from __future__ import annotations

import importlib
import importlib.util

import torch
from torch import nn

from cnn_bench.errors import CnnBenchError, did_you_mean
from cnn_bench.models.registry import register_model

PASSTHROUGHS = ("torchvision", "timm")

# Builder options torchvision's own builders set when given weights; the passthrough builds with
# weights=None, so a ``model.pretrained`` build passes these (cnn_bench.models.pretrained).
# GoogLeNet's and Inception's weights expect inputs in (x - 0.5) / 0.5 units: transform_input
# converts ImageNet-normalised inputs to those.
TORCHVISION_PRETRAINED_OPTIONS: dict[str, dict] = {
    "googlenet": {"transform_input": True, "init_weights": False},
    "inception_v3": {"transform_input": True, "init_weights": False},
}


# NOTE: GoogLeNet and Inception v3 are built without their auxiliary classifiers (torchvision's
# default with weights=None is to keep them). With them, the train-mode forward returns a named
# tuple, not logits; the trainer's loss reads the main logits only, so the auxiliary heads would
# never train. torchvision's own builder drops them after loading pretrained weights too.
TORCHVISION_NO_AUX = ("googlenet", "inception_v3")


class _StopForward(Exception):
    """Raised by a pre-hook to stop the forward at the classifier once its input is captured."""


def _find_classifier(model: nn.Module, num_classes: int) -> str:
    """The last ``nn.Linear`` (registration order) with ``num_classes`` outputs, else the last
    ``nn.Linear``, else the last ``nn.Conv2d`` with ``num_classes`` outputs (SqueezeNet)."""
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    for name, m in reversed(linears):
        if m.out_features == num_classes:
            return name
    if linears:
        return linears[-1][0]
    for name, m in reversed(list(model.named_modules())):
        if isinstance(m, nn.Conv2d) and m.out_channels == num_classes:
            return name
    raise CnnBenchError(f"cannot find the classifier of {type(model).__name__}")


def _find_stages(model: nn.Module, classifier: str) -> list[str]:
    """Top-level children that hold parameters, minus the one holding the classifier. A stage
    holding nearly all the parameters (a single ``features`` in EfficientNet, MobileNet, VGG;
    RegNet's ``trunk_output``, ViT's ``encoder``, Swin's ``features``) is replaced by its
    children with parameters, again until none does. The stem is included: it cannot be told
    apart. Hidden layers that share the classifier's container (AlexNet's and VGG's fc6/fc7)
    follow as the last stages, so unfreezing every stage leaves nothing trainable-by-design
    frozen."""
    def with_params(parent: nn.Module, prefix: str) -> list[str]:
        return [prefix + n for n, m in parent.named_children()
                if not (classifier == prefix + n or classifier.startswith(prefix + n + "."))
                and any(True for _ in m.parameters())]

    stages = with_params(model, "")
    while True:
        # NOTE: 95% of the parameters splits RegNet's trunk (99.98-100%), ViT's encoder (97-99%),
        # Swin's and MaxViT's blocks (99-100%), and keeps the stages people mean whole: ResNet's
        # layer4 (63-75%), RegNet's block4 (16-89%).
        size = {s: sum(p.numel() for p in model.get_submodule(s).parameters()) for s in stages}
        big = next((s for s in stages if size[s] >= 0.95 * sum(size.values())
                    and len(with_params(model.get_submodule(s), s + ".")) >= 2), None)
        if big is None:
            break
        i = stages.index(big)
        stages[i:i + 1] = with_params(model.get_submodule(big), big + ".")
    parent, _, leaf = classifier.rpartition(".")
    if parent:
        for n, m in model.get_submodule(parent).named_children():
            if n == leaf:
                break
            if any(True for _ in m.parameters()):
                stages.append(f"{parent}.{n}")
    return stages


def _submodule_path(model: nn.Module, name: str) -> str | None:
    """``name`` if it is a submodule path, else with '_' read as '.' (timm's older spelling)."""
    if not name:
        return None
    for candidate in (name, name.replace("_", ".")):
        try:
            model.get_submodule(candidate)
            return candidate
        except AttributeError:
            pass
    return None


class PassthroughModel(nn.Module):
    """Wraps a library model (as ``self.model``) with the zoo's interface.

    ``forward`` is the library model's own. ``forward_features`` runs it up to the classifier
    (``classifier_name``, found by ``_find_classifier``) and returns the classifier's input;
    ``forward_head`` applies the classifier. So ``forward == forward_head(forward_features)``
    whenever the classifier is the last op of the library's forward, which holds for every
    torchvision model whose head ends in a linear layer (not SqueezeNet, whose head is
    conv -> ReLU -> pool: there ``forward_head`` returns the conv's map).
    ``stage_names`` are found by ``_find_stages``.
    """

    def __init__(self, model: nn.Module, num_classes: int, source: str):
        super().__init__()
        self.model = model
        self.source = source
        classifier = _find_classifier(model, num_classes)
        self.classifier_name = "model." + classifier
        self.stage_names = ["model." + s for s in _find_stages(model, classifier)]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        captured: list[torch.Tensor] = []

        def grab(_module, args):
            captured.append(args[0])
            raise _StopForward

        handle = self.get_submodule(self.classifier_name).register_forward_pre_hook(grab)
        try:
            self.model(x)
        except _StopForward:
            pass
        finally:
            handle.remove()
        if not captured:
            raise RuntimeError(f"{self.classifier_name} was not called by the forward pass")
        return captured[0]

    def forward_head(self, feats: torch.Tensor) -> torch.Tensor:
        return self.get_submodule(self.classifier_name)(feats)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


class TimmModel(PassthroughModel):
    """A timm model: its own ``forward_features``/``forward_head`` (pooling included in the head),
    its ``pretrained_cfg["classifier"]`` and ``feature_info`` module names where present.

    ``feature_info`` names the module that ends each stage (a feature tap), not a container:
    ``stage_taps`` tells fine-tuning that a stage runs from the previous tap, the first from the
    model's start."""

    def __init__(self, model: nn.Module, num_classes: int):
        cfg_classifier = getattr(model, "pretrained_cfg", {}).get("classifier") or ""
        if isinstance(cfg_classifier, (tuple, list)):
            # Distilled models (DeiT *_distilled_*, LeViT) average two heads: fine-tuning,
            # head_lr_mult and a classifier swap would each reach only one of them.
            arch = model.pretrained_cfg.get("architecture") or type(model).__name__
            raise CnnBenchError(
                f"timm model '{arch}' has "
                f"{len(cfg_classifier)} classifier heads ({', '.join(cfg_classifier)}); cnn_bench "
                f"trains models with one: pick a variant without distillation (e.g. deit_tiny_patch16_224)")
        super().__init__(model, num_classes, "timm")
        classifier = _submodule_path(model, cfg_classifier)
        if classifier and isinstance(model.get_submodule(classifier), (nn.Linear, nn.Conv2d)):
            self.classifier_name = "model." + classifier
        info = getattr(model, "feature_info", None)
        if info:
            names = [_submodule_path(model, f["module"]) for f in info]
            if all(names):
                self.stage_names = ["model." + n for n in names]
                self.stage_taps = True

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_features(x)

    def forward_head(self, feats: torch.Tensor) -> torch.Tensor:
        return self.model.forward_head(feats)


def _refuse_aux_logits(source: str, name: str, kwargs: dict) -> None:
    if kwargs.get("aux_logits"):
        raise CnnBenchError(f"{source} {name}: model.aux_logits=true is not supported (the "
                            f"trainer's loss reads the main logits only, so the auxiliary "
                            f"classifiers would never train); leave it unset")


def _torchvision(name: str, num_classes: int, **kwargs) -> PassthroughModel:
    import torchvision

    # Classification models only: detection/segmentation/video builders take other arguments.
    available = torchvision.models.list_models(module=torchvision.models)
    if name not in available:
        raise CnnBenchError(f"unknown torchvision model '{name}': {did_you_mean(name, available)}")
    if name in TORCHVISION_NO_AUX:
        _refuse_aux_logits("torchvision", name, kwargs)
        kwargs = {**kwargs, "aux_logits": False}
    try:
        model = torchvision.models.get_model(name, weights=None, num_classes=num_classes, **kwargs)
    except TypeError as e:
        raise CnnBenchError(f"torchvision model '{name}' rejected its options {kwargs}: {e}") from None
    return PassthroughModel(model, num_classes, "torchvision")


def _timm(name: str, num_classes: int, **kwargs) -> TimmModel:
    if importlib.util.find_spec("timm") is None:
        raise CnnBenchError("timm is not installed: pip install timm")
    timm = importlib.import_module("timm")
    if not timm.is_model(name.split(".")[0]):  # "arch.pretrained_tag" names are valid too
        raise CnnBenchError(f"unknown timm model '{name}': {did_you_mean(name, timm.list_models())}")
    # timm's inception_v3 takes aux_logits too, and then returns (logits, aux) in every mode
    _refuse_aux_logits("timm", name, kwargs)
    try:
        model = timm.create_model(name, pretrained=False, num_classes=num_classes, **kwargs)
    except TypeError as e:
        raise CnnBenchError(f"timm model '{name}' rejected its options {kwargs}: {e}") from None
    return TimmModel(model, num_classes)


@register_model(name="torchvision")
def torchvision_model(num_classes: int = 1000, name: str = "resnet18", **kwargs) -> PassthroughModel:
    """Any torchvision classification model, untrained: ``torchvision.models.get_model(name)``."""
    return _torchvision(name, num_classes, **kwargs)


@register_model(name="timm")
def timm_model(num_classes: int = 1000, name: str = "resnet18", **kwargs) -> TimmModel:
    """Any timm model, untrained: ``timm.create_model(name)`` (needs ``pip install timm``)."""
    return _timm(name, num_classes, **kwargs)
