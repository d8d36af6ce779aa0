"""What the benchmark tests share: each script started as a user starts it (a subprocess, one
intra-op thread, no ``$TIMM_TRAIN_SCRIPT`` unless given) and its markdown tables read back."""

from __future__ import annotations

import os
import subprocess
import sys

from conftest import ROOT

BENCH = ROOT / "benchmarks"


def run_script(script: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if k != "TIMM_TRAIN_SCRIPT"}
    full_env.update(OMP_NUM_THREADS="1", **(env or {}))
    proc = subprocess.run([sys.executable, str(BENCH / script), *args], cwd=ROOT, env=full_env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


def table_rows(text: str) -> list[list[str]]:
    """Body rows of the markdown table(s) in ``text``, as lists of cells."""
    rows = [ln for ln in text.splitlines() if ln.startswith("| ")]
    return [[c.strip() for c in ln.strip("|").split("|")] for ln in rows[1:]
            if not ln.startswith("| model") and not ln.startswith("| runner")]
