"""The parallel ``local_gpus`` launcher (CPU fallback, GPU pinning, failure isolation, signals)
and the submitit launchers' configs.

Module-level imports stay light (no torch): the launcher's worker processes import this module
to find the task functions below.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hydra import initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from cnn_bench import cli
from cnn_bench.config import CONF_DIR
from cnn_bench.sweep.status import DONE, FAILED, INTERRUPTED, read_status
from conftest import ROOT
from sweeping import job_dirs, multirun


@cli.user_errors
def meeting_task(cfg):
    """Launcher test job: record where it runs, wait until every job in ``cfg.meet`` has started
    (which only happens if they run at the same time), then succeed, raise or die per ``cfg.case``."""
    from cnn_bench.sweep.job import job_dir

    out = job_dir()
    (out / "worker.json").write_text(json.dumps({
        "pid": os.getpid(), "cuda": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "omp": os.environ.get("OMP_NUM_THREADS")}))
    if cfg.case == "crash":
        os._exit(3)
    (out.parent / f"arrived_{cfg.case}").touch()
    deadline = time.monotonic() + 60  # s; far above two worker start-ups
    while not all((out.parent / f"arrived_{c}").exists() for c in cfg.meet):
        if time.monotonic() > deadline:
            raise TimeoutError("the other job never ran alongside this one")
        time.sleep(0.05)
    if cfg.case == "fail":
        raise ValueError("this job fails on purpose")
    return 1.0


@cli.user_errors
def waiting_task(cfg):
    """Launcher test job: record its pid, then wait (up to 60 s) to be interrupted."""
    from cnn_bench.sweep.job import job_dir

    out = job_dir()
    (out / "worker.json").write_text(json.dumps({"pid": os.getpid()}))
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        time.sleep(0.05)
    return 1.0


def worker_record(sweep: Path, case: str) -> dict:
    jobs = job_dirs(sweep)  # a sweep of one job is named by its number
    (job,) = jobs if len(jobs) == 1 else [j for j in jobs if f"+case={case}" in j.name]
    return {**json.loads((job / "worker.json").read_text()), **read_status(job), "dir": job}


def test_local_gpus_launcher_on_cpu_runs_jobs_in_parallel_and_isolates_failures(
        tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # no GPUs: the CPU fallback, 2 jobs at once
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    sweep = tmp_path / "sweep"
    with pytest.raises(SystemExit) as exit_info:
        multirun(sweep, ["hydra/launcher=local_gpus", "+case=ok,fail,crash", "+meet=[ok,fail]"],
                 task=meeting_task)
    assert exit_info.value.code == 1
    ok, fail, crash = (worker_record(sweep, c) for c in ("ok", "fail", "crash"))
    assert ok["status"] == DONE and ok["result"] == 1.0
    assert fail["status"] == FAILED and fail["reason"] == "ValueError: this job fails on purpose"
    assert crash["status"] == FAILED
    assert crash["reason"].startswith("worker process exited with code 3")
    assert len({ok["pid"], fail["pid"], crash["pid"], os.getpid()}) == 4
    assert ok["omp"] == str(max(1, (os.cpu_count() or 1) // 2))
    assert "Traceback" in (fail["dir"] / "worker.log").read_text()  # the details stay in the job
    out = capsys.readouterr().out
    assert "3 jobs: 1 done, 2 failed" in out and "this job fails on purpose" in out


def test_local_gpus_launcher_cpu_threads_wins_over_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    monkeypatch.setenv("OMP_NUM_THREADS", "7")  # inherited; the explicit option must win
    sweep = tmp_path / "sweep"
    multirun(sweep, ["hydra/launcher=local_gpus", "hydra.launcher.cpu_threads=1", "+case=ok",
                     "+meet=[ok]"], task=meeting_task)
    assert worker_record(sweep, "ok")["omp"] == "1"


def test_local_gpus_launcher_pins_each_job_to_its_own_gpu(tmp_path, monkeypatch):
    # GPU ids are only handed to the workers here; the jobs never touch CUDA.
    sweep = tmp_path / "sweep"
    multirun(sweep, ["hydra/launcher=local_gpus", "hydra.launcher.gpus=[3,5]",
                     "+case=a,b", "+meet=[a,b]"], task=meeting_task)
    a, b = worker_record(sweep, "a"), worker_record(sweep, "b")
    assert {a["cuda"], b["cuda"]} == {"3", "5"}
    assert a["status"] == b["status"] == DONE


@pytest.mark.parametrize("option", ["hydra.launcher.n_jobs=-1", "hydra.launcher.n_jobs=0",
                                    "hydra.launcher.cpu_threads=two"])
def test_local_gpus_options_out_of_range_are_one_line(option, capsys):
    # n_jobs=-1 ended in a 19-line traceback from inside Hydra; 0 silently meant the default
    with pytest.raises(SystemExit) as e:
        cli.check_command_line(["-m", "hydra/launcher=local_gpus", option, "trainer.seed=1,2"])
    assert e.value.code == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"error: {option.split('=')[0]} must be an integer >= 1")


def test_launcher_slots_follow_the_visible_gpus(monkeypatch):
    from hydra_plugins.cnn_bench_launcher.local_gpus_launcher import LocalGpusLauncher, visible_gpus

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    assert visible_gpus() == ["2", "3"]
    assert LocalGpusLauncher()._slots() == ["2", "3"]
    assert LocalGpusLauncher(n_jobs=4)._slots() == ["2", "3", "2", "3"]  # two jobs per GPU
    assert LocalGpusLauncher(n_jobs=1)._slots() == ["2"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,-1,2")  # CUDA stops at the invalid id
    assert visible_gpus() == ["0"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "-1")
    assert visible_gpus() == [] and LocalGpusLauncher()._slots() == [None, None]
    assert LocalGpusLauncher(n_jobs=3)._slots() == [None, None, None]


@pytest.mark.parametrize("before, code, after", [
    # Ctrl-C while a worker was still starting up overwrote a finished job with "failed" (the
    # report counted it failed, the next rerun trained it again)
    ("done", -2, "done"),
    (None, -2, "interrupted"),       # a job that had not begun: Ctrl-C, not a failure
    ("running", 130, "interrupted"),
    ("interrupted", -2, "interrupted"),  # the worker recorded it itself
    (None, -9, "failed"),
    ("done", 3, "done"),
])
def test_launcher_records_a_worker_without_result_by_what_happened(tmp_path, before, code, after):
    from omegaconf import OmegaConf

    from cnn_bench.sweep.status import write_status
    from hydra_plugins.cnn_bench_launcher.local_gpus_launcher import LocalGpusLauncher, _Job

    job = _Job(0, ["+case=x"], OmegaConf.create({"hydra": {}, "case": "x"}), tmp_path / "job")
    if before:
        write_status(job.dir, before)
        if before == "done":
            (job.dir / "summary.json").write_text("{}")
    LocalGpusLauncher()._read_result(job, tmp_path / "no_result.pkl", code)
    assert read_status(job.dir)["status"] == after


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_a_signal_to_the_launcher_alone_stops_its_workers(tmp_path, sig):
    # SIGTERM killed the launcher and left its workers training, orphaned; a SIGINT to it alone
    # (not the terminal's, which reaches the whole group) waited for them to finish.
    import signal

    sweep = tmp_path / "sweep"
    script = tmp_path / "parent.py"
    script.write_text(
        "import sys\n"
        f"sys.path[:0] = [{str(ROOT)!r}, {str(ROOT / 'tests')!r}]\n"
        "from sweeping import multirun; from test_launcher import waiting_task\n"
        f"multirun(__import__('pathlib').Path({str(sweep)!r}), ['hydra/launcher=local_gpus', "
        "'+case=a,b,c'], task=waiting_task)\n")
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    parent = subprocess.Popen([sys.executable, str(script)], env=env, cwd=tmp_path,
                              start_new_session=True,  # only the launcher gets the signal
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 90
    while len(list(sweep.glob("*/worker.json"))) < 2:  # both slots busy
        assert time.monotonic() < deadline and parent.poll() is None, parent.stdout.read()
        time.sleep(0.1)
    pids = [json.loads(p.read_text())["pid"] for p in sweep.glob("*/worker.json")]
    parent.send_signal(getattr(signal, sig))
    parent.wait(timeout=60)
    for pid in pids:  # the workers are gone too
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    statuses = sorted(read_status(j)["status"] for j in job_dirs(sweep) if (j / "status.json").exists())
    assert statuses.count(INTERRUPTED) >= 2 and DONE not in statuses


def test_the_launcher_runs_from_a_thread_other_than_the_main_one(tmp_path, monkeypatch):
    # Installing its SIGTERM handler raised "signal only works in main thread" there.
    import threading

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    sweep, errors = tmp_path / "sweep", []

    def target():
        try:
            multirun(sweep, ["hydra/launcher=local_gpus", "+case=ok", "+meet=[ok]"],
                     task=meeting_task)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    t = threading.Thread(target=target)
    t.start()
    t.join(timeout=120)
    assert not errors and worker_record(sweep, "ok")["status"] == DONE


def test_a_second_signal_while_waiting_interrupts_the_workers_at_once(monkeypatch):
    # A second SIGTERM during the grace period raised out of the wait: no worker got its SIGINT
    # and the sweep trained on.
    import signal

    from hydra_plugins.cnn_bench_launcher.local_gpus_launcher import LocalGpusLauncher

    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    launcher = LocalGpusLauncher()
    launcher._live.add(proc)

    def second_signal(timeout=None):
        raise KeyboardInterrupt

    monkeypatch.setattr(proc, "wait", second_signal)
    launcher._interrupt_workers(grace_s=30)
    monkeypatch.undo()
    assert proc.wait(timeout=10) == -signal.SIGINT


def test_a_worker_started_with_sigint_ignored_takes_it_again():
    # A launcher run in the background by a script inherits SIGINT ignored; so did its workers,
    # and the SIGINT it sends them to stop did nothing.
    code = ("import os, signal, time\n"
            "signal.signal(signal.SIGINT, signal.SIG_IGN)\n"
            "from hydra_plugins.cnn_bench_launcher._worker import restore_sigint\n"
            "restore_sigint()\n"
            "os.kill(os.getpid(), signal.SIGINT)\n"
            "time.sleep(10)\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode != 0 and "KeyboardInterrupt" in proc.stderr


def test_an_earlier_attempts_interrupted_record_does_not_hide_a_worker_death(tmp_path):
    # A rerun's worker killed before it wrote "running" was reported "interrupted" (the first
    # attempt's record), not failed.
    from omegaconf import OmegaConf

    from cnn_bench.sweep.status import write_status
    from hydra_plugins.cnn_bench_launcher.local_gpus_launcher import LocalGpusLauncher, _Job

    job = _Job(0, ["+case=x"], OmegaConf.create({"hydra": {}, "case": "x"}), tmp_path / "job")
    write_status(job.dir, "interrupted")
    started = time.time() + 1e-3  # this attempt began after that record
    LocalGpusLauncher()._read_result(job, tmp_path / "no_result.pkl", -9, started)
    record = read_status(job.dir)
    assert record["status"] == FAILED and "SIGKILL" in record["reason"]


@pytest.mark.parametrize("launcher", ["slurm", "submitit_slurm"])
def test_submitit_launcher_composes_when_installed(launcher):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        from hydra import compose

        cfg = compose("config", [f"hydra/launcher={launcher}", "hydra.launcher.partition=gpu",
                                 "hydra.launcher.gpus_per_node=1"], return_hydra_config=True)
    assert cfg.hydra.launcher._target_.endswith("SlurmLauncher")
    assert cfg.hydra.launcher.partition == "gpu"
    assert cfg.hydra.callbacks.sweep._target_ == "cnn_bench.sweep.callback.SweepCallback"


def test_slurm_launcher_without_srun_is_one_line(monkeypatch, capsys):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    from cnn_bench import cli

    monkeypatch.setattr(cli.shutil, "which", lambda name: None)
    with pytest.raises(SystemExit) as e:
        cli.check_command_line(["-m", "hydra/launcher=slurm", "model=speednet_s"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: hydra/launcher=slurm submits to SLURM")
    monkeypatch.setattr(cli.shutil, "which", lambda name: "/usr/bin/srun")
    cli.check_command_line(["-m", "hydra/launcher=slurm", "model=speednet_s"])  # passes the check
