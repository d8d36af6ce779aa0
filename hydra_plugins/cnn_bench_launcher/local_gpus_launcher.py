"""``hydra/launcher=local_gpus``: run a sweep's jobs in parallel processes on this machine.

Each job runs in its own Python process (``python -m hydra_plugins.cnn_bench_launcher._worker``)
pinned to one GPU through ``CUDA_VISIBLE_DEVICES``; as a job ends, its GPU takes the next job.
Without GPUs it runs ``n_jobs`` CPU processes (default 2), each with its share of the cores.

A job's console output goes to ``<job dir>/worker.log``; the launcher logs one line as each job
starts and ends. A worker that dies without reporting (killed, out of memory, segfault) is
recorded as failed in its ``status.json`` and the sweep goes on; the sweep callback reports it.
"""

# No `from __future__ import annotations`: Hydra's plugin scan runs this module without
# registering it in sys.modules, and dataclasses then cannot resolve string annotations.
import itertools
import logging
import os
import pickle
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, List, Optional, Sequence

from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobReturn, JobStatus, configure_log, filter_overrides, setup_globals
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf, open_dict

log = logging.getLogger(__name__)

CPU_JOBS = 2  # parallel jobs without GPUs: enough to overlap data loading, not to thrash the cores


@dataclass
class LocalGpusLauncherConf:
    _target_: str = "hydra_plugins.cnn_bench_launcher.local_gpus_launcher.LocalGpusLauncher"
    # Jobs at once; null = one per GPU (CPU_JOBS without GPUs). More jobs than GPUs share them.
    n_jobs: Optional[int] = None
    # GPU ids to use; null = CUDA_VISIBLE_DEVICES if set, else every GPU torch sees.
    gpus: Optional[List[str]] = None
    # Threads per CPU job (OMP_NUM_THREADS); null = cores / n_jobs.
    cpu_threads: Optional[int] = None


ConfigStore.instance().store(group="hydra/launcher", name="local_gpus",
                             node=LocalGpusLauncherConf, provider="cnn_bench")


