"""Checkpoints: written atomically, plain types + tensors only, read with ``weights_only=True``."""

from __future__ import annotations

import os
import pickle
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Callable

import torch
from omegaconf import OmegaConf

from cnn_bench.errors import CnnBenchError

FORMAT = "cnn_bench.checkpoint/1"


def _new_file_mode() -> int:
    mask = os.umask(0o022)  # reading the umask means setting it: put it straight back
    os.umask(mask)
    return 0o666 & ~mask


# What open() gives a new file here. mkstemp's temp files are private (0600), which would make
# checkpoints and a dataset cache shared through $CNN_BENCH_CACHE unreadable to the rest of a
# group. Read once at import, before any thread could create files meanwhile.
NEW_FILE_MODE = _new_file_mode()


def atomic_write(path: str | Path, write: Callable[[BinaryIO], Any]) -> None:
    """``write(f)`` into a temp file in the same folder, then ``os.replace``: never a torn file,
    and no temp file left behind when writing fails."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        os.chmod(tmp, NEW_FILE_MODE)
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` through :func:`atomic_write`."""
    atomic_write(path, lambda f: torch.save(obj, f))


def atomic_link(src: str | Path, dst: str | Path) -> None:
    """Make ``dst`` a second name for ``src``'s current file, atomically (a hard link, or a copy
    where the file system has none). ``src`` is later replaced, not rewritten, so ``dst`` keeps
    this content."""
    src, dst = Path(src), Path(dst)
    tmp = dst.with_name(dst.name + ".link.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def safe_load(path: str | Path, map_location: str | torch.device = "cpu") -> Any:
    """``torch.load(weights_only=True)``: refuses pickles that would build arbitrary objects."""
    path = Path(path)
    if not path.is_file():
        raise CnnBenchError(f"checkpoint not found: {path}")
    _check_magic(path)
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise CnnBenchError(
            f"refusing to load {path}: it holds objects other than tensors and plain types "
            f"({_unpickler_reason(str(e))}); only load files you trust, re-saved as a state dict"
        ) from None
    except (KeyboardInterrupt, MemoryError):
        raise
    except Exception as e:  # noqa: BLE001 - a torn or foreign file fails in many ways
        why = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise CnnBenchError(f"cannot read checkpoint {path}: {why}") from None


# torch.save writes a zip archive; files of torch < 1.6 (and _use_new_zipfile_serialization=False)
# are a pickle stream, which starts with the PROTO opcode.
_MAGIC = (b"PK\x03\x04", b"\x80")


def _check_magic(path: Path) -> None:
    """One line for a file that cannot be a torch.save file: empty, a Git LFS pointer (a clone
    without ``git lfs pull``), an HTML error page saved by a download, anything else."""
    with path.open("rb") as f:
        head = f.read(64)
    if not head:
        raise CnnBenchError(f"checkpoint {path} is empty (0 bytes): an interrupted copy or download?")
    if head.startswith(_MAGIC):
        return
    if len(head) > 9 and head[8:10] == b'{"':  # u64 header length, then the JSON header
        raise CnnBenchError(f"{path} is a safetensors file: give it the .safetensors suffix "
                            "(model.weights= reads a file by its suffix)")
    if head.startswith(b"version https://git-lfs"):
        raise CnnBenchError(f"{path} is a Git LFS pointer, not the checkpoint: run 'git lfs pull'")
    shown = head[:16].decode("ascii", "backslashreplace").strip()
    raise CnnBenchError(f"{path} is not a PyTorch checkpoint (it starts with {shown!r}; an HTML "
                        "page or a text file saved in its place?)")


def _unpickler_reason(text: str) -> str:
    """The useful line of torch's weights-only refusal (``WeightsUnpickler error: Unsupported
    global: ...``), without the terminal colour codes torch puts in its advice."""
    lines = [re.sub(r"\x1b\[[0-9;]*m", "", ln).strip() for ln in text.splitlines()]
    lines = [ln for ln in lines if ln]
    i = next((k for k, ln in enumerate(lines)
              if "WeightsUnpickler error" in ln or "Unsupported global" in ln), None)
    if i is None:
        return lines[0][:200] if lines else "unsupported content"
    hit = lines[i]
    if hit.rstrip().endswith("error:") and i + 1 < len(lines):  # the reason is on the next line
        hit = f"{hit} {lines[i + 1]}"
    hit = hit[hit.find("WeightsUnpickler error"):] if "WeightsUnpickler error" in hit else hit
    return hit.split(". Please use")[0][:200]  # torch's advice on allow-listing follows


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Load a cnn_bench training checkpoint (see ``cnn_bench.train``) and check its format."""
    ckpt = safe_load(path, map_location)
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CnnBenchError(f"{path} is not a cnn_bench checkpoint (expected format {FORMAT})")
    return ckpt


def model_weights(ckpt: dict, use_ema: bool = True) -> tuple[dict, str]:
    """The state dict that evaluation and export use, and which it is (``"ema"`` | ``"raw"``):
    the EMA weights (``model_ema``, runs with ``trainer.ema_decay``) when the checkpoint has
    them and ``use_ema``, else the trained weights (``model``)."""
    if use_ema and ckpt.get("model_ema") is not None:
        return ckpt["model_ema"], "ema"
    return ckpt["model"], "raw"


# The settings a checkpoint's model, optimizer and scheduler states are shaped by.
RESUME_GROUPS = ("model", "optimizer", "scheduler", "finetune")


def settings_changed(ckpt: dict, cfg, groups=RESUME_GROUPS, limit: int = 4,
                     new_keys: bool = True) -> list[str]:
    """``key: then -> now`` for the leaves of ``groups`` where the checkpoint's config (its YAML
    string) and ``cfg`` differ, at most ``limit`` of them; with ``new_keys=False``, not for
    keys the checkpoint's config lacks."""

    def leaves(node, prefix=""):
        if isinstance(node, dict):
            for k, v in node.items():
                yield from leaves(v, f"{prefix}.{k}" if prefix else str(k))
        else:
            yield prefix, node

    then = OmegaConf.to_container(OmegaConf.create(ckpt.get("config") or "{}"))
    now = OmegaConf.to_container(cfg, resolve=True)
    old = dict(leaves({g: then.get(g) for g in groups}))
    new = dict(leaves({g: now.get(g) for g in groups}))

    def shown(d: dict, k: str) -> str:
        return repr(d[k]) if k in d else "(unset)"

    unset = object()
    keys = sorted(old.keys() | new.keys(), key=lambda k: (not k.endswith((".name", ".mode")), k))
    diffs = [f"{k}: {shown(old, k)} -> {shown(new, k)}" for k in keys
             if old.get(k, unset) != new.get(k, unset) and (new_keys or k in old)]
    return diffs[:limit] + ([f"{len(diffs) - limit} more"] if len(diffs) > limit else [])
