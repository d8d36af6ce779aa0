"""Sweeps: job names, failure isolation, skip/resume and identical initial weights, all on
speednet_s at 16-32 px with tiny generated data (the launcher: ``test_launcher.py``; the report on
fabricated jobs: ``test_report.py``).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from cnn_bench import cli
from cnn_bench.config import CONF_DIR
from cnn_bench.sweep.status import DONE, FAILED, INTERRUPTED, read_status
from conftest import PLOTS, ROOT, compose_config, read_csv
from sweeping import job_dirs, multirun, named, sweep_overrides


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
