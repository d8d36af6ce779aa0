"""Read a sweep directory into one row per job, finished or not.

A job directory is any directory under the sweep holding ``status.json``, ``summary.json`` or a
Hydra ``.hydra/`` record. Finished jobs are read from ``summary.json``; unfinished or failed
ones from ``metrics.jsonl`` (the epochs done so far) and their config.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from cnn_bench.sweep.status import DONE, FAILED, INTERRUPTED, RUNNING, read_status

# Directories that never hold a job. A job's own outputs (tb/, checkpoints/, eval/) are not
# walked anyway; on the way down to a job those names can be folders of a swept path value
# (model.weights=/runs/a/checkpoints/best.pt nests the job under .../checkpoints/best.pt).
_NOT_JOBS = {".hydra", ".submitit", "__pycache__"}


@dataclass
class JobRow:
    """One job's settings and results; numbers are ``None`` where not known (yet)."""

    job: str                              # path relative to the sweep directory
    status: str                           # done | running | failed | interrupted | unknown
    model: str | None = None
    width: float | None = None            # model.width_mult
    resolution: int | None = None         # px
    params: int | None = None
    flops: int | None = None              # forward FLOPs per image
    best_val_acc: float | None = None     # fraction, at the best epoch (the best.pt checkpoint)
    best_val_loss: float | None = None    # at the best epoch
    best_epoch: int | None = None
    final_val_acc: float | None = None
    final_val_loss: float | None = None
    final_train_acc: float | None = None
    final_train_loss: float | None = None
    test_acc: float | None = None
    epochs: int | None = None             # epochs completed
    max_epochs: int | None = None         # trainer.epochs
    wall_time_s: float | None = None
    images_per_s: float | None = None     # training throughput
    reason: str | None = None             # why it failed

    @classmethod
    def columns(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _read_metrics(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue  # a line being written right now
    return records


def _read_config(job: Path):
    """The resolved config the trainer wrote, else Hydra's (possibly unresolved) record."""
    for path in (job / "config.yaml", job / ".hydra" / "config.yaml"):
        if path.is_file():
            try:
                return OmegaConf.load(path)
            except Exception:  # noqa: BLE001  (half-written file: try the other one)
                continue
    return OmegaConf.create()


def _select(cfg, key: str):
    try:
        value = OmegaConf.select(cfg, key, throw_on_resolution_failure=False)
    except Exception:  # noqa: BLE001  (interpolations that need Hydra's resolvers)
        return None
    return value if isinstance(value, (int, float, str, bool)) else None


def _finite(v):
    return v if isinstance(v, (int, float)) and not (isinstance(v, float) and math.isnan(v)) else None


def find_jobs(sweep_dir: str | Path) -> list[Path]:
    """Every job directory under ``sweep_dir`` (nested names included), sorted by path."""
    sweep_dir = Path(sweep_dir)
    jobs = []
    for root, dirs, files in os.walk(sweep_dir):
        here = Path(root)
        if here != sweep_dir and ("status.json" in files or "summary.json" in files
                                  or ".hydra" in dirs):
            jobs.append(here)
            dirs[:] = []  # a job's own subdirectories are its outputs
        else:
            dirs[:] = sorted(d for d in dirs if d not in _NOT_JOBS)
    return sorted(jobs)


def _status(job: Path, summary: dict) -> tuple[str, str | None]:
    record = read_status(job)
    status = record.get("status")
    if status is None:
        status = DONE if summary else "unknown"  # a job of a run without status records
    return status, record.get("reason")


def read_job(sweep_dir: str | Path, job: Path) -> JobRow:
    """One job's row: ``summary.json`` when finished, else partial figures from ``metrics.jsonl``."""
    summary = _read_json(job / "summary.json")
    metrics = _read_metrics(job / "metrics.jsonl")
    cfg = _read_config(job)
    status, reason = _status(job, summary)
    row = JobRow(job=job.relative_to(sweep_dir).as_posix(), status=status, reason=reason,
                 model=summary.get("model") or _select(cfg, "model.name"),
                 width=summary.get("width_mult", _select(cfg, "model.width_mult")),
                 resolution=summary.get("resolution") or _select(cfg, "dataset.resolution"),
                 max_epochs=_select(cfg, "trainer.epochs"))
    if metrics:
        last = metrics[-1]
        accs = [_finite(m.get("val/acc")) for m in metrics]
        if any(a is not None for a in accs):
            i = max(range(len(accs)), key=lambda k: -1.0 if accs[k] is None else accs[k])
            row.best_val_acc, row.best_epoch = accs[i], metrics[i].get("epoch")
        row.final_val_acc, row.final_val_loss = _finite(last.get("val/acc")), _finite(last.get("val/loss"))
        row.final_train_acc = _finite(last.get("train/acc"))
        row.final_train_loss = _finite(last.get("train/loss"))
        row.epochs = last.get("epoch")
        seconds = sum(m.get("epoch_time_s") or 0.0 for m in metrics)
        images = sum((m.get("train/images_per_s") or 0.0) * (m.get("epoch_time_s") or 0.0)
                     for m in metrics)
        # wall time includes evaluation, start-up and checkpoints: not the epochs' sum (records
        # of older runs lack it, and their cell stays empty)
        row.wall_time_s = _finite(last.get("wall_time_s"))
        row.images_per_s = images / seconds if seconds else None
    if summary:
        for key in ("params", "flops", "best_val_acc", "best_epoch", "final_val_acc",
                    "final_val_loss", "final_train_acc", "final_train_loss", "test_acc",
                    "epochs", "wall_time_s"):
            if summary.get(key) is not None:
                setattr(row, key, summary[key])
        row.images_per_s = summary.get("train_images_per_s", row.images_per_s)
    at_best = [m for m in metrics if row.best_epoch is not None and m.get("epoch") == row.best_epoch]
    if at_best:
        row.best_val_loss = _finite(at_best[-1].get("val/loss"))
    if row.width is None and row.model is not None:
        row.width = 1.0  # models without a width multiplier run at full width
    return row


def collect(sweep_dir: str | Path) -> list[JobRow]:
    """One :class:`JobRow` per job under ``sweep_dir``."""
    sweep_dir = Path(sweep_dir)
    return [read_job(sweep_dir, job) for job in find_jobs(sweep_dir)]


def pareto_front(rows: list[JobRow], x: str = "flops", y: str = "best_val_acc") -> list[JobRow]:
    """Rows no other row beats on both axes (fewer ``x`` and higher ``y``), sorted by ``x``;
    exact ties (same ``x`` and ``y``) are all kept: neither dominates the other."""
    pts = sorted((r for r in rows if getattr(r, x) is not None and getattr(r, y) is not None),
                 key=lambda r: (getattr(r, x), -getattr(r, y)))
    front, best, last = [], -math.inf, None
    for r in pts:
        point = (getattr(r, x), getattr(r, y))
        if point[1] > best or point == last:
            front.append(r)
            best, last = point[1], point
    return front


def counts(rows: list[JobRow]) -> dict[str, int]:
    """How many jobs are in each status, in a fixed order."""
    order = [DONE, FAILED, INTERRUPTED, RUNNING]
    out = {s: 0 for s in order}
    for r in rows:
        out[r.status] = out.get(r.status, 0) + 1
    return {k: v for k, v in out.items() if v or k in (DONE, FAILED)}
