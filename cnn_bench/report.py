"""The report of a sweep: ``python -m cnn_bench.report <sweep dir>`` (also run when a multirun ends).

Writes into the sweep directory:

- ``results.csv`` and ``results.md``: one row per job (finished, running or failed);
- ``acc_vs_flops.png``, ``acc_vs_params.png``, ``heatmap_width_resolution.png``;
- ``tb/``: the same figures and table for TensorBoard. ``tensorboard --logdir <sweep dir>`` also
  finds every job's own ``tb/`` (curves, and the HParams entry each finished job writes).
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

from cnn_bench.sweep.results import JobRow, collect, counts, find_jobs, pareto_front
from cnn_bench.sweep.status import DONE

CSV_NAME, MD_NAME, TB_DIR = "results.csv", "results.md", "tb"


def _sorted(rows: list[JobRow]) -> list[JobRow]:
    return sorted(rows, key=lambda r: (r.model or "", -(r.width or 0), -(r.resolution or 0), r.job))


def write_csv(rows: list[JobRow], path: Path) -> None:
    """Every :class:`JobRow` field, one row per job; empty cells where a value is unknown."""
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=JobRow.columns())
        writer.writeheader()
        for r in _sorted(rows):
            writer.writerow({k: ("" if v is None else v) for k, v in r.as_dict().items()})


def _pct(v) -> str:
    return "" if v is None else f"{100 * v:.2f}"


def _num(v, fmt: str, scale: float = 1.0) -> str:
    return "" if v is None else format(v / scale if scale != 1.0 else v, fmt)


def _epochs(r: JobRow) -> str:
    done = "" if r.epochs is None else str(r.epochs)
    return f"{done}/{r.max_epochs}" if r.max_epochs is not None else done


def markdown_table(rows: list[JobRow]) -> str:
    """The results table in Markdown, accuracies in %, params in millions, FLOPs in GFLOPs; the
    last column names the job, so jobs that differ in other settings (a seed) stay apart."""
    head = ["model", "width", "res (px)", "params (M)", "GFLOPs", "best val acc (%)",
            "best val loss", "final val acc (%)", "final val loss", "train acc (%)",
            "test acc (%)", "epochs",
            "wall time (s)", "train img/s", "status", "job"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in _sorted(rows):
        cells = [r.model or "", _num(r.width, "g"), _num(r.resolution, "d"),
                 _num(r.params, ".3f", 1e6), _num(r.flops, ".4f", 1e9), _pct(r.best_val_acc),
                 _num(r.best_val_loss, ".4f"), _pct(r.final_val_acc), _num(r.final_val_loss, ".4f"),
                 _pct(r.final_train_acc), _pct(r.test_acc), _epochs(r), _num(r.wall_time_s, ".1f"),
                 _num(r.images_per_s, ".0f"), r.status, f"`{r.job}`"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def status_line(rows: list[JobRow]) -> str:
    """``4 jobs: 3 done, 1 failed``."""
    return f"{len(rows)} jobs: " + ", ".join(f"{n} {s}" for s, n in counts(rows).items())


def write_markdown(rows: list[JobRow], path: Path, figures: list[str]) -> None:
    """``results.md``: status, failures with their reasons, Pareto-optimal jobs, table, figures."""
    parts = [f"# Sweep report: {path.parent.name}", "", status_line(rows), ""]
    bad = [r for r in _sorted(rows) if r.status != DONE]
    if bad:
        parts += ["## Not done", ""] + [f"- `{r.job}`: {r.status}" + (f": {r.reason}" if r.reason else "")
                                        for r in bad] + [""]
    front = pareto_front([r for r in rows if r.status == DONE])
    if front:
        parts += ["## Pareto front (accuracy vs FLOPs)", ""]
        # named by their job too: jobs may differ in settings other than these (a seed, an lr)
        parts += [f"- {r.model}{'' if r.width is None else f' x{r.width:g}'} @ {r.resolution} px: "
                  f"{_pct(r.best_val_acc)}% at {_num(r.flops, '.4f', 1e9)} GFLOPs (`{r.job}`)"
                  for r in front] + [""]
    parts += ["## Results", "", markdown_table(rows), ""]
    parts += ["## Figures", ""] + [f"![{name}]({name})" for name in figures] + [""]
    path.write_text("\n".join(parts))


def log_to_tensorboard(sweep_dir: Path, figures: dict, rows: list[JobRow]) -> None:
    """Replace ``<sweep>/tb`` with the current figures and table (a report is regenerated, not appended)."""
    from torch.utils.tensorboard import SummaryWriter

    tb = sweep_dir / TB_DIR
    if tb.is_dir():
        for old in tb.glob("events.out.tfevents.*"):
            old.unlink()
    step = sum(r.status == DONE for r in rows)  # finished jobs when this report was made
    with SummaryWriter(str(tb)) as writer:
        for name, fig in figures.items():
            writer.add_figure(f"sweep/{Path(name).stem}", fig, global_step=step, close=False)
        writer.add_text("sweep/results", status_line(rows) + "\n\n" + markdown_table(rows), step)


def write_report(sweep_dir: str | Path, tensorboard: bool = True) -> list[JobRow]:
    """Write the CSV, Markdown, PNG figures (and TensorBoard copy) of a sweep; return its rows."""
    sweep_dir = Path(sweep_dir)
    rows = collect(sweep_dir)
    write_csv(rows, sweep_dir / CSV_NAME)
    try:
        from cnn_bench.sweep.plots import FIGURES, save
    except ImportError as e:  # a partial install: the tables matter more than the figures
        print(f"warning: no figures ({e}); pip install matplotlib", file=sys.stderr)
        FIGURES, save = {}, None
    figures = {name: make(rows) for name, make in FIGURES.items()}
    for name, fig in figures.items():
        save(fig, sweep_dir / name)
    write_markdown(rows, sweep_dir / MD_NAME, list(figures))
    if tensorboard:
        log_to_tensorboard(sweep_dir, figures, rows)
    return rows


def main(argv: list[str] | None = None) -> int:
    """CLI: write the report of a sweep directory (exit status 2 if there is no sweep there)."""
    parser = argparse.ArgumentParser(prog="python -m cnn_bench.report", description=__doc__.splitlines()[0])
    parser.add_argument("sweep_dir", type=Path, help="a multirun directory (hydra.sweep.dir)")
    parser.add_argument("--no-tensorboard", action="store_true", help="skip writing <sweep>/tb")
    args = parser.parse_args(argv)
    if not args.sweep_dir.is_dir():
        print(f"error: no sweep directory at {args.sweep_dir}", file=sys.stderr)
        return 2
    if not find_jobs(args.sweep_dir):
        print(f"error: no job directories under {args.sweep_dir}", file=sys.stderr)
        return 2
    rows = write_report(args.sweep_dir, tensorboard=not args.no_tensorboard)
    print(f"{args.sweep_dir}: {status_line(rows)}")
    print(f"report: {args.sweep_dir / MD_NAME}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
