"""``python -m cnn_bench.export ckpt=PATH [format=safetensors|pt] [out=FILE|DIR/] [use_ema=false]``

Writes a checkpoint's model weights alone (no optimizer or RNG state), for sharing: the weights
``evaluate.py`` scores, i.e. the EMA weights of runs with ``trainer.ema_decay`` unless
``use_ema=false``. The safetensors file carries as metadata the run's config, class names,
input normalisation (``mean``, ``std``) and the model config as built (``model``: ``stem: auto``
resolved). A torchvision or timm passthrough's weights keep the library's own names.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from omegaconf import OmegaConf

from cnn_bench.checkpoint import atomic_save, atomic_write, load_checkpoint, model_weights
from cnn_bench.cli import fail
from cnn_bench.errors import CnnBenchError, did_you_mean
from cnn_bench.models.build import trained_model_config
from cnn_bench.models.weights import PASSTHROUGH_PREFIX

FORMATS = {"safetensors": ".safetensors", "pt": ".pt"}


def export(ckpt: str | Path, fmt: str = "safetensors", out: str | Path | None = None,
           use_ema: bool = True) -> Path:
    """Export the model state dict of a cnn_bench checkpoint (its EMA weights when it has them
    and ``use_ema``, as ``evaluate.py`` would score); return the written path."""
    if fmt not in FORMATS:
        raise CnnBenchError(f"format must be one of {', '.join(FORMATS)}; got '{fmt}'")
    ck = load_checkpoint(ckpt)
    name = Path(ckpt).stem + "_weights" + FORMATS[fmt]
    if not out:
        out = Path(ckpt).with_name(name)
    elif Path(out).is_dir() or str(out).endswith(("/", os.sep)):
        out = Path(out) / name  # out=<a folder>: the default file name, in it
    else:
        out = Path(out)
        other = {v: k for k, v in FORMATS.items() if k != fmt}.get(out.suffix.lower())
        if other:  # model.weights= reads a file by its suffix
            raise CnnBenchError(f"out={out} names a {other} file but format={fmt}: use "
                                f"format={other}, or an out= ending in {FORMATS[fmt]}")
        if out.suffix.lower() != FORMATS[fmt]:  # a reader must be able to tell the format
            out = out.with_name(out.name + FORMATS[fmt])
    weights, which = model_weights(ck, use_ema)
    run_cfg = OmegaConf.create(ck["config"])
    if (run_cfg.model.get("source") or "zoo") != "zoo":
        # A passthrough wraps the library's model as ``model``: its file gets the library's own
        # names, so torchvision's or timm's builder loads it as is (model.weights= takes both).
        weights = {k.removeprefix(PASSTHROUGH_PREFIX): v for k, v in weights.items()}
    # safetensors refuses views into shared storage; contiguous copies are what a reader wants.
    state = {k: v.detach().contiguous().cpu() for k, v in weights.items()}
    if fmt == "safetensors":
        from safetensors.torch import save

        # What a reader needs to feed the weights: the normalisation they were trained with
        # (measured or a pretrained source's: not always the config's dataset.mean/std) and the
        # model as built (stem: auto resolved), besides the run's config.
        model = trained_model_config(run_cfg.model, int(ck["resolution"]))
        meta = {"format": "cnn_bench.weights/1", "config": ck["config"],
                "classes": json.dumps(ck["classes"]), "num_classes": str(ck["num_classes"]),
                "resolution": str(ck["resolution"]), "mean": json.dumps(list(ck["mean"])),
                "std": json.dumps(list(ck["std"])), "model": json.dumps(model), "weights": which}
        atomic_write(out, lambda f: f.write(save(state, metadata=meta)))
    else:
        atomic_save(state, out)
    return out


KEYS = ("ckpt", "format", "out", "use_ema")


def main(argv: list[str]) -> None:
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__.strip())
        return
    bad = [a for a in argv if "=" not in a]
    if bad:
        fail(f"'{bad[0]}' is not KEY=VALUE; usage: python -m cnn_bench.export ckpt=PATH "
             "[format=safetensors|pt] [out=FILE|DIR/] [use_ema=true|false]")
    try:
        args = OmegaConf.from_dotlist(argv)
    except Exception as e:  # noqa: BLE001 - a grammar error in a value
        fail(f"cannot parse the arguments: {str(e).splitlines()[0]}")
    unknown = [k for k in args if k not in KEYS]
    if unknown:
        fail(f"unknown key '{unknown[0]}': {did_you_mean(str(unknown[0]), KEYS)}")
    if not args.get("ckpt"):
        fail("ckpt=PATH is required, e.g. ckpt=outputs/<run>/checkpoints/best.pt format=safetensors")
    use_ema = args.get("use_ema", True)
    if not isinstance(use_ema, bool):
        fail(f"use_ema must be true or false; got '{use_ema}'")
    try:
        path = export(args.ckpt, args.get("format", "safetensors"), args.get("out"),
                      use_ema=use_ema)
    except CnnBenchError as e:
        fail(str(e))
    except OSError as e:  # out= unwritable, a missing parent we may not create, a full disk
        fail(f"cannot write the export: {e.strerror or e} ({e.filename or args.get('out')})")
    print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB)")


if __name__ == "__main__":
    main(sys.argv[1:])
