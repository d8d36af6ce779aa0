"""Sweeps: job names, failure isolation, skip/resume, identical initial weights, and the
parallel ``local_gpus`` launcher, all on speednet_s at 16-32 px with tiny generated data (the
report on fabricated jobs: ``test_report.py``).

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
from omegaconf import OmegaConf

from cnn_bench import cli
from cnn_bench.config import CONF_DIR
from cnn_bench.sweep.status import DONE, FAILED, INTERRUPTED, read_status
from conftest import PLOTS, ROOT, compose_config, read_csv

@cli.user_errors
def train_task(cfg):
    """What ``train.py`` runs, reachable by name from this module."""
    from cnn_bench import train as train_mod

    return train_mod.run(cfg).get("best_val_acc")


def sweep_overrides(root: Path, *extra: str) -> list[str]:
    """A fast sweep base: speednet_s at 16 px on the tiny folder, 1 epoch of 2 batches, CPU."""
    return ["model=speednet_s", "dataset=imagefolder", f"dataset.root={root}",
            "trainer.batch_size=16", "trainer.epochs=1", "trainer.limit_train_batches=2",
            "trainer.device=cpu", "trainer.progress=false", *extra]


def named(overrides: list[str]) -> list[str]:
    """The overrides ``train.py -m`` hands to Hydra: jobs named by their swept keys only."""
    return cli.name_jobs_by_swept_keys(["-m", *overrides], "config")[1:]


def multirun(sweep_dir: Path, overrides: list[str], task=train_task) -> None:
    """``python train.py -m <overrides>`` in this process, through Hydra's own multirun path."""
    overrides = named(overrides)
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3", job_name="train"):
            GlobalHydra.instance().hydra.multirun(
                config_name="config", task_function=task,
                overrides=[*overrides, f"hydra.sweep.dir={sweep_dir}", "hydra.mode=MULTIRUN"])
    finally:
        GlobalHydra.instance().clear()


def job_dirs(sweep_dir: Path) -> list[Path]:
    return sorted(p for p in sweep_dir.iterdir() if p.is_dir() and p.name != "tb")


# ---------------------------------------------------------------- end to end, as a user runs it

