"""Loading a state dict into a built model: ``model.weights=PATH``, and the load behind
``model.pretrained``.

Files are read without unpickling arbitrary objects: ``.safetensors`` through safetensors,
anything else through :func:`cnn_bench.checkpoint.safe_load` (``torch.load(weights_only=True)``).
A file may hold a plain state dict, a cnn_bench training checkpoint (its ``model`` entry) or an
export from ``python -m cnn_bench.export``.

:func:`load_state_dict_into` is forgiving where a fine-tuning run needs it and strict elsewhere:
a classifier sized for another number of classes keeps its fresh initialisation (and the report
says so); missing and unexpected names are reported; any other shape mismatch is an error.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cnn_bench.checkpoint import safe_load
from cnn_bench.errors import CnnBenchError

log = logging.getLogger("cnn_bench")

# Wrappers that prefix every name: DataParallel/DDP ("module.") and torch.compile ("_orig_mod.").
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
# The torchvision/timm passthroughs hold the library model as ``self.model``.
PASSTHROUGH_PREFIX = "model."
_SHOWN = 8  # names listed per report line before "(+N more)"


@dataclass
class LoadReport:
    """What a load did: tensors loaded, names missing/unexpected, classifiers kept fresh."""

    source: str
    loaded: int = 0
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    replaced: list[str] = field(default_factory=list)  # one sentence per classifier kept fresh

    def lines(self) -> list[str]:
        out = [f"weights: loaded {self.loaded} tensors from {self.source}"]
        out += [f"weights: {r}" for r in self.replaced]
        if self.missing:
            out.append(f"weights: {len(self.missing)} missing (kept their fresh initialisation): "
                       f"{_shorten(self.missing)}")
        if self.unexpected:
            out.append(f"weights: {len(self.unexpected)} unexpected (ignored): "
                       f"{_shorten(self.unexpected)}")
        return out

    def __str__(self) -> str:
        return "\n".join(self.lines())

    def log(self) -> None:
        for line in self.lines():
            log.info(line)


def _shorten(names: list[str]) -> str:
    more = f" (+{len(names) - _SHOWN} more)" if len(names) > _SHOWN else ""
    return ", ".join(names[:_SHOWN]) + more


def rekey(state: Mapping[str, Any], fn: Callable[[str], str | None]) -> OrderedDict:
    """A copy of ``state`` with each name mapped by ``fn`` (``None`` drops it).

    ``fn`` is applied to module paths in ``_metadata`` too (as ``path + "."``): some modules read
    their saved version from it to convert old layouts (BatchNorm, torchvision's MNASNet, ViT).
    """
    out = OrderedDict()
    for k, v in state.items():
        new = fn(k)
        if new is not None:
            out[new] = v
    meta = getattr(state, "_metadata", None)
    if meta is not None:
        new_meta = OrderedDict()
        for path, value in meta.items():
            new = fn(path + "." if path else "")
            if new is not None:
                new_meta[new[:-1] if new.endswith(".") else new] = value
        out._metadata = new_meta  # type: ignore[attr-defined]
    return out


def strip_wrapper_prefixes(state: Mapping[str, Any]) -> Mapping[str, Any]:
    """Drop ``module.`` / ``_orig_mod.`` when every name carries it (repeatedly: DDP + compile)."""
    while state:
        prefix = next((p for p in WRAPPER_PREFIXES if all(k.startswith(p) for k in state)), None)
        if prefix is None:
            break
        state = rekey(state, lambda k, p=prefix: k[len(p):] if k.startswith(p) else None)
    return state


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and bool(obj) and all(
        isinstance(k, str) and torch.is_tensor(v) for k, v in obj.items())


def read_state_dict(path: str | Path) -> Mapping[str, Any]:
    """A state dict from ``.safetensors``, ``.pt``/``.pth`` (plain state dict), a cnn_bench
    checkpoint or a cnn_bench export; wrapper prefixes stripped. Never unpickles objects."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise CnnBenchError(f"model.weights: no file at {path}")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            state: Any = load_file(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError) as e:
            raise CnnBenchError(f"cannot read {path} as safetensors: "
                                f"{str(e).splitlines()[0][:200]}") from None
    else:
        state = safe_load(path)
        if isinstance(state, Mapping) and "format" in state and _is_state_dict(state.get("model")):
            state = state["model"]  # a cnn_bench training checkpoint
        elif not _is_state_dict(state) and isinstance(state, Mapping):
            # Other trainers' checkpoints keep the weights under one of these names.
            inner = next((state[k] for k in ("state_dict", "model", "model_state_dict")
                          if _is_state_dict(state.get(k))), None)
            state = inner if inner is not None else state
    if not _is_state_dict(state):
        raise CnnBenchError(f"{path} holds no state dict (a mapping of names to tensors): save "
                            f"model.state_dict(), or pass a cnn_bench checkpoint or export")
    return strip_wrapper_prefixes(state)


def _align_passthrough_prefix(state: Mapping[str, Any],
                              own: Mapping[str, Any]) -> Mapping[str, Any]:
    """Let a library-named file (``fc.weight``) load into a passthrough (``model.fc.weight``)
    and back, or a backbone's file into the model part holding it (``backbone.``), when that is
    the only way names match."""
    if any(k in own for k in state):
        return state
    if all(k.startswith(PASSTHROUGH_PREFIX) for k in own):
        added = rekey(state, lambda k: PASSTHROUGH_PREFIX + k)
        if any(k in own for k in added):
            return added
    if all(k.startswith(PASSTHROUGH_PREFIX) for k in state):
        stripped = rekey(state, lambda k: k[len(PASSTHROUGH_PREFIX):]
                         if k.startswith(PASSTHROUGH_PREFIX) else None)
        if any(k in own for k in stripped):
            return stripped
    # A backbone's file for a model that holds it as a part (a RegNet file for regnet_bifpn's
    # ``backbone``): most of its names match under one top-level module.
    parts = sorted({k.split(".", 1)[0] for k in own if "." in k})
    hits, part = max(((sum(f"{p}.{k}" in own for k in state), p) for p in parts), default=(0, ""))
    if hits * 2 > len(state):
        return rekey(state, lambda k: f"{part}.{k}")
    return state


def _module_of(key: str) -> str:
    return key.rpartition(".")[0]


def _under(key: str, modules: list[str]) -> bool:
    return any(key.startswith(m + ".") for m in modules)


def _classifier_plan(state: Mapping[str, Any], own: Mapping[str, torch.Tensor],
                     classifier: str | None, source: str) -> tuple[list[str], list[str]]:
    """Modules whose weights are sized for another number of classes -> (modules, sentences).

    The main classifier (``classifier_name``) qualifies when only its output size differs.
    Another layer qualifies as an auxiliary classifier (GoogLeNet's, Inception's) when it has
    the run's number of outputs in the model and the weights' number of classes in the file.
    Any other mismatch raises, naming the first bad key.
    """
    cls_key = f"{classifier}.weight" if classifier else None
    run_classes = own[cls_key].shape[0] if cls_key in own else None
    in_file = cls_key in state and torch.is_tensor(state[cls_key])
    weight_classes = state[cls_key].shape[0] if in_file else None
    modules: list[str] = []
    sentences: list[str] = []
    for k, v in state.items():
        if k not in own or not torch.is_tensor(v) or v.shape == own[k].shape:
            continue
        mine = own[k]
        module = _module_of(k)
        only_rows = v.dim() == mine.dim() and v.shape[1:] == mine.shape[1:]
        is_main = module == classifier
        is_aux = (not is_main and weight_classes is not None and only_rows
                  and mine.shape[0] == run_classes and v.shape[0] == weight_classes)
        if only_rows and (is_main or is_aux):
            if module not in modules:
                modules.append(module)
                kind = "classifier" if is_main else "auxiliary classifier"
                sentences.append(f"{kind} {module} replaced: weights have {v.shape[0]} classes, "
                                 f"run has {mine.shape[0]}")
            continue
        raise CnnBenchError(
            f"{source}: {k} has shape {list(v.shape)} in the weights but {list(mine.shape)} in the "
            f"model; the weights are for another architecture (check model.name, "
            f"model.width_mult and model.stem)")
    return modules, sentences


def load_state_dict_into(model: nn.Module, state: Mapping[str, Any], source: str) -> LoadReport:
    """Load ``state`` into ``model`` in place and return the report (not logged here).

    A classifier sized for another number of classes keeps the model's fresh initialisation
    for the run's ``num_classes``; other shape mismatches raise a one-line ``CnnBenchError``.
    """
    own = model.state_dict()
    state = _align_passthrough_prefix(state, own)
    if not any(k in own for k in state):
        first = next(iter(state), "<empty>")
        raise CnnBenchError(f"{source}: none of its {len(state)} names match the model's (its "
                            f"first is '{first}', the model's '{next(iter(own), '<none>')}'): "
                            f"are these weights for this model?")
    replaced, sentences = _classifier_plan(state, own, getattr(model, "classifier_name", None),
                                           source)
    state = rekey(state, lambda k: None if _under(k, replaced) else k)
    result = model.load_state_dict(state, strict=False)
    return LoadReport(
        source=source,
        loaded=sum(1 for k in state if k in own),
        missing=[k for k in result.missing_keys if not _under(k, replaced)],
        unexpected=list(result.unexpected_keys),
        replaced=sentences,
    )


def load_weights_file(model: nn.Module, path: str | Path) -> LoadReport:
    """``model.weights=PATH``: read the file, load it into ``model``, log and return the report."""
    report = load_state_dict_into(model, read_state_dict(path), str(path))
    report.log()
    return report
