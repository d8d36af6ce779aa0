"""A run's records: TensorBoard events, ``metrics.jsonl`` (one line per epoch) and ``summary.json``."""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

from torch.utils.tensorboard import SummaryWriter


def write_json(path: str | Path, obj: Any) -> None:
    """Write JSON atomically (temp file + replace), so a reader never sees half a file."""
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def _finite_or_none(v):
    return None if isinstance(v, float) and not math.isfinite(v) else v


def _start_after_event_files(tb: Path) -> None:
    """Wait (at most 1 s) until a new event file's name sorts after those already in ``tb``.

    TensorBoard reads a run's files in name order, ``events.out.tfevents.<unix s>.<host>.<pid>.
    <writer counter>``, and the purge of a resumed run applies only to files read before its
    own. An attempt resumed in the same process and second as the first (a notebook, a test)
    whose counter crosses a digit (9 -> 10) would sort first and its curve double back."""
    seconds = [int(part) for p in tb.glob("events.out.tfevents.*")
               if (part := p.name.split(".")[3]).isdigit()]
    if seconds:
        time.sleep(min(max(0.0, max(seconds) + 1 - time.time()), 1.0))


class RunLog:
    """Writes one run's metrics to TensorBoard (``<run>/tb``) and ``<run>/metrics.jsonl``."""

    def __init__(self, output_dir: str | Path, start_step: int = 0, start_epoch: int = 0,
                 history: list[dict] | None = None):
        """``history``: the epoch records of a resumed run's earlier attempts (its checkpoint's
        ``state.history``), written again where this directory has none of them (a run resumed
        from a checkpoint elsewhere), so its metrics and curves start at epoch 1."""
        self.dir = Path(output_dir)
        _start_after_event_files(self.dir / "tb")
        # purge_step drops events a crashed run wrote past its last checkpoint (steps > start_step:
        # the checkpointed epoch's own record is logged at start_step and stays), so resumed
        # curves do not double back on themselves.
        self.tb = SummaryWriter(str(self.dir / "tb"), purge_step=start_step + 1 if start_step else None)
        self.metrics_path = self.dir / "metrics.jsonl"
        if start_epoch == 0:
            self.metrics_path.write_text("")
        elif self.metrics_path.exists():
            # The checkpoint's history is the record of the epochs kept: the file may hold later
            # epochs of a crashed attempt, or a line torn by a kill while it was written.
            if history:
                self.metrics_path.write_text("".join(
                    _jsonl(r) for r in history if r.get("epoch", 0) <= start_epoch))
            else:
                self._truncate_metrics(start_epoch)
        else:
            self.metrics_path.write_text("")
            for record in history or []:
                self.epoch(record["step"], record)

    def _truncate_metrics(self, keep_epochs: int) -> None:
        """Keep the records of the first ``keep_epochs`` epochs (a checkpoint without history)."""
        kept = []
        for ln in self.metrics_path.read_text().splitlines():
            try:
                record = json.loads(ln)
            except ValueError:
                continue  # torn (or blank): the epoch it was for is redone
            if record.get("epoch", 0) <= keep_epochs:
                kept.append(ln + "\n")
        self.metrics_path.write_text("".join(kept))

    def steps(self, first_step: int, losses: list[float], lrs: list[float]) -> None:
        for i, (loss, lr) in enumerate(zip(losses, lrs)):
            self.tb.add_scalar("train/loss_step", loss, first_step + i)
            self.tb.add_scalar("train/lr", lr, first_step + i)

    def epoch(self, step: int, record: dict) -> None:
        """Log one epoch's record (keys like ``train/loss``) to TensorBoard and metrics.jsonl."""
        for k, v in record.items():
            if isinstance(v, (int, float)) and k not in ("epoch", "step") and v is not None:
                self.tb.add_scalar(k, v, step)
        with self.metrics_path.open("a") as f:
            f.write(_jsonl(record))
        self.tb.flush()

    def hparams(self, hparams: dict, metrics: dict) -> None:
        """An HParams entry carrying the run's final metrics (TensorBoard's HPARAMS tab)."""
        hp = {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in hparams.items()}
        mt = {f"hparam/{k}": float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
        self.tb.add_hparams(hp, mt, run_name=".")

    def close(self) -> None:
        self.tb.close()


def _jsonl(record: dict) -> str:
    """One metrics.jsonl line (non-finite numbers as null: JSON has no NaN)."""
    return json.dumps({k: _finite_or_none(v) for k, v in record.items()}) + "\n"