def test_sweep_end_to_end_then_rerun_trains_nothing(tiny_folder, tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.plugin_event_multiplexer import EventMultiplexer
    from tensorboard.plugins.hparams import metadata as hp_metadata

    sweep = tmp_path / "sweep"
    args = sweep_overrides(tiny_folder, "model.width_mult=0.5,1.0", "dataset.resolution=16,24")
    p = subprocess.run([sys.executable, str(ROOT / "train.py"), "-m", *args,
                        f"hydra.sweep.dir={sweep}"], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "4 jobs: 4 done, 0 failed" in p.stdout

    jobs = job_dirs(sweep)
    assert len(jobs) == 4
    for job in jobs:  # named by settings, one level deep, no path values in the name
        assert "model.width_mult=" in job.name and "dataset.resolution=" in job.name
        assert "dataset.root" not in job.name
        assert (job / "summary.json").is_file() and read_status(job)["status"] == DONE
    # Named by what the sweep varies; the fixed settings (model, batch size, ...) stay out.
    assert {j.name for j in jobs} == {f"dataset.resolution={r},model.width_mult={w}"
                                      for r in (16, 24) for w in (0.5, 1.0)}

    rows = read_csv(sweep / "results.csv")
    assert len(rows) == 4
    for row in rows:
        assert row["status"] == DONE and row["model"] == "speednet_s"
        assert int(row["params"]) > 0 and int(row["flops"]) > 0
        assert 0 <= float(row["best_val_acc"]) <= 1 and float(row["images_per_s"]) > 0
    assert {(r["width"], r["resolution"]) for r in rows} == {
        ("0.5", "16"), ("0.5", "24"), ("1.0", "16"), ("1.0", "24")}
    for plot in PLOTS:
        assert (sweep / plot).stat().st_size > 5000, plot
    assert "| speednet_s | 0.5 | 16 |" in (sweep / "results.md").read_text()

    # `tensorboard --logdir <sweep>`: the report's figures, and every job's HParams session.
    mux = EventMultiplexer()
    mux.AddRunsFromDirectory(str(sweep))
    mux.Reload()
    images = mux.PluginRunToTagToContent("images")
    assert {f"sweep/{Path(p).stem}" for p in PLOTS} <= set(images.get("tb", {}))
    hparams = mux.PluginRunToTagToContent(hp_metadata.PLUGIN_NAME)
    sessions = {run for run, tags in hparams.items() if hp_metadata.SESSION_START_INFO_TAG in tags}
    assert sessions == {f"{j.name}/tb" for j in jobs}

    # The same command again: every job is skipped, nothing trains, nothing is rewritten.
    from cnn_bench import train as train_mod

    calls = []
    monkeypatch.setattr(train_mod, "run", lambda cfg: calls.append(cfg) or {})
    before = {j: (j / "summary.json").stat().st_mtime_ns for j in jobs}
    multirun(sweep, args)
    assert calls == []
    assert {j: (j / "summary.json").stat().st_mtime_ns for j in jobs} == before


def test_failed_job_does_not_stop_the_sweep(tiny_folder, tmp_path, capsys, monkeypatch):
    from cnn_bench import train as train_mod

    sweep = tmp_path / "sweep"
    real = train_mod.run

    def crash_at_16_px(cfg):  # a library's own error deep inside a job, two lines long
        if cfg.dataset.resolution == 16:
            raise RuntimeError("Output size is too small\n  (second line of the library's text)")
        return real(cfg)

    monkeypatch.setattr(train_mod, "run", crash_at_16_px)
    with pytest.raises(SystemExit) as exit_info:
        multirun(sweep, sweep_overrides(tiny_folder, "dataset.resolution=16,32"))
    assert exit_info.value.code == 1
    by_res = {OmegaConf.load(j / ".hydra" / "config.yaml").dataset.resolution: j
              for j in job_dirs(sweep)}
    failed, done = read_status(by_res[16]), read_status(by_res[32])
    assert done["status"] == DONE and (by_res[32] / "summary.json").is_file()
    assert failed["status"] == FAILED and "Output size is too small" in failed["reason"]
    assert "\n" not in failed["reason"]
    out = capsys.readouterr().out
    assert "2 jobs: 1 done, 1 failed" in out
    assert f"failed      {by_res[16].name}: RuntimeError" in out
    rows = {r["resolution"]: r for r in read_csv(sweep / "results.csv")}
    assert rows["16"]["status"] == FAILED and "too small" in rows["16"]["reason"]
    assert rows["32"]["status"] == DONE


def test_interrupted_sweep_resumes_where_it_stopped(tiny_folder, tmp_path, monkeypatch):
    from cnn_bench import train as train_mod
    from cnn_bench.report import write_report

    sweep = tmp_path / "sweep"
    args = sweep_overrides(tiny_folder, "trainer.epochs=2", "dataset.resolution=16,24,32")
    real_epoch = train_mod.train_one_epoch
    calls = []

    def epoch_then_ctrl_c(*a, **kw):
        calls.append(1)
        if len(calls) == 4:  # job 2's second epoch: job 1 done, job 2 has last.pt at epoch 1
            raise KeyboardInterrupt
        return real_epoch(*a, **kw)

    monkeypatch.setattr(train_mod, "train_one_epoch", epoch_then_ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        multirun(sweep, args)
    first, second = job_dirs(sweep)
    assert "resolution=16" in first.name and "resolution=24" in second.name
    assert read_status(first)["status"] == DONE
    assert read_status(second)["status"] == INTERRUPTED

    # The report works on the half-finished sweep: the interrupted job shows its first epoch.
    rows = {r.resolution: r for r in write_report(sweep, tensorboard=False)}
    assert rows[24].status == INTERRUPTED and rows[24].epochs == 1
    assert rows[24].final_val_acc is not None and rows[24].flops is None
    assert all((sweep / p).is_file() for p in PLOTS)

    calls.clear()
    monkeypatch.setattr(train_mod, "train_one_epoch", lambda *a, **kw: calls.append(1) or real_epoch(*a, **kw))
    multirun(sweep, args)
    assert len(calls) == 3  # job 1: skipped; job 2: epoch 2 only; job 3: both epochs
    jobs = job_dirs(sweep)
    assert len(jobs) == 3 and all(read_status(j)["status"] == DONE for j in jobs)
    assert read_status(second)["attempts"] == 2
    assert "resumed from" in (second / "train.log").read_text()
    epochs = [json.loads(ln)["epoch"] for ln in (second / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [1, 2]
    assert len(read_csv(sweep / "results.csv")) == 3


def test_same_model_and_width_start_from_the_same_weights(tiny_folder, tmp_path, monkeypatch):
    import torch

    from cnn_bench import train as train_mod
    from cnn_bench.models.build import build_model
    from cnn_bench.runtime import seed_everything

    from cnn_bench.sweep.job import job_dir

    initial = {}
    real_build = train_mod.build_model

    def spy(model_cfg, num_classes, resolution):
        model = real_build(model_cfg, num_classes, resolution)
        name = job_dir().name
        seed = int(name.split("trainer.seed=")[1].split(",")[0])
        initial[(resolution, seed)] = {k: v.clone() for k, v in model.state_dict().items()}
        return model

    monkeypatch.setattr(train_mod, "build_model", spy)
    multirun(tmp_path / "sweep", sweep_overrides(tiny_folder, "dataset.resolution=16,24",
                                                 "trainer.seed=0,1"))
    assert set(initial) == {(16, 0), (24, 0), (16, 1), (24, 1)}

    def same(a, b):
        return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    assert same(initial[(16, 0)], initial[(24, 0)])
    assert same(initial[(16, 1)], initial[(24, 1)])
    assert not same(initial[(16, 0)], initial[(16, 1)])  # the check can tell weights apart
    # A later run (rerun, another machine) builds the same weights from seed + model config.
    seed_everything(0)
    cfg = compose_config(["model=speednet_s"])
    again = build_model(cfg.model, 3, 32).state_dict()
    assert same(initial[(16, 0)], again)


# ---------------------------------------------------------------- job names and sweep checks

def test_job_names_leave_out_paths_and_swept_paths_are_refused():
    from cnn_bench.sweep.callback import check_sweep

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        from hydra import compose

        cfg = compose("config", ["dataset.resolution=16"], return_hydra_config=True)
    excluded = set(cfg.hydra.job.config.override_dirname.exclude_keys)
    assert {"dataset.root", "hydra.sweep.dir", "trainer.resume", "output_dir"} <= excluded
    assert cfg.hydra.sweep.subdir == "dataset.resolution=16"  # the job's own settings

    def with_task(*overrides):
        c = cfg.copy()
        c.hydra.overrides.task = list(overrides)
        return c

    assert check_sweep(with_task("dataset.root=/data/a", "model=resnet18,speednet_s")) is None
    problem = check_sweep(with_task("dataset.root=/data/a,/data/b"))
    assert problem and problem.startswith("dataset.root takes several values")


def test_experiment_sweeps_also_name_jobs_by_what_varies():
    # The sweep is in the experiment file (hydra.sweeper.params): fixed command-line overrides
    # must still stay out of the job names (a dozen of them passed the 255-byte name limit).
    fixed = ["experiment=mobilenet_sweep", "dataset.root=/data/a", "trainer.epochs=1",
             "trainer.batch_size=8", "optimizer.lr=0.001", "trainer.ema_decay=0.999"]
    (extra,) = [o for o in named(fixed) if o not in fixed]
    keys = extra.split("=", 1)[1].strip("[]").split(",")
    assert {"experiment", "trainer.epochs", "trainer.batch_size", "optimizer.lr",
            "trainer.ema_decay"} <= set(keys)
    # an experiment's swept key fixed on the command line is no longer swept (Hydra's basic
    # sweeper lets the command line win): no collision to refuse
    from cnn_bench.sweep.callback import check_sweep

    narrowed = [*fixed, "model.width_mult=0.35"]
    overrides = named(narrowed)
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        from hydra import compose

        cfg = compose("config", overrides, return_hydra_config=True)
    cfg.hydra.overrides.task = narrowed
    assert "model.width_mult" in cfg.hydra.sweeper.params
    assert check_sweep(cfg) is None


def test_a_multirun_of_one_job_is_named_by_its_number(tiny_folder, tmp_path):
    # Nothing swept: the job was named by every override, and a dozen of them ended in
    # "File name too long" before anything ran.
    fixed = sweep_overrides(tiny_folder, "trainer.eval_batch_size=16", "optimizer.lr=0.05",
                            "optimizer.weight_decay=0.0005", "augmentation.label_smoothing=0.1",
                            "trainer.seed=3", "model.width_mult=0.5", "dataset.resolution=16")
    assert len(",".join(o for o in fixed if not o.startswith("dataset.root"))) > 255
    sweep = tmp_path / "sweep"
    multirun(sweep, fixed)
    assert [j.name for j in job_dirs(sweep)] == ["0"]
    assert read_status(sweep / "0")["status"] == DONE


def test_a_sweep_with_other_fixed_settings_into_an_earlier_sweep_dir_is_refused(tmp_path, capsys):
    # Jobs are named by what varies, and finished ones are skipped: a second sweep at another
    # resolution in the same folder would have reported the first sweep's jobs as its own.
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    earlier = ["model=speednet_s", "dataset.resolution=32", "model.width_mult=1.0,0.5",
               "trainer.progress=false"]
    (sweep / "multirun.yaml").write_text(OmegaConf.to_yaml({"hydra": {"overrides": {"task": earlier}}}))
    argv = ["-m", f"hydra.sweep.dir={sweep}"]
    cli.check_sweep_dir([*argv, *earlier])  # the same sweep again: resume
    cli.check_sweep_dir([*argv, "model=speednet_s", "dataset.resolution=32",
                         "model.width_mult=1.0,0.5,0.25"])  # more values: extend
    with pytest.raises(SystemExit):
        cli.check_sweep_dir([*argv, "model=speednet_s", "dataset.resolution=40",
                             "model.width_mult=1.0,0.5"])
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: hydra.sweep.dir={sweep} holds a sweep with other fixed "
                          "settings (dataset.resolution: 32 -> 40)") and "\n" not in err
    cli.check_sweep_dir(["-m", f"hydra.sweep.dir={tmp_path / 'new'}", "dataset.resolution=40",
                         "model.width_mult=1.0,0.5"])  # a new folder: nothing to compare


@pytest.mark.parametrize("spelling", ["'{d}'", '"{d}"', "{parent}/${{model.name}}",
                                      "{parent}/speednet_${{hydra.job.name}}",
                                      "{parent}/speednet_${{hydra:job.name}}"])
def test_the_earlier_sweep_check_reads_the_dir_as_hydra_does(tmp_path, capsys, spelling):
    # A quoted dir, or one with an interpolation, named no folder as typed: the check passed and
    # the sweep took the earlier one's 1-epoch jobs as its own.
    # ${hydra:job.name} is "train" in a real run of train.py (the compose API said "app")
    sweep = tmp_path / ("speednet_train" if "job.name" in spelling else "speednet_s")
    sweep.mkdir()
    earlier = ["model=speednet_s", "trainer.epochs=1", "model.width_mult=1.0,0.5"]
    (sweep / "multirun.yaml").write_text(OmegaConf.to_yaml({"hydra": {"overrides": {"task": earlier}}}))
    value = spelling.format(d=sweep, parent=tmp_path)
    with pytest.raises(SystemExit):
        cli.check_sweep_dir(["-m", f"hydra.sweep.dir={value}", "model=speednet_s",
                             "trainer.epochs=2", "model.width_mult=1.0,0.5"])
    assert "(trainer.epochs: 1 -> 2)" in capsys.readouterr().err


def test_jobs_under_a_swept_path_with_output_folder_names_are_found(tmp_path):
    # model.weights=/runs/a/checkpoints/best.pt nests the job under .../checkpoints/best.pt; the
    # walk skipped folders named checkpoints/tb/eval on the way down: "0 jobs", exit 0.
    from cnn_bench.sweep.results import find_jobs

    jobs = [tmp_path / "model.weights=" / "runs" / run / "checkpoints" / "best.pt" for run in "ab"]
    for job in jobs:
        (job / "checkpoints").mkdir(parents=True)
        (job / "status.json").write_text(json.dumps({"status": DONE}))
        (job / "checkpoints" / "status.json").write_text("{}")  # inside a job: not a job
    assert find_jobs(tmp_path) == jobs


def test_a_sweep_whose_job_names_pass_the_file_name_limit_is_refused():
    # Hydra stopped at the first job with two chained "File name too long" tracebacks and no
    # report; the names are known before anything runs.
    from cnn_bench.sweep.callback import check_sweep

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        from hydra import compose

        cfg = compose("config", [], return_hydra_config=True)
    keys = ["optimizer.lr", "optimizer.momentum", "optimizer.weight_decay", "trainer.seed",
            "trainer.batch_size", "trainer.eval_batch_size", "augmentation.label_smoothing",
            "augmentation.crop_padding", "model.width_mult", "dataset.resolution",
            "trainer.ema_decay", "trainer.epochs", "scheduler.warmup_epochs"]
    cfg.hydra.overrides.task = [f"{k}=0.000001,0.000002" for k in keys]
    assert len(",".join(f"{k}=0.000001" for k in keys)) > 255
    problem = check_sweep(cfg)
    assert problem and problem.startswith("job directories would be named by") \
        and "hydra.sweep.subdir=${hydra.job.num}" in problem
    cfg.hydra.overrides.task = [f"{k}=0.1,0.2" for k in keys[:4]]
    assert check_sweep(cfg) is None
    # a glob's values (config names) count too, and a longer kv_sep
    cfg.hydra.overrides.task = ["model=glob(*)", "+b=" + "x" * 240 + ",c"]
    assert check_sweep(cfg) and check_sweep(cfg).startswith("job directories would be named by")
    cfg.hydra.overrides.task = ["+b=" + "x" * 252 + ",c"]
    assert check_sweep(cfg) is None  # "+b=" and 252 bytes: 255, the limit
    cfg.hydra.job.config.override_dirname.kv_sep = "==="
    assert check_sweep(cfg) is not None
    cfg.hydra.overrides.task = [f"{k}=0.000001,0.000002" for k in keys]
    cfg.hydra.sweep.subdir = "${hydra.job.num}"
    assert check_sweep(cfg) is None


def test_a_glob_sweep_is_checked_by_the_names_it_matches(capsys):
    # glob() stopped the check with "error: ConfigLoader is not set".
    cli.check_command_line(["-m", "model=glob(speednet*)", "trainer.epochs=1"])
    with pytest.raises(SystemExit):
        cli.check_command_line(["-m", "model=glob(zzz*)"])
    assert capsys.readouterr().err.startswith("error: model=glob(zzz*) matches no model config")


@pytest.mark.parametrize("argv, message", [
    (["-m", "hydra.launcher.n_jobs=2", "trainer.seed=1,2"],
     "hydra.launcher.n_jobs is an option of the parallel launcher: add hydra/launcher=local_gpus"),
    (["-m", "hydra/launcher=local_gpus", "hydra.launcher.gpus=0", "trainer.seed=1,2"],
     "hydra.launcher.gpus takes a list of GPU ids: hydra.launcher.gpus=[0]"),
])
def test_launcher_options_without_their_launcher_or_shape_are_one_line(argv, message, capsys):
    # Hydra answered with five lines: "Invalid value assigned: int is not a ListConfig", and
    # "To append to your config use +hydra.launcher.n_jobs=2".
    with pytest.raises(SystemExit) as e:
        cli.check_command_line(argv)
    assert e.value.code == 2
    assert capsys.readouterr().err.strip() == f"error: {message}"
    cli.check_command_line(["-m", "hydra/launcher=local_gpus", "hydra.launcher.gpus=[0,2]",
                            "hydra.launcher.n_jobs=2", "trainer.seed=1,2"])


# ---------------------------------------------------------------- the local_gpus launcher

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
        "from test_sweep import multirun, waiting_task\n"
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
