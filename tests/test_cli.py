"""Config mistakes end with one line on stderr and a non-zero exit, never a traceback."""

from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import ROOT, compose_config
from cnn_bench.config import validate
from cnn_bench.errors import CnnBenchError


def run_cli(*args: str, script: str = "train.py") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / script), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("args, expected", [
    (["model=resnet5O"], "unknown model 'resnet5O': did you mean: resnet50"),
    (["trainer.epoch=3"], "unknown config key 'trainer.epoch': did you mean: trainer.epochs"),
    (["trainer.epochs=ten"], "trainer.epochs must be an integer, got 'ten'"),
    (["optimizer=adamm"], "unknown optimizer 'adamm': did you mean: adam"),
    (["trainer.precision=fp8"], "trainer.precision must be one of"),
    (["-m", "model=speednet_s,resnet5O"], "unknown model 'resnet5O'"),
    (["trainer.epochs=[1"], "cannot parse override"),
    # a sweep job's path holds '=' and ',': say how to pass it
    (["trainer.resume=/runs/sweep/model.width_mult=0.5,trainer.seed=0/checkpoints/last.pt"],
     "quote the value: \"trainer.resume='/runs/sweep/model.width_mult=0.5,trainer.seed=0/"),
    (["augmentation=seed", "augmentation.scale=1.1"], "augmentation.scale must be a list of 2"),
    # a key without its group is found by its last part (the list of suggestions was empty)
    (["epochs=3"], "unknown config key 'epochs': did you mean: trainer.epochs?"),
    (["trainer.lr=0.1"], "unknown config key 'trainer.lr': did you mean: optimizer.lr?"),
    # what composes but is not what was meant (Hydra's multi-line errors, or a silent merge)
    (["model.width_mult=0.5,0.25"], "model.width_mult=0.5,0.25 gives several values, a sweep: add -m"),
    (["model=[mobilenet_v1,mobilenet_v2]"], "model takes one option, not a list: to run each, "
                                            "sweep them with -m model=mobilenet_v1,mobilenet_v2"),
    (["-m", "hydra/launcher=local_gpu"], "unknown hydra/launcher 'local_gpu': did you mean: local_gpus?"),
    (["-m", "model.width_mult=0.5,0.25", "model.width_mult=0.5"],
     "model.width_mult is both swept and set (0.5,0.25 and 0.5): keep one"),
    (["~trainer.seed"], "~trainer.seed removes a setting cnn_bench reads"),
    (["experiment=mobilenet_sweep"], "experiment=mobilenet_sweep is a sweep over model, model.width_mult, "
                                     "dataset.resolution: run it with -m"),
    # an added key nothing reads (dataset and augmentation refuse theirs in the builders)
    (["+optimizer.nesterovv=true"], "+optimizer.nesterovv=true: optimizer has no option 'nesterovv', "
                                    "and nothing would read it (did you mean: nesterov?)"),
])
def test_config_mistakes_exit_with_one_line(args, expected):
    p = run_cli(*args)
    assert p.returncode != 0
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, p.stderr
    assert lines[0].startswith("error: ") and expected in lines[0], lines[0]
    assert "Traceback" not in p.stderr + p.stdout


