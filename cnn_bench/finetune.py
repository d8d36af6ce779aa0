"""Freezing for fine-tuning: ``full``, ``head`` (feature extraction) and ``partial``.

Frozen parts are named by module path and put back into eval mode after every ``model.train()``,
so BatchNorm running statistics and dropout inside them do not move either.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from cnn_bench.errors import CnnBenchError

MODES = ("full", "head", "partial")


@dataclass
class FreezePlan:
    """What a finetune mode froze: module paths kept in eval mode, and the parameter counts."""

    mode: str
    frozen: list[str] = field(default_factory=list)
    trainable_params: int = 0
    frozen_params: int = 0


def _owns(prefix: str, name: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def _trainable_prefixes(model: nn.Module, mode: str, unfreeze_stages: int) -> list[str]:
    head = getattr(model, "classifier_name", None)
    if not head:
        raise CnnBenchError(f"finetune={mode} needs to know the model's classifier, but "
                            f"{type(model).__name__} does not name one (classifier_name)")
    if mode == "head":
        return [head]
    stages = list(getattr(model, "stage_names", []))
    if not 0 <= unfreeze_stages <= len(stages):
        raise CnnBenchError(f"finetune.unfreeze_stages must be between 0 and {len(stages)} "
                            f"for this model (its stages: {', '.join(stages)})")
    if unfreeze_stages == 0:
        return [head]
    # Everything registered from the first unfrozen stage on trains, not only the named stages:
    # timm's stages are feature_info's tap points (efficientnet_b0: blocks.0, 1, 2, 4, 6), so
    # blocks between two taps belong to the later stage and conv_head/bn2 sit between the last
    # one and the classifier. A stage starts right after the previous one ends; the first at
    # its own start (the zoo's stem precedes it and trains with finetune=full only), or at the
    # model's start where stages are taps (timm's first tap is the stem's output).
    names = [n for n, _ in model.named_modules()]
    first = len(stages) - unfreeze_stages
    if first == 0:
        start = 1 if getattr(model, "stage_taps", False) else names.index(stages[0])
    else:
        start = max(i for i, n in enumerate(names) if _owns(stages[first - 1], n)) + 1
    keep: list[str] = []
    for name in names[start:]:  # pre-order: a module's descendants follow it
        if not (keep and _owns(keep[-1], name)):
            keep.append(name)
    if first == 0:
        # Parameters held directly by the first stage's ancestors come before it in the
        # forward (ViT's class token on the model itself): with every stage unfrozen they train.
        parts = stages[0].split(".")
        for i in range(len(parts)):
            owner = ".".join(parts[:i])
            module = model.get_submodule(owner)
            keep += [f"{owner}.{n}" if owner else n for n, _ in module.named_parameters(recurse=False)]
    return [head, *keep]


def apply_finetune(model: nn.Module, cfg) -> FreezePlan:
    """Set ``requires_grad`` as the mode says; return the plan (call ``set_train_mode`` after)."""
    mode = cfg.get("mode", "full") if cfg is not None else "full"
    if mode not in MODES:
        raise CnnBenchError(f"finetune.mode must be one of {', '.join(MODES)}; got '{mode}'")
    stages = int(cfg.get("unfreeze_stages", 0)) if cfg is not None else 0
    if stages and mode != "partial":  # head and full would ignore it without a word
        raise CnnBenchError(f"finetune.unfreeze_stages={stages} applies to finetune=partial only; "
                            f"use finetune=partial finetune.unfreeze_stages={stages}")
    plan = FreezePlan(mode)
    if mode != "full":
        keep = _trainable_prefixes(model, mode, stages)
        for name, p in model.named_parameters():
            if not any(_owns(k, name) for k in keep):  # never unfreezes what the model froze
                p.requires_grad_(False)
        # Frozen = the largest modules with no trainable parameter below them (and not a
        # parent of a trainable module), so whole blocks, BN layers included, go to eval mode.
        trainable = [n for n, p in model.named_parameters() if p.requires_grad]
        for name, module in model.named_modules():
            if not name or any(_owns(f, name) for f in plan.frozen):
                continue
            if next(module.parameters(), None) is None and next(module.buffers(), None) is None:
                continue  # stateless (dropout, activations): a head's dropout keeps working
            if not any(_owns(name, t) for t in trainable) and not any(_owns(k, name) for k in keep):
                plan.frozen.append(name)
    plan.trainable_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    plan.frozen_params = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    return plan


def set_train_mode(model: nn.Module, plan: FreezePlan | None) -> None:
    """``model.train()``, then frozen modules back to eval (BN statistics and dropout fixed)."""
    model.train()
    if plan is not None:
        for name in plan.frozen:
            model.get_submodule(name).eval()
