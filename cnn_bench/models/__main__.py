"""``python -m cnn_bench.models [pattern] --resolution 224 --num-classes 1000``: a table of the
zoo's models with their parameters, forward GFLOPs and MMACs per image, and output shape.

The stem follows the ``auto`` rule for the resolution. The ``torchvision``/``timm`` passthroughs
are listed only when named (they build their default ``name``, resnet18).
"""

from __future__ import annotations

import argparse
import sys

import torch

from cnn_bench.errors import CnnBenchError, did_you_mean
from cnn_bench.models import build_model, count_flops, count_params, list_models
from cnn_bench.models.external import PASSTHROUGHS


def _select(pattern: str) -> list[str]:
    if pattern in list_models():
        return [pattern]
    wildcard = any(c in pattern for c in "*?[")
    # a plain word that names no model lists the models containing it (resnet -> resnet18, ...)
    matched = list_models(pattern if wildcard else f"*{pattern}*")
    names = [n for n in matched if n not in PASSTHROUGHS]
    if not names:
        if matched:  # a pattern of passthroughs only: they are listed by their name
            raise CnnBenchError(f"'{pattern}' matches only {', '.join(matched)}, listed by name: "
                                f"python -m cnn_bench.models {matched[0]}")
        hint = did_you_mean(pattern, list_models()) if not wildcard else ""
        raise CnnBenchError(f"no model matches '{pattern}'" + (f": {hint}" if hint else ""))
    return names


def _row(name: str, resolution: int, num_classes: int) -> tuple[str, ...]:
    cfg = {"name": name, "stem": "auto"}
    if name in PASSTHROUGHS:
        cfg = {"source": name, "name": "resnet18"}
    model = build_model(cfg, num_classes, resolution)
    flops = count_flops(model, resolution)
    model.eval()
    with torch.no_grad():
        out = model(torch.zeros(1, 3, resolution, resolution))
    return (name, f"{count_params(model) / 1e6:.2f}M", f"{flops / 1e9:.3f}", f"{flops / 2e6:.1f}",
            str(list(out.shape)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cnn_bench.models", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("pattern", nargs="?", default="*",
                        help="model name or glob pattern (default: every zoo model)")
    parser.add_argument("--resolution", type=int, default=224, help="input size in px")
    parser.add_argument("--num-classes", type=int, default=1000)
    args = parser.parse_args(argv)
    try:
        if args.resolution < 8 or args.num_classes < 1:  # 8 px: dataset.resolution's minimum
            raise CnnBenchError("--resolution must be >= 8 and --num-classes >= 1")
        names = _select(args.pattern)
        widths = [max(len("name"), *map(len, names)), 8, 8, 9, 12]
        fmt = "{:<%d}  {:>%d}  {:>%d}  {:>%d}  {:<%d}" % tuple(widths)
        for i, name in enumerate(names):
            row = _row(name, args.resolution, args.num_classes)
            if i == 0:  # after the first build, so a bad option prints only the error
                stem = "their own stem" if names[0] in PASSTHROUGHS else "stem auto"
                print(f"resolution {args.resolution} px, {args.num_classes} classes, {stem} "
                      f"(FLOPs = 2 x MACs)")
                print(fmt.format("name", "params", "GFLOPs", "MMACs", "output").rstrip())
                print("  ".join("-" * w for w in widths))
            print(fmt.format(*row).rstrip(), flush=True)
    except CnnBenchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
