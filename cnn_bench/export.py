"""``python -m cnn_bench.export ckpt=PATH [format=safetensors|pt] [out=FILE|DIR] [use_ema=false]``

Writes a checkpoint's model weights alone (no optimizer or RNG state), for sharing: the weights
``evaluate.py`` scores, i.e. the EMA weights of runs with ``trainer.ema_decay`` unless
``use_ema=false``. The safetensors file carries the run's config and class names as metadata.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from omegaconf import OmegaConf

from cnn_bench.checkpoint import atomic_save, atomic_write, load_checkpoint, model_weights
from cnn_bench.cli import fail
from cnn_bench.errors import CnnBenchError

FORMATS = {"safetensors": ".safetensors", "pt": ".pt"}


def export(ckpt: str | Path, fmt: str = "safetensors", out: str | Path | None = None,
           use_ema: bool = True) -> Path:
    """Export the model state dict of a cnn_bench checkpoint (its EMA weights when it has them
    and ``use_ema``, as ``evaluate.py`` would score); return the written path."""
    if fmt not in FORMATS:
        raise CnnBenchError(f"format must be one of {', '.join(FORMATS)}; got '{fmt}'")
    ck = load_checkpoint(ckpt)
    name = Path(ckpt).stem + "_weights" + FORMATS[fmt]
    out = Path(out) if out else Path(ckpt).with_name(name)
    if out.is_dir():  # out=<a folder>: the default file name, in it
        out = out / name
    weights, which = model_weights(ck, use_ema)
    # safetensors refuses views into shared storage; contiguous copies are what a reader wants.
    state = {k: v.detach().contiguous().cpu() for k, v in weights.items()}
    if fmt == "safetensors":
        from safetensors.torch import save

        meta = {"format": "cnn_bench.weights/1", "config": ck["config"],
                "classes": json.dumps(ck["classes"]), "num_classes": str(ck["num_classes"]),
                "resolution": str(ck["resolution"]), "weights": which}
        atomic_write(out, lambda f: f.write(save(state, metadata=meta)))
    else:
        atomic_save(state, out)
    return out


def main(argv: list[str]) -> None:
    args = OmegaConf.from_dotlist([a for a in argv if "=" in a])
    if not args.get("ckpt"):
        fail("ckpt=PATH is required, e.g. ckpt=outputs/<run>/checkpoints/best.pt format=safetensors")
    try:
        path = export(args.ckpt, args.get("format", "safetensors"), args.get("out"),
                      use_ema=args.get("use_ema", True))
    except CnnBenchError as e:
        fail(str(e))
    except OSError as e:  # out= unwritable, a missing parent we may not create, a full disk
        fail(f"cannot write the export: {e.strerror or e} ({e.filename or args.get('out')})")
    print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB)")


if __name__ == "__main__":
    main(sys.argv[1:])