def test_runtime_user_error_is_one_line(tmp_path):
    p = run_cli("dataset=imagefolder", f"dataset.root={tmp_path / 'missing'}",
                f"hydra.run.dir={tmp_path / 'run'}")
    assert p.returncode != 0
    lines = [ln for ln in p.stderr.splitlines() if ln.strip() and "warn" not in ln.lower()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "missing" in lines[0], p.stderr


def test_evaluate_without_ckpt_is_one_line():
    p = run_cli(script="evaluate.py")
    assert p.returncode != 0
    assert p.stderr.strip().startswith("error: ckpt=PATH is required"), p.stderr


def test_validate_accepts_the_defaults_and_int_for_float():
    cfg = compose_config(["optimizer.lr=1"])
    validate(cfg)
    with pytest.raises(CnnBenchError, match="dataset.resolution must be >= 8"):
        validate(compose_config(["dataset.resolution=4"]))


@pytest.mark.parametrize("overrides, expected", [
    (["trainer.early_stopping.mode=maximum"], "trainer.early_stopping.mode must be one of auto, max, min"),
    (["trainer.early_stopping.monitor=val_acc"], "trainer.early_stopping.monitor must be one of val/acc"),
    (["trainer.early_stopping.patience=abc"], "trainer.early_stopping.patience must be an integer"),
    (["scheduler=onecycle", "scheduler.div_factor=0"], "scheduler.div_factor must be > 0"),
    (["scheduler=onecycle", "scheduler.pct_start=1.5"], "scheduler.pct_start must be in (0, 1)"),
    (["scheduler=step", "scheduler.step_epochs=abc"], "scheduler.step_epochs must be a number"),
    (["scheduler.warmup_epochs=abc"], "scheduler.warmup_epochs must be a number"),
    (["optimizer.momentum=abc"], "optimizer.momentum must be a number"),
    (["optimizer.nesterov=maybe"], "optimizer.nesterov must be true or false"),
    (["finetune=partial", "finetune.unfreeze_stages=abc"], "finetune.unfreeze_stages must be an integer"),
    # augmentation, data and model options were converted unchecked (TypeError from deep inside)
    (["augmentation=seed", "augmentation.scale=1.1"],
     "augmentation.scale must be a list of 2 numbers, e.g. augmentation.scale=[0.9,1.1]; got 1.1"),
    (["augmentation=basic", "augmentation.hflip=yes"], "augmentation.hflip must be a number"),
    (["augmentation=basic", "augmentation.hflip=1.5"], "augmentation.hflip must be in [0, 1]"),
    (["augmentation=basic", "augmentation.crop_padding=four"], "augmentation.crop_padding must be a number"),
    (["augmentation=basic", "augmentation.hflip_alternate=1"], "augmentation.hflip_alternate must be true or false"),
    (["dataset.mean=0.5"], "dataset.mean must be a list of 3 numbers (or null)"),
    (["dataset.std=[0.2,0.2,x]"], "dataset.std must be a list of 3 numbers (or null)"),
    (["dataset.num_workers=-1"], "dataset.num_workers must be >= 0"),
    (["dataset.in_memory=maybe"], "dataset.in_memory must be one of auto, True, False"),
    (["model=regnet_bifpn", "model.num_layers=two"], "model.num_layers must be an integer"),
    (["model=mobilenet_v2", "model.dropout=high"], "model.dropout must be a number"),
    (["model=resnet18", "model.stem=tiny"], "model.stem must be one of auto, cifar, imagenet"),
    (["optimizer=adam", "optimizer.betas=[0.9,1.5]"], "optimizer.betas must be a list of 2 numbers in [0, 1)"),
])
def test_validate_rejects_bad_values_before_training(overrides, expected):
    # Each of these used to surface as a traceback (some after an epoch had trained) or, for
    # early stopping, to stop or keep training silently on a key that does not exist.
    with pytest.raises(CnnBenchError) as e:
        validate(compose_config(overrides))
    assert expected in str(e.value)


@pytest.mark.parametrize("overrides, expected", [
    (["split=classes"], "split must be one of test, val, train"),
    (["batch_size=0"], "batch_size must be >= 1"),
    (["precision=fp64"], "precision must be one of auto, fp32, bf16, fp16"),
])
def test_validate_checks_evaluate_keys(overrides, expected):
    validate(compose_config(["ckpt=x.pt"], config_name="evaluate"))
    with pytest.raises(CnnBenchError) as e:
        validate(compose_config(["ckpt=x.pt", *overrides], config_name="evaluate"))
    assert expected in str(e.value)


def test_evaluate_bad_value_is_one_line():
    p = run_cli("ckpt=x.pt", "precision=fp64", script="evaluate.py")
    assert p.returncode != 0 and "Traceback" not in p.stderr
    assert p.stderr.strip() == "error: precision must be one of auto, fp32, bf16, fp16; got 'fp64'"


def test_output_dir_holds_the_whole_run_and_is_never_started_over(tiny_folder, tmp_path):
    # output_dir= got the results while Hydra wrote .hydra/ (its overrides: "[]" in the run)
    # and train.log into outputs/<date>/...; a second run into it overwrote the first.
    from conftest import tiny_overrides

    run = tmp_path / "run"
    args = tiny_overrides(tiny_folder, run, "trainer.epochs=1", "trainer.limit_train_batches=1")
    p = subprocess.run([sys.executable, str(ROOT / "train.py"), *args], cwd=tmp_path,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    recorded = (run / ".hydra" / "overrides.yaml").read_text()
    assert all(f"- {a}" in recorded for a in args), recorded
    assert (run / "train.log").read_text() and (run / "summary.json").exists()
    assert not (tmp_path / "outputs").exists()

    again = subprocess.run([sys.executable, str(ROOT / "train.py"), *args[:-1]], cwd=tmp_path,
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 2 and again.stderr.strip().splitlines() == [
        f"error: {run} already holds a run (checkpoints/last.pt): continue it with trainer.resume=auto, "
        f"or give this run its own directory (hydra.run.dir=... or output_dir=...)"]
    assert (run / ".hydra" / "overrides.yaml").read_text() == recorded  # before Hydra wrote


def test_cnn_bench_warnings_print_as_one_line(monkeypatch):
    # "skipped 1 unreadable file" came out as path:line: UserWarning ... plus the source line
    import warnings

    from cnn_bench import cli

    monkeypatch.setattr(warnings, "formatwarning", warnings.formatwarning)  # restored after
    cli._one_line_warnings()
    ours = str(ROOT / "cnn_bench" / "data" / "build.py")
    assert warnings.formatwarning("skipped 1 unreadable file", UserWarning, ours, 111,
                                  "data = build_data(...)") == "warning: skipped 1 unreadable file\n"
    theirs = warnings.formatwarning("deprecated", FutureWarning, "/lib/torchvision/x.py", 3, "x()")
    assert theirs.startswith("/lib/torchvision/x.py:3: FutureWarning: deprecated")


def _precheck_error(argv: list[str], capsys) -> str | None:
    """The pre-check's one line for ``python train.py <argv>``, or None when it lets it run."""
    from cnn_bench import cli

    try:
        cli.check_command_line(argv, "config")
    except SystemExit:
        (line,) = capsys.readouterr().err.strip().splitlines()
        return line
    return None


def test_precheck_finds_a_held_run_directory_however_it_is_named(tmp_path, capsys):
    # A quoted hydra.run.dir, or hydra.run.dir next to another output_dir, slipped past the
    # pre-check: Hydra rewrote the held run's .hydra/ before the run refused.
    held, new = tmp_path / "held", tmp_path / "new"
    (held / "checkpoints").mkdir(parents=True)
    (held / "checkpoints" / "last.pt").touch()
    for argv in ([f"hydra.run.dir='{held}'"], [f"output_dir={new}", f"hydra.run.dir={held}"],
                 [f"output_dir={held}"]):
        line = _precheck_error(argv, capsys)
        assert line and line.startswith(f"error: {held} already holds a run"), (argv, line)
    assert _precheck_error([f"output_dir={held}", "trainer.resume=auto"], capsys) is None


def test_precheck_leaves_interpolated_and_empty_output_dirs_to_the_run(capsys):
    # ${hydra:...} in output_dir crashed the pre-check (no HydraConfig there)
    assert _precheck_error(["output_dir=runs/${hydra:job.name}"], capsys) is None
    assert _precheck_error(["output_dir="], capsys) is None
    line = _precheck_error(["output_dir=${hydra:runtime.output_dir}/sub"], capsys)
    assert "refers to Hydra's run directory, which follows output_dir" in line
    assert "output_dir must be" in _precheck_error(["output_dir=123"], capsys)


def test_an_empty_output_dir_keeps_hydras_dated_run_dir():
    # output_dir= (a wrapper's empty $OUT) made hydra.run.dir '' : the run went into the cwd
    from hydra.core.utils import setup_globals

    from cnn_bench.cli import compose_config as compose

    setup_globals()  # Hydra's ${now:...} resolver
    assert str(compose("config", ["output_dir="], with_hydra=True).hydra.run.dir).startswith("outputs/")
    assert str(compose("config", ["output_dir=/r/x"], with_hydra=True).hydra.run.dir) == "/r/x"


def test_a_sweep_experiment_with_every_swept_key_fixed_runs_alone(capsys):
    fixed = ["experiment=mobilenet_sweep", "model=mobilenet_v2", "model.width_mult=0.35",
             "dataset.resolution=32"]
    assert _precheck_error(fixed, capsys) is None
    assert "is a sweep over dataset.resolution: run it with -m" in _precheck_error(fixed[:-1], capsys)
