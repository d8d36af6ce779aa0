"""Per-epoch accuracy and epoch time of several runs side by side, as a markdown table.

    python benchmarks/epoch_table.py "before=outputs/run_a" "after=outputs/run_b" --out curves.md

Each argument is ``LABEL=PATH``: a run directory (its ``metrics.jsonl``) or a ``metrics.jsonl``
file. Rows are epochs; each run contributes its ``val/acc`` (the test accuracy in
``time_to_accuracy.py``'s runs, which train with ``dataset.val_fraction=0``) and its
``epoch_time_s`` (s, two decimals). A run that stopped early shows ``-`` for the epochs it
did not reach, and a run without an evaluation split ``-`` for its accuracy.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def read_epochs(path: Path) -> dict[int, dict]:
    """{epoch: record} of the epoch records (lines with ``val/acc``) in a run's metrics.jsonl."""
    if path.is_dir():
        path = path / "metrics.jsonl"
    if not path.is_file():
        raise SystemExit(f"error: no metrics.jsonl at {path}")
    records = (json.loads(line) for line in path.read_text().splitlines() if line.strip())
    return {r["epoch"]: r for r in records if "val/acc" in r and "epoch" in r}


def _fmt(value: float | None, digits: int) -> str:
    # A run without a val/test split logs val/acc as null; epoch times are tenths of a second on
    # a GPU (the speedrun), so whole seconds would read 0.
    return "-" if value is None else f"{value:.{digits}f}"


def table(runs: dict[str, dict[int, dict]]) -> str:
    epochs = sorted({e for recs in runs.values() for e in recs})
    head = " | ".join(f"{label}: acc | {label}: epoch s" for label in runs)
    lines = [f"| epoch | {head} |", "|---|" + "---|---|" * len(runs)]
    for e in epochs:
        cells = []
        for recs in runs.values():
            r = recs.get(e)
            cells += [_fmt(r.get("val/acc"), 4), _fmt(r.get("epoch_time_s"), 2)] if r else ["-", "-"]
        lines.append(f"| {e} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Example:\n  python benchmarks/epoch_table.py before=outputs/run_a after=outputs/run_b")
    ap.add_argument("runs", nargs="+", help="LABEL=PATH (run directory or metrics.jsonl)")
    ap.add_argument("--out", help="also write the table to this file")
    args = ap.parse_args(argv)
    runs = {}
    for spec in args.runs:
        label, sep, path = spec.partition("=")
        if not sep or not label or not path:
            raise SystemExit(f"error: '{spec}' is not LABEL=PATH")
        runs[label] = read_epochs(Path(path))
    text = table(runs)
    sys.stdout.write(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
