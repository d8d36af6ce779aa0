"""The sweep report's figures: accuracy vs FLOPs, accuracy vs parameters, width x resolution heatmaps.

Figures are drawn with matplotlib's object API on the Agg canvas, so making a report never
touches pyplot's global state or needs a display.
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from cnn_bench.sweep.results import JobRow, pareto_front
from cnn_bench.sweep.status import DONE

_MARKERS = "osD^vP*Xh<>p"
_STYLES = ["-", "--", ":", "-."]
_DPI = 120


def _colours(models: list[str]) -> dict[str, tuple]:
    import matplotlib

    cmap = matplotlib.colormaps["tab10"]
    return {m: cmap(i % 10) for i, m in enumerate(models)}


def _markers(widths: list[float]) -> dict[float, str]:
    return {w: _MARKERS[i % len(_MARKERS)] for i, w in enumerate(sorted(widths, reverse=True))}


def _plottable(rows: list[JobRow], x: str) -> list[JobRow]:
    return [r for r in rows if r.best_val_acc is not None and getattr(r, x) is not None]


def _empty(ax, text: str = "no finished jobs yet") -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="grey")


def _log_if_wide(ax, values: list[float]) -> None:
    # Width x resolution grids span 10-50x in FLOPs; a linear axis crowds the small models.
    if values and min(values) > 0 and max(values) / min(values) > 10:
        ax.set_xscale("log")


def _mark_front(ax, rows: list[JobRow], x: str, scale: float) -> None:
    front = pareto_front(rows, x=x)
    if not front:
        return
    xs = [getattr(r, x) / scale for r in front]
    ys = [100 * r.best_val_acc for r in front]
    ax.plot(xs, ys, color="black", lw=1, ls="--", drawstyle="steps-post", zorder=1,
            label="Pareto front")
    ax.scatter(xs, ys, s=160, facecolors="none", edgecolors="black", lw=1.2, zorder=4)


def _lines(ax, rows: list[JobRow], x: str, scale: float, group: str, along: str) -> None:
    """One line per (model, ``group``) through the rows sorted by ``along``, labelled by resolution."""
    models = sorted({r.model or "?" for r in rows})
    colour, marker = _colours(models), _markers(list({r.width for r in rows}))
    keys = sorted({getattr(r, group) for r in rows}, key=lambda k: -(k or 0))
    style = {k: _STYLES[i % len(_STYLES)] for i, k in enumerate(keys)}
    groups: dict[tuple, list[JobRow]] = defaultdict(list)
    for r in rows:
        groups[(r.model or "?", getattr(r, group))].append(r)
    for (model, key), members in sorted(groups.items(), key=lambda kv: (kv[0][0], -(kv[0][1] or 0))):
        members.sort(key=lambda r: getattr(r, along) or 0)
        xs = [getattr(r, x) / scale for r in members]
        ys = [100 * r.best_val_acc for r in members]
        label = f"{model} x{key:g}" if group == "width" else f"{model} @ {key} px"
        ax.plot(xs, ys, color=colour[model], ls=style[key], lw=1.2, alpha=0.8, label=label, zorder=2)
        for r, xv, yv in zip(members, xs, ys):
            done = r.status == DONE
            ax.scatter([xv], [yv], marker=marker[r.width], s=36, zorder=3, color=colour[model],
                       facecolors=colour[model] if done else "none")
            ax.annotate(f"{r.resolution}" if group == "width" else f"x{r.width:g}", (xv, yv),
                        textcoords="offset points", xytext=(4, 3), fontsize=6, color="dimgrey")


def _finish(fig: Figure, ax, xlabel: str, title: str) -> None:
    ax.set_xlabel(xlabel)
    ax.set_ylabel("best val accuracy (%)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    if handles:
        ax.legend(fontsize=7, loc="lower right", ncol=1 + len(handles) // 14)
    fig.tight_layout()


def _acc_vs(rows: list[JobRow], key: str, scale: float, group: str, along: str,
            xlabel: str, title: str) -> Figure:
    """Best val accuracy against ``key`` (in units of ``scale``), one line per model and
    ``group`` through its ``along`` values, with the Pareto front marked."""
    fig = Figure(figsize=(8, 5.5), dpi=_DPI)
    ax = fig.add_subplot()
    pts = _plottable(rows, key)
    if pts:
        _lines(ax, pts, key, scale, group=group, along=along)
        # finished jobs only, as results.md's front: a diverged job has FLOPs and a best too
        _mark_front(ax, [r for r in pts if r.status == DONE], key, scale)
        _log_if_wide(ax, [getattr(r, key) / scale for r in pts])
    else:
        _empty(ax)
    _finish(fig, ax, xlabel, title)
    return fig


def acc_vs_flops(rows: list[JobRow]) -> Figure:
    """Best val accuracy against GFLOPs per image: one line per model and width across resolutions."""
    return _acc_vs(rows, "flops", 1e9, "width", "resolution", "GFLOPs per image (forward)",
                   "Accuracy vs FLOPs (point labels: resolution in px)")


def acc_vs_params(rows: list[JobRow]) -> Figure:
    """Best val accuracy against parameters: one line per model and resolution across widths."""
    return _acc_vs(rows, "params", 1e6, "resolution", "width", "parameters (millions)",
                   "Accuracy vs parameters (point labels: width multiplier)")


def heatmap_cells(rows: list[JobRow], widths: list, ress: list) -> tuple[list, list]:
    """(grid of best val accuracy in %, cell labels) for one model's rows: jobs that share a
    cell (seeds, other settings) are averaged, their count shown as ``(n=2)``; ``*`` marks a
    cell with a job not done (running, interrupted, failed); a cell with no accuracy yet shows
    its job's status."""
    cells: dict[tuple[int, int], list[JobRow]] = {}
    for r in rows:
        if r.resolution is not None:
            cells.setdefault((widths.index(r.width), ress.index(r.resolution)), []).append(r)
    grid = [[math.nan] * len(ress) for _ in widths]
    notes = [[""] * len(ress) for _ in widths]
    for (i, j), group in cells.items():
        accs = [100 * r.best_val_acc for r in group if r.best_val_acc is not None]
        if not accs:
            notes[i][j] = group[0].status
            continue
        grid[i][j] = sum(accs) / len(accs)
        notes[i][j] = (f"{grid[i][j]:.1f}" + (f" (n={len(accs)})" if len(accs) > 1 else "")
                       + ("" if all(r.status == DONE for r in group) else "*"))
    return grid, notes


