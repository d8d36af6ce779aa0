"""Where and how a run computes: device, precision, memory format, seeds and RNG state."""

from __future__ import annotations

import random
import re
import resource
from dataclasses import dataclass
from pathlib import Path

import torch

from cnn_bench.errors import CnnBenchError

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}


@dataclass(frozen=True)
class Runtime:
    """Resolved execution settings of a run."""

    device: torch.device
    precision: str                 # fp32 | bf16 | fp16
    channels_last: bool

    @property
    def amp_dtype(self) -> torch.dtype | None:
        return _DTYPES[self.precision]

    @property
    def use_scaler(self) -> bool:
        # bf16 has fp32's exponent range; only fp16 gradients underflow without scaling.
        return self.precision == "fp16"

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None)

    @property
    def memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.channels_last else torch.contiguous_format


def resolve_device(name: str, key: str = "trainer.device") -> torch.device:
    """``auto`` -> cuda when available, else cpu; a cuda request without CUDA is a user error
    (``key`` is the setting's name in the messages: ``device`` for evaluate.py)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise CnnBenchError(f"{key} must be auto, cpu, cuda or cuda:N; got '{name}'") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CnnBenchError(f"{key}={name} but no CUDA device is available; use {key}=cpu")
    return device


def cuda_has_bf16(device: torch.device) -> bool:
    """Native bf16 on this GPU (Ampere and later). torch's ``is_bf16_supported()`` also says
    yes where bf16 is only emulated (V100, T4: much slower than fp16 + GradScaler)."""
    with torch.cuda.device(device):
        return torch.cuda.is_bf16_supported(including_emulation=False)


def resolve_runtime(trainer_cfg) -> Runtime:
    """Apply the ``auto`` rules: bf16 (else fp16) + channels_last on CUDA; fp32 + NCHW on CPU."""
    device = resolve_device(trainer_cfg.device)
    precision = trainer_cfg.precision
    if precision == "auto":
        if device.type == "cuda":
            precision = "bf16" if cuda_has_bf16(device) else "fp16"
        else:
            precision = "fp32"  # bf16 autocast on these CPUs is slower than fp32
    channels_last = trainer_cfg.get("channels_last", "auto")
    if channels_last == "auto":
        channels_last = device.type == "cuda"
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = not trainer_cfg.get("deterministic", False)
        torch.backends.cudnn.deterministic = bool(trainer_cfg.get("deterministic", False))
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return Runtime(device, precision, bool(channels_last))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def rng_state() -> dict:
    """RNG states as tensors and plain types, so ``torch.load(weights_only=True)`` reads them."""
    version, internal, gauss = random.getstate()
    state = {"torch": torch.get_rng_state(), "python": [version, list(internal), gauss]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        # a checkpoint from a machine with more GPUs holds more states than this one has GPUs
        for i, s in enumerate(state["cuda"][:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(s, i)


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak-memory window (CUDA allocator peak, or the process's peak RSS on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:  # Linux >= 4.0: writing 5 resets VmHWM (the peak resident set size) of this process
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_memory_mb(device: torch.device) -> float:
    """Peak since :func:`reset_peak_memory`, MiB: CUDA tensors allocated, or CPU peak RSS.

    On CPU the figure is the whole process (libraries, data, model), so compare it between
    paths of one run, not with CUDA figures.
    """
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        found = re.search(r"VmHWM:\s+(\d+)\s+kB", Path("/proc/self/status").read_text())
        if found:
            return int(found.group(1)) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
