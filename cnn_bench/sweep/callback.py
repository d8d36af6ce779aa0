"""The Hydra callback that checks a sweep before it starts and reports it when it ends.

Registered in ``conf/config.yaml`` under ``hydra.callbacks.sweep``. Runs on the machine that
launched the sweep (also with the SLURM launcher), never inside a job.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from cnn_bench.config import group_options
from cnn_bench.sweep.results import collect
from cnn_bench.sweep.status import FAILED, INTERRUPTED, one_line_reason

log = logging.getLogger("cnn_bench.sweep")


def _sweep_overrides(config: DictConfig) -> list[str]:
    """The sweep's overrides: ``hydra.sweeper.params`` (an experiment's sweep) and the command
    line's, which replaces a param of the same key (as Hydra's basic sweeper does: an
    experiment's swept width fixed to one value on the command line is no longer swept)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    params = OmegaConf.select(config, "hydra.sweeper.params") or {}
    task = list(OmegaConf.select(config, "hydra.overrides.task") or [])
    try:
        on_command_line = {o.key_or_group for o in OverridesParser.create().parse_overrides(task)}
    except Exception:  # noqa: BLE001  (Hydra reports unparsable overrides itself)
        on_command_line = set()
    return [f"{k}={v}" for k, v in params.items() if k not in on_command_line] + task


def check_sweep(config: DictConfig) -> str | None:
    """A one-line problem with the sweep's job names, or ``None``.

    Keys left out of job directory names (``exclude_keys``: paths such as ``dataset.root``)
    must not take several values, or two jobs would share one directory and one would skip
    the other as finished.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser

    excluded = set(OmegaConf.select(config, "hydra.job.config.override_dirname.exclude_keys") or [])
    try:
        overrides = OverridesParser.create().parse_overrides(_sweep_overrides(config))
    except Exception:  # noqa: BLE001  (Hydra reports unparsable overrides itself)
        return None
    from hydra.core.override_parser.types import Glob

    longest_items = []
    kv_sep = OmegaConf.select(config, "hydra.job.config.override_dirname.kv_sep") or "="
    for ov in overrides:
        key = ov.key_or_group
        if key in excluded and ov.is_sweep_override():
            return (f"{key} takes several values, but it is left out of job directory names "
                    f"(hydra.job.config.override_dirname.exclude_keys), so jobs would collide; "
                    f"run one sweep per {key} (each with its own hydra.sweep.dir)")
        if key in excluded or key.startswith("hydra"):
            continue
        if os.sep in ov.input_line.split("=", 1)[-1]:
            log.info("%s has a path-like value: its jobs' directories nest along the path", key)
        try:
            if isinstance(ov.value(), Glob):  # a group's option names (Hydra lists them later)
                values = ov.value().filter(group_options(key))
            elif ov.is_sweep_override():
                values = list(ov.sweep_string_iterator())
            else:
                values = [ov.input_line.split("=", 1)[-1]]
        except Exception:  # noqa: BLE001  (interval() and the like: a sweeper plugin's business)
            continue
        if values:
            longest_items.append(max((f"{ov.get_key_element()}{kv_sep}{v}" for v in values),
                                     key=len))
    return _name_too_long(config, longest_items)


NAME_MAX = 255  # bytes in one file name (ext4, xfs, APFS, NTFS)


def _name_too_long(config: DictConfig, items: list[str]) -> str | None:
    """Jobs named by their settings (``hydra.sweep.subdir: ${hydra.job.override_dirname}``)
    must fit the file-name limit: Hydra otherwise stops mid-sweep with an OSError traceback.
    ``items`` holds each key's longest ``key=value``: the longest job name."""
    subdir = OmegaConf.to_container(config.hydra.sweep, resolve=False).get("subdir")
    if "override_dirname" not in str(subdir):
        return None
    item_sep = OmegaConf.select(config, "hydra.job.config.override_dirname.item_sep") or ","
    parts = item_sep.join(sorted(items)).split("/")
    longest = max(parts, key=lambda c: len(c.encode()))
    if len(longest.encode()) <= NAME_MAX:
        return None
    return (f"job directories would be named by {len(longest.encode())} bytes of settings "
            f"('{longest[:60]}...'; a file name holds {NAME_MAX}): sweep fewer keys at once, or "
            "name jobs by number with hydra.sweep.subdir=${hydra.job.num}")


def finish_sweep(sweep_dir: str | Path) -> int:
    """Write the report, print the job summary, and return the exit status (1 if a job failed)."""
    from cnn_bench.report import MD_NAME, status_line, write_report

    sweep_dir = Path(sweep_dir)
    try:
        rows = write_report(sweep_dir)
        report = sweep_dir / MD_NAME
    except Exception as e:  # noqa: BLE001  (a broken report must not hide the jobs' outcome)
        log.exception("the sweep report failed: %s", one_line_reason(e))
        rows, report = collect(sweep_dir), None
    print(f"sweep {sweep_dir}: {status_line(rows)}")
    for r in rows:
        if r.status in (FAILED, INTERRUPTED):
            print(f"  {r.status:<11} {r.job}: {r.reason or 'no reason recorded'}")
    if report is not None:
        print(f"report: {report}")
    sys.stdout.flush()
    return 1 if any(r.status in (FAILED, INTERRUPTED) for r in rows) else 0


class SweepCallback(Callback):
    """Refuses sweeps whose jobs would share a directory; reports and sets the exit status at the end.

    Jobs record failures in their ``status.json`` instead of raising (see
    :mod:`cnn_bench.sweep.job`), so the sweep always gets here; a failed job then makes the
    process exit with status 1. The exit status covers every job in the sweep directory,
    including jobs of earlier runs into the same ``hydra.sweep.dir``.
    """

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        problem = check_sweep(config)
        if problem:
            print(f"error: {problem}", file=sys.stderr)
            raise SystemExit(2)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        code = finish_sweep(config.hydra.sweep.dir)
        if code:
            raise SystemExit(code)
