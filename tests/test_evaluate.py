"""evaluate.py and export around a real tiny run: unreadable files, messages that name
evaluate's own settings, where results go, and the export CLI's argument checks."""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys

import pytest
import torch

import cnn_bench.train as train_mod
from cnn_bench import evaluate as evaluate_mod
from cnn_bench import export as export_mod
from cnn_bench.checkpoint import safe_load
from cnn_bench.errors import CnnBenchError
from conftest import ROOT, compose_config, tiny_overrides
from datagen import make_imagefolder


@pytest.fixture(scope="module")
def run_dir(tiny_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("evalrun")
    train_mod.run(compose_config(tiny_overrides(tiny_folder, out, "trainer.epochs=1",
                                                "trainer.limit_train_batches=2")))
    return out


def _evaluate(*overrides: str) -> dict:
    return evaluate_mod.run(compose_config([*overrides, "progress=false"], config_name="evaluate"))


@pytest.mark.parametrize("content, message", [
    (b"", "is empty (0 bytes)"),
    (b"<!DOCTYPE html><html>Not Found</html>", "is not a PyTorch checkpoint (it starts with '<!DOCTYPE"),
    (b"version https://git-lfs.github.com/spec/v1\noid sha256:0\nsize 9\n", "Git LFS pointer"),
])
def test_a_file_that_is_not_a_checkpoint_is_one_line(tmp_path, content, message):
    # They ended in IndexError / KeyError tracebacks, or in "holds objects other than tensors".
    path = tmp_path / "best.pt"
    path.write_bytes(content)
    with pytest.raises(CnnBenchError, match=message.replace("(", r"\(").replace(")", r"\)")):
        safe_load(path)


def test_a_safetensors_file_without_its_suffix_is_named(tmp_path):
    # It was called "not a PyTorch checkpoint (... an HTML page ...)".
    from safetensors.torch import save_file

    path = tmp_path / "weights"
    save_file({"w": torch.zeros(2)}, str(path))
    with pytest.raises(CnnBenchError, match="is a safetensors file: give it the .safetensors suffix"):
        safe_load(path)


def test_a_refused_pickle_protocol_gives_torchs_reason(tmp_path):
    # The reason sits on the line after "WeightsUnpickler error:"; only the empty label came out.
    path = tmp_path / "p4.pt"
    torch.save({"w": torch.zeros(2)}, path, pickle_protocol=4)
    with pytest.raises(CnnBenchError, match=r"\(WeightsUnpickler error: Unsupported operand"):
        safe_load(path)


def test_a_refused_pickle_says_which_global(tmp_path):
    # torch's first line is generic advice with terminal colour codes; the reason came later.
    path = tmp_path / "ns.pt"
    torch.save({"args": argparse.Namespace(lr=0.1)}, path)
    with pytest.raises(CnnBenchError) as e:
        safe_load(path)
    text = str(e.value)
    assert "Unsupported global" in text and "argparse.Namespace" in text, text
    assert "\x1b" not in text and "\n" not in text


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message for a missing GPU")
def test_evaluate_device_message_names_its_own_key(run_dir):
    with pytest.raises(CnnBenchError, match=r"^device=cuda but no CUDA .*use device=cpu$"):
        _evaluate(f"ckpt={run_dir}/checkpoints/best.pt", "device=cuda")


def test_evaluate_on_other_classes_names_them(run_dir, tmp_path):
    # Two classes against the run's three said "dataset.num_classes=3 ... set
    # dataset.num_classes=2" (not an evaluate.py setting); three other names said "(3) do not
    # match (3)".
    ckpt = f"ckpt={run_dir}/checkpoints/best.pt"
    two = make_imagefolder(tmp_path / "two", classes=("a", "b"), per_class=2,
                           splits=("train", "test"))
    with pytest.raises(CnnBenchError, match=r"^the dataset's 2 classes do not match the "
                       r"checkpoint's 3 \(missing c\): point dataset_root"):
        _evaluate(ckpt, f"dataset_root={two}")
    other = make_imagefolder(tmp_path / "other", classes=("a", "b", "x"), per_class=2,
                             splits=("train", "test"))
    with pytest.raises(CnnBenchError, match=r"\(missing c; not in the checkpoint x\)"):
        _evaluate(ckpt, f"dataset_root={other}")
    with pytest.raises(CnnBenchError, match=r"no images found|does not exist|dataset_root"):
        _evaluate(ckpt, f"dataset_root={tmp_path / 'nowhere'}")


def test_evaluate_missing_split_lists_those_there(run_dir, tmp_path):
    # It answered "no 'test' split: use split=val or split=test" whatever existed.
    trainval = make_imagefolder(tmp_path / "tv", per_class=4, splits=("train", "val"))
    with pytest.raises(CnnBenchError, match=r"^the dataset has no 'test' split: use split=val "
                                            r"or split=train$"):
        _evaluate(f"ckpt={run_dir}/checkpoints/best.pt", f"dataset_root={trainval}")


def test_a_checkpoint_outside_a_run_keeps_its_results_beside_it(run_dir, tmp_path):
    # Results went to the checkpoint's grandparent (<dir>/../eval, ../tb) whatever the layout.
    mine = tmp_path / "models" / "mine.pt"
    mine.parent.mkdir()
    shutil.copy(run_dir / "checkpoints" / "best.pt", mine)
    res = _evaluate(f"ckpt={mine}")
    written = json.loads((mine.parent / "eval" / "test" / "evaluation.json").read_text())
    assert written["acc"] == res["acc"]
    assert written["precision"] == "fp32" and written["device"] == "cpu"  # how it was scored
    assert sorted(p.name for p in tmp_path.iterdir()) == ["models"]
    assert not (mine.parent / "tb").exists()


def test_an_unwritable_tensorboard_folder_costs_only_the_scalars(run_dir, tmp_path, caplog):
    # A run folder we may not write to (simulated: tb is a file) ended in a traceback after
    # the results were written elsewhere.
    run = tmp_path / "run"
    shutil.copytree(run_dir / "checkpoints", run / "checkpoints")
    (run / "tb").write_text("not a folder")
    res = _evaluate(f"ckpt={run}/checkpoints/best.pt", f"output_dir={tmp_path / 'out'}")
    assert (tmp_path / "out" / "evaluation.json").is_file() and 0 <= res["acc"] <= 1
    assert any("not logged to TensorBoard" in r.getMessage() for r in caplog.records)


def test_evaluate_multirun_exits_non_zero_on_a_failed_job(run_dir, tmp_path):
    # Its jobs went through the training sweep's bookkeeping, which records a failure and lets
    # the sweep end with exit 0.
    p = subprocess.run([sys.executable, str(ROOT / "evaluate.py"), "-m", f"ckpt={tmp_path}/missing.pt",
                        "progress=false", f"hydra.sweep.dir={tmp_path / 'sweep'}"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2, p.stderr
    assert "error: checkpoint not found" in p.stderr


@pytest.mark.parametrize("args, message", [
    (["formt=pt"], "unknown key 'formt': did you mean: format"),
    (["use_ema=flase"], "use_ema must be true or false; got 'flase'"),
    (["format=pt", "out={tmp}/w.safetensors"], "names a safetensors file but format=pt"),
    (["best.pt"], "'best.pt' is not KEY=VALUE"),
])
def test_export_refuses_what_it_would_ignore(run_dir, tmp_path, capsys, args, message):
    # Unknown keys and bare words were dropped, 'flase' was a true value, and the suffix decided
    # nothing: each exported something other than what was asked.
    argv = [f"ckpt={run_dir}/checkpoints/best.pt", *(a.format(tmp=tmp_path) for a in args)]
    with pytest.raises(SystemExit) as e:
        export_mod.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1, err
    assert not list(tmp_path.iterdir())


def test_export_out_without_the_formats_suffix_gets_it(run_dir, tmp_path):
    # out=weights wrote a safetensors file without a suffix, which model.weights= cannot place.
    export_mod.main([f"ckpt={run_dir}/checkpoints/best.pt", f"out={tmp_path / 'weights'}"])
    assert [p.name for p in tmp_path.iterdir()] == ["weights.safetensors"]


def test_evaluate_multirun_with_one_output_dir_is_refused(run_dir, tmp_path):
    # Every job wrote <output_dir>/evaluation.json: the last one's replaced the others.
    p = subprocess.run([sys.executable, str(ROOT / "evaluate.py"), "-m",
                        f"ckpt={run_dir}/checkpoints/best.pt", "split=test,val",
                        f"output_dir={tmp_path / 'out'}", "progress=false",
                        f"hydra.sweep.dir={tmp_path / 'sweep'}"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "error: output_dir with -m would write every job's" in p.stderr
    assert not (tmp_path / "out").exists()


def test_evaluate_refuses_the_parallel_launcher(capsys):
    # Its workers' failures came back as exit 0 (evaluate has no sweep report to count them).
    from cnn_bench import cli

    with pytest.raises(SystemExit):
        cli.check_command_line(["-m", "hydra/launcher=local_gpus", "ckpt=a.pt,b.pt"], "evaluate")
    assert "drop hydra/launcher=local_gpus" in capsys.readouterr().err


def test_export_out_ending_in_a_slash_is_a_folder(run_dir, tmp_path):
    # out=newdir/ wrote a file named newdir.
    export_mod.main([f"ckpt={run_dir}/checkpoints/best.pt", f"out={tmp_path / 'new'}/", "format=pt"])
    assert [p.name for p in (tmp_path / "new").iterdir()] == ["best_weights.pt"]
