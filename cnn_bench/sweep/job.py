"""One job of a sweep: skip it when finished, resume it when not, record how it ended.

Hydra's sweepers re-raise a failed job's exception once the batch is over, which would end the
whole sweep. :func:`run_sweep_job` therefore never lets an ``Exception`` out: it writes the
failure to the job's ``status.json`` and the sweep callback reports it when the sweep ends.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from cnn_bench.errors import CnnBenchError
from cnn_bench.sweep.status import (DONE, FAILED, INTERRUPTED, RUNNING, is_finished,
                                    one_line_reason, read_status, write_status)

log = logging.getLogger("cnn_bench.sweep")


def job_dir() -> Path:
    """This Hydra job's output directory (the sweep's ``<sweep dir>/<override dirname>``)."""
    from hydra.core.hydra_config import HydraConfig

    return Path(HydraConfig.get().runtime.output_dir)


def _jsonable(value: Any) -> Any:
    try:
        json.dumps(value)
        return value
    except (TypeError, ValueError):
        return repr(value)


def _prepare(cfg: DictConfig, out: Path) -> None:
    """Point the job at its own directory and its own last checkpoint."""
    with open_dict(cfg):
        if OmegaConf.select(cfg, "output_dir"):
            # One output_dir for every job would make them overwrite (and skip) each other.
            log.warning("output_dir=%s does not apply to sweep jobs; writing to %s",
                        cfg.output_dir, out)
            cfg.output_dir = None
        if OmegaConf.select(cfg, "trainer") is not None:
            # An unfinished job continues from its own last.pt; an explicit checkpoint path
            # only seeds a job's first attempt.
            own_last = (out / "checkpoints" / "last.pt").is_file()
            if own_last or cfg.trainer.get("resume") in (None, "", "auto"):
                cfg.trainer.resume = "auto"


def run_sweep_job(task: Callable[[DictConfig], Any], cfg: DictConfig) -> Any:
    """Run ``task(cfg)`` as one sweep job and return its result (``None`` when it failed).

    - finished before (``summary.json`` + status done): trains nothing, returns the recorded result;
    - unfinished: ``trainer.resume=auto``, so training continues from ``checkpoints/last.pt``;
    - an exception: one-line reason in ``status.json``, the traceback in the job log;
    - Ctrl-C: status ``interrupted``, then the interrupt goes on up.
    """
    out = job_dir()
    if is_finished(out):
        log.info("skipped: finished earlier (%s)", out)
        return read_status(out).get("result")
    _prepare(cfg, out)
    write_status(out, RUNNING)
    try:
        result = task(cfg)
    except KeyboardInterrupt:
        write_status(out, INTERRUPTED, reason="interrupted")
        raise
    except Exception as e:  # noqa: BLE001  (isolating any failure is the point)
        reason = one_line_reason(e)
        # A user error is explained by its message; anything else needs its traceback.
        log.error("job failed: %s", reason, exc_info=not isinstance(e, CnnBenchError))
        write_status(out, FAILED, reason=reason)
        return None
    write_status(out, DONE, result=_jsonable(result))
    return result