def width_resolution_heatmap(rows: list[JobRow]) -> Figure:
    """Per model, a width x resolution grid of best val accuracy (%) on one shared colour scale
    (jobs in the same cell averaged: see :func:`heatmap_cells`)."""
    models = sorted({r.model for r in rows if r.model})
    # constrained layout keeps the axis labels and the shared colour bar inside the figure
    fig = Figure(figsize=(max(4.5, 4.2 * len(models)), 4), dpi=_DPI, layout="constrained")
    if not models:
        _empty(fig.add_subplot(), "no jobs yet")
        return fig
    accs = [100 * r.best_val_acc for r in rows if r.best_val_acc is not None]
    vmin, vmax = (min(accs), max(accs)) if accs else (0.0, 100.0)
    vmax = vmax if vmax > vmin else vmin + 1  # one value (or all equal): the scale's dark end
    axes = fig.subplots(1, len(models), squeeze=False)[0]
    image = None
    for ax, model in zip(axes, models):
        mine = [r for r in rows if r.model == model]
        widths = sorted({r.width for r in mine}, reverse=True)
        ress = sorted({r.resolution for r in mine if r.resolution is not None})
        grid, notes = heatmap_cells(mine, widths, ress)
        image = ax.imshow(grid, cmap="viridis", vmin=vmin, vmax=vmax, aspect="auto")
        for i in range(len(widths)):
            for j in range(len(ress)):
                v = grid[i][j]
                dark = math.isnan(v) or v < (vmin + vmax) / 2
                ax.text(j, i, notes[i][j], ha="center", va="center", fontsize=7,
                        color="white" if dark and not math.isnan(v) else "black")
        ax.set_xticks(range(len(ress)), [str(r) for r in ress])
        ax.set_yticks(range(len(widths)), [f"{w:g}" for w in widths])
        ax.set_xlabel("resolution (px)")
        ax.set_ylabel("width multiplier")
        ax.set_title(model)
    if image is not None:
        fig.colorbar(image, ax=list(axes), label="best val accuracy (%)", shrink=0.9)
    fig.suptitle("Best val accuracy (%); * not done (running, interrupted or failed)", fontsize=9)
    return fig


FIGURES = {
    "acc_vs_flops.png": acc_vs_flops,
    "acc_vs_params.png": acc_vs_params,
    "heatmap_width_resolution.png": width_resolution_heatmap,
}


def save(fig: Figure, path: str | Path) -> None:
    """Render ``fig`` on the Agg canvas to a PNG."""
    FigureCanvasAgg(fig)
    fig.savefig(path)
