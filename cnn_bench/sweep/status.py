"""A sweep job's ``status.json``: whether it is running, done, failed or interrupted, and why.

The file sits next to the job's ``summary.json``. Writers replace it atomically, so the report
can read it while jobs are still running.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Any

from cnn_bench.errors import CnnBenchError

STATUS_FILE = "status.json"
RUNNING, DONE, FAILED, INTERRUPTED = "running", "done", "failed", "interrupted"


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def read_status(job_dir: str | Path) -> dict:
    """The job's status record, or ``{}`` when it has none (yet) or it is unreadable."""
    try:
        return json.loads((Path(job_dir) / STATUS_FILE).read_text())
    except (OSError, ValueError):
        return {}


def write_status(job_dir: str | Path, status: str, **fields: Any) -> dict:
    """Update the job's record: keep earlier fields, set ``status`` and ``fields``, stamp the time."""
    job_dir = Path(job_dir)
    job_dir.mkdir(parents=True, exist_ok=True)
    record = read_status(job_dir)
    record.update(fields, status=status, updated_at=time.time())  # unix seconds
    if status == RUNNING:
        record.update(started_at=record["updated_at"], ended_at=None, reason=None,
                      pid=os.getpid(), host=socket.gethostname(),
                      attempts=record.get("attempts", 0) + 1)
    else:
        record["ended_at"] = record["updated_at"]
    _write_json(job_dir / STATUS_FILE, record)
    return record


def is_finished(job_dir: str | Path) -> bool:
    """True when the job completed earlier: ``summary.json`` exists and the status says done."""
    job_dir = Path(job_dir)
    return (job_dir / "summary.json").is_file() and read_status(job_dir).get("status") == DONE


def one_line_reason(exc: BaseException) -> str:
    """A failure as one line: a user error's own message, else ``Type: first line``."""
    text = str(exc).strip()
    first = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    if isinstance(exc, CnnBenchError):
        return first or type(exc).__name__
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__