def visible_gpus() -> list[str]:
    """GPU ids as ``CUDA_VISIBLE_DEVICES`` would name them for a child process."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        ids = [g.strip() for g in env.split(",") if g.strip()]
        # CUDA stops at the first invalid id ("-1" is the usual way to hide every GPU): "0,-1,2"
        # is GPU 0 alone.
        return list(itertools.takewhile(lambda g: not g.startswith("-"), ids))
    try:
        import torch
    except ImportError:
        return []
    return [str(i) for i in range(torch.cuda.device_count())]


def task_reference(task: TaskFunction) -> dict:
    """How a worker process finds ``task``: its module (or script file) and attribute name.

    ``@hydra.main`` wraps the task, so the module attribute may be a wrapper around ``task``;
    ``unwrap`` counts the ``__wrapped__`` steps from the attribute down to ``task``.
    """
    module = sys.modules.get(task.__module__)
    obj: Any = module
    for part in task.__qualname__.split("."):
        obj = getattr(obj, part, None)
    unwrap = 0
    while obj is not None and obj is not task and hasattr(obj, "__wrapped__"):
        obj, unwrap = obj.__wrapped__, unwrap + 1
    if obj is not task:
        raise ValueError(f"local_gpus launcher: task {task.__qualname__!r} must be a module-level "
                         f"function so worker processes can import it")
    file = getattr(module, "__file__", None) if task.__module__ == "__main__" else None
    return {"module": task.__module__, "qualname": task.__qualname__, "unwrap": unwrap,
            "file": os.path.abspath(file) if file else None}


def _extra_paths() -> list[str]:
    """This process's import paths beyond the interpreter's own (the app's dir, test dirs, ...)."""
    prefixes = {os.path.abspath(p) for p in (sys.prefix, sys.base_prefix, sys.exec_prefix)}
    paths = [os.path.abspath(p or os.curdir) for p in sys.path]  # "" is the current directory
    # Entries that are no files (import hooks of editable installs) come back via site-packages.
    return [p for p in dict.fromkeys(paths) if os.path.exists(p)
            and not any(p.startswith(pre + os.sep) for pre in prefixes)]


def _died(code: int) -> str:
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        hint = " (out of memory?)" if -code == signal.SIGKILL else ""
        return f"worker process killed by {name}{hint}"
    return f"worker process exited with code {code} without a result"


@dataclass
class _Job:
    idx: int
    overrides: list[str]
    config: DictConfig
    dir: Path


class LocalGpusLauncher(Launcher):
    """Runs sweep jobs ``n_jobs`` at a time in worker processes, one GPU each (or CPU only)."""

    def __init__(self, n_jobs: Optional[int] = None, gpus: Optional[Sequence[str]] = None,
                 cpu_threads: Optional[int] = None) -> None:
        self.n_jobs, self.gpus, self.cpu_threads = n_jobs, gpus, cpu_threads
        self.config: Optional[DictConfig] = None
        self.task_function: Optional[TaskFunction] = None
        self.hydra_context: Optional[HydraContext] = None
        self._live: set = set()  # running worker processes

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction,
              config: DictConfig) -> None:
        self.config, self.hydra_context, self.task_function = config, hydra_context, task_function

    def _slots(self) -> list[Optional[str]]:
        """One entry per parallel job: the GPU id it runs on, or ``None`` for a CPU job."""
        gpus = [str(g) for g in self.gpus] if self.gpus else visible_gpus()
        n = self.n_jobs if self.n_jobs is not None else (len(gpus) or CPU_JOBS)
        if n < 1:
            raise ValueError(f"hydra.launcher.n_jobs must be >= 1, got {n}")
        return [gpus[i % len(gpus)] for i in range(n)] if gpus else [None] * n

    def _prepare(self, overrides: Sequence[str], idx: int) -> _Job:
        """Compose the job's config and its directory here, so workers need no config loader."""
        assert self.hydra_context is not None and self.config is not None
        config = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
        with open_dict(config):
            config.hydra.job.id = idx
            config.hydra.job.num = idx
            # Resolved once here: ${now:...} would otherwise be re-evaluated in each worker.
            config.hydra.sweep.dir = str(self.config.hydra.sweep.dir)
        saved = HydraConfig.instance().cfg
        HydraConfig.instance().set_config(config)  # the subdir may use ${hydra:...}
        try:
            job_dir = Path(config.hydra.sweep.dir) / str(config.hydra.sweep.subdir)
        finally:
            HydraConfig.instance().cfg = saved
        return _Job(idx, list(overrides), config, job_dir.absolute())

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        setup_globals()
        assert self.config is not None and self.task_function is not None
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        Path(str(self.config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)
        slots = self._slots()
        task = task_reference(self.task_function)
        jobs = [self._prepare(ov, initial_job_idx + i) for i, ov in enumerate(job_overrides)]
        where = f"GPUs {','.join(sorted(set(slots)))}" if slots[0] is not None else "CPU"
        log.info("Launching %d jobs, %d at a time on %s", len(jobs), len(slots), where)
        free: queue.Queue = queue.Queue()
        for slot in slots:
            free.put(slot)
        threads = self.cpu_threads or max(1, (os.cpu_count() or 1) // len(slots))

        def run(job: _Job) -> JobReturn:
            slot = free.get()
            try:
                return self._run_worker(job, task, slot, threads)
            finally:
                free.put(slot)

        # A SIGTERM (a scheduler's stop, `kill`) stops the sweep as Ctrl-C does; without this
        # the launcher died at once and its workers trained on, orphaned.
        def on_term(signum, frame):
            raise KeyboardInterrupt

        # Signal handlers belong to the main thread (an app may run Hydra in another one).
        main = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGTERM, on_term) if main else None
        try:
            with ThreadPoolExecutor(max_workers=len(slots)) as pool:
                try:
                    return list(pool.map(run, jobs))  # a Ctrl-C cancels the jobs not started
                except KeyboardInterrupt:
                    self._interrupt_workers()
                    raise
        finally:
            if main:  # None: a handler set outside Python, which Python cannot put back
                signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)

    def _interrupt_workers(self, grace_s: float = 5.0) -> None:
        """Ctrl-C in a terminal reaches the workers too (one process group); a SIGINT or SIGTERM
        sent to this process alone does not. Workers still running after ``grace_s`` get one
        SIGINT: they record themselves as interrupted and exit, and a rerun resumes them. A
        second signal while waiting sends it at once."""
        deadline = time.monotonic() + grace_s
        for proc in list(self._live):
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            except KeyboardInterrupt:
                break
        for proc in list(self._live):
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)

    def _run_worker(self, job: _Job, task: dict, gpu: Optional[str], threads: int) -> JobReturn:
        env = dict(os.environ)
        # The worker imports what this process could import (the app's dir, test dirs, ...).
        env["PYTHONPATH"] = os.pathsep.join(_extra_paths() + [
            p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
        if gpu is not None:
            env["CUDA_VISIBLE_DEVICES"] = gpu
        else:
            # Two jobs must not each take every core. An explicit cpu_threads wins over an
            # inherited OMP_NUM_THREADS; the default (cores / n_jobs) does not.
            if self.cpu_threads:
                env["OMP_NUM_THREADS"] = str(threads)
            else:
                env.setdefault("OMP_NUM_THREADS", str(threads))
        job.dir.mkdir(parents=True, exist_ok=True)
        where = f"GPU {gpu}" if gpu is not None else "CPU"
        log.info("\t#%d start on %s: %s", job.idx, where, " ".join(filter_overrides(job.overrides)))
        tic, started = time.perf_counter(), time.time()
        with tempfile.TemporaryDirectory(prefix="cnn_bench_job_") as tmp:
            result_path = Path(tmp) / "result.pkl"
            payload = pickle.dumps({"config": job.config, "task": task})
            with open(job.dir / "worker.log", "ab") as out:
                proc = subprocess.Popen(
                    [sys.executable, "-m", "hydra_plugins.cnn_bench_launcher._worker", str(result_path)],
                    stdin=subprocess.PIPE, stdout=out, stderr=subprocess.STDOUT, env=env,
                    cwd=os.getcwd())
                self._live.add(proc)
                try:
                    proc.communicate(payload)
                finally:
                    self._live.discard(proc)
            ret = self._read_result(job, result_path, proc.returncode, started)
        status = self._describe(job, ret)
        log.info("\t#%d %s in %.1f s: %s", job.idx, status, time.perf_counter() - tic, job.dir.name)
        return ret

    def _read_result(self, job: _Job, path: Path, code: int, started: float = 0.0) -> JobReturn:
        if path.is_file():
            with open(path, "rb") as f:
                ret = pickle.load(f)
            if isinstance(ret, JobReturn):
                return ret
        from cnn_bench.sweep.status import (FAILED, INTERRUPTED, is_finished, read_status,
                                            write_status)

        record = read_status(job.dir)
        if is_finished(job.dir) or (record.get("status") == INTERRUPTED
                                    and record.get("updated_at", 0) >= started):
            # done earlier (Ctrl-C while the worker started up), or this attempt's worker said
            # so (an earlier attempt's "interrupted" says nothing of how this one ended)
            pass
        elif code in (-signal.SIGINT, 130):  # Ctrl-C before the job itself began
            write_status(job.dir, INTERRUPTED, reason="interrupted (Ctrl-C) before it started")
        else:
            write_status(job.dir, FAILED, reason=f"{_died(code)}; see worker.log")
        ret = JobReturn(overrides=job.overrides, hydra_cfg=job.config, working_dir=str(job.dir),
                        cfg=OmegaConf.masked_copy(job.config, [k for k in job.config if k != "hydra"]))
        # Recorded as failed in status.json; COMPLETED keeps the sweeper from aborting the sweep.
        ret.status, ret.return_value = JobStatus.COMPLETED, None
        return ret

    @staticmethod
    def _describe(job: _Job, ret: JobReturn) -> str:
        if ret.status == JobStatus.FAILED:
            return f"raised {type(ret._return_value).__name__}"
        from cnn_bench.sweep.status import read_status

        record = read_status(job.dir)
        return record.get("status", "finished") + (f" ({record['reason']})" if record.get("reason") else "")
