"""The peers' runners on CPU: timm's train.py through vs_timm's launcher (a stand-in script, and
the real one where timm and $TIMM_TRAIN_SCRIPT are present) and airbench94 through airbench_ref.

Speed is never asserted here (see ``test_benchmarks.py``).
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import os
import subprocess
import sys

import pytest

from benchmarks import timm_script, vs_timm
from benchrun import run_script, table_rows


def test_timm_row_parsing_and_skip_reasons(tmp_path, monkeypatch):
    run = tmp_path / "timm"
    run.mkdir()
    with open(run / "summary.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["epoch", "train_loss", "eval_loss", "eval_top1", "eval_top5"])
        w.writerow([0, 2.0, 1.9, 31.5, 80.0])
        w.writerow([1, 1.5, 1.4, 52.25, 90.0])
    assert timm_script.parse_timm(tmp_path)["acc"] == pytest.approx(0.5225)
    assert "TIMM_TRAIN_SCRIPT" in timm_script.timm_missing(None)
    assert "not found" in timm_script.timm_missing(str(tmp_path / "nope.py"))
    script = tmp_path / "train.py"
    script.write_text("")
    monkeypatch.setattr(timm_script.importlib.util, "find_spec", lambda name: None)
    assert "not installed" in timm_script.timm_missing(str(script))


def test_timm_command_does_the_same_work(tmp_path, monkeypatch):
    """Same model, epochs, batch, optimizer, schedule and data as the cnn_bench command."""
    ns = argparse.Namespace(model="resnet18", source="timm", num_classes=10, resolution=32,
                            epochs=3, batch_size=64, lr=0.1, momentum=0.9, weight_decay=5e-4,
                            workers=2, seed=1, device="cpu", precision="auto", val_split="test",
                            handwritten=["tensor"], timm_train_script=str(tmp_path / "t.py"),
                            timm_extra="--log-interval 5", cnn_bench_extra=[])
    runners = {r.name: r for r in vs_timm.build_runners(ns, tmp_path, tmp_path)}
    timm_cmd = runners["timm train.py"].command(tmp_path / "o", False)
    cb_cmd = runners["cnn_bench"].command(tmp_path / "o", False)
    # through the launcher: `python -c TIMM_LAUNCHER <train.py> <device> <times file> <args>`
    assert timm_cmd[1:6] == ["-c", timm_script.TIMM_LAUNCHER, str(tmp_path / "t.py"), "cpu",
                             str(tmp_path / "o" / timm_script.TIMM_TIMES)]
    for flag, value in (("--data-dir", str(tmp_path)), ("--val-split", "test"),
                        ("--model", "resnet18"), ("--num-classes", "10"), ("--img-size", "32"),
                        ("--crop-pct", "1.0"), ("--interpolation", "bilinear"), ("--epochs", "3"),
                        ("-b", "64"), ("-vb", "64"), ("--lr", "0.1"), ("--opt", "sgd"),
                        ("--momentum", "0.9"), ("--weight-decay", "0.0005"), ("--sched", "cosine"),
                        ("--warmup-epochs", "0"), ("--cooldown-epochs", "0"), ("--min-lr", "0"),
                        ("--smoothing", "0"), ("--workers", "2"), ("--seed", "1"),
                        ("--log-interval", "5")):
        assert timm_cmd[timm_cmd.index(flag) + 1] == value, flag
    assert "--no-aug" in timm_cmd and "--sched-on-updates" in timm_cmd
    for flag in ("--amp", "--channels-last", "--pin-mem"):  # fp32, CPU
        assert flag not in timm_cmd, flag
    for ovr in ("model=timm", "model.name=resnet18", "trainer.epochs=3", "trainer.batch_size=64",
                "trainer.eval_batch_size=64", "optimizer.lr=0.1", "scheduler=cosine",
                "scheduler.warmup_epochs=0", "augmentation=none", "trainer.seed=1",
                "dataset.num_workers=2"):
        assert ovr in cb_cmd, ovr
    ns.source = "torchvision"  # timm's train.py would build another network
    monkeypatch.setattr(vs_timm, "timm_missing", lambda script: None)
    t = {r.name: r for r in vs_timm.build_runners(ns, tmp_path, tmp_path)}["timm train.py"]
    assert t.failure and "--source timm" in t.failure


FAKE_TIMM_TRAIN = """\
import argparse, os, sys, time
import torch
parser = argparse.ArgumentParser()
parser.add_argument('--output')
def train_one_epoch(epoch, args, device=torch.device('cuda')):
    time.sleep(0.05)  # a lower bound on the epoch time the launcher measures
    return device
def validate(args, device=torch.device('cuda'), log_suffix=''):
    return device
def main():
    args = parser.parse_args()
    assert args.device == 'cpu', args
    assert train_one_epoch(0, args).type == 'cpu' and validate(args).type == 'cpu'
    assert train_one_epoch(1, args).type == 'cpu'
    os.makedirs(os.path.join(args.output, 'timm'))
    with open(os.path.join(args.output, 'timm', 'summary.csv'), 'w') as f:
        f.write('epoch,train_loss,eval_loss,eval_top1,eval_top5,lr\\n0,1.0,1.0,40.0,90.0,0.0\\n')
if __name__ == '__main__':
    raise SystemExit('the launcher must not run train.py as __main__')
"""


def test_timm_launcher_fixes_the_device_and_times_epochs(tmp_path):
    """The launcher gives a train.py without --device the device, replaces its functions' CUDA
    defaults, times train_one_epoch and runs main() (a stand-in script: no timm needed)."""
    script = tmp_path / "train.py"
    script.write_text(FAKE_TIMM_TRAIN)
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-c", timm_script.TIMM_LAUNCHER, str(script), "cpu",
                           str(out / timm_script.TIMM_TIMES), "--output", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    parsed = timm_script.parse_timm(out)
    assert parsed["acc"] == pytest.approx(0.4)
    epochs = json.loads((out / timm_script.TIMM_TIMES).read_text())["train_epoch_s"]
    assert len(epochs) == 2 and all(s >= 0.05 for s in epochs)  # each slept 0.05 s
    assert parsed["train_s"] == pytest.approx(sum(epochs))


AIRBENCH_TABLE = """\
------------------------------------------------------------------------------------------------------
|  run     |  epoch  |  train_loss  |  train_acc  |  val_acc  |  tta_val_acc  |  total_time_seconds  |
------------------------------------------------------------------------------------------------------
|       0  |      0  |      0.0123  |     0.5000  |   0.6000  |               |              0.4100  |
|          |   eval  |      0.0100  |     0.9000  |   0.9300  |       0.9401  |              3.0912  |
------------------------------------------------------------------------------------------------------
"""


def test_airbench_seconds_reads_its_own_timer():
    # The table airbench 0.1.8's train94(verbose=True) prints (made with its print functions):
    # on CUDA the peer's time is its own figure, as published, not a wall clock around setup.
    from benchmarks.airbench_ref import airbench_seconds

    assert airbench_seconds(AIRBENCH_TABLE) == 3.0912
    with pytest.raises(ValueError):
        airbench_seconds(AIRBENCH_TABLE.splitlines()[3])


def test_airbench_files_mix_the_classes(tmp_path):
    # airbench whitens from train images[:5000]; written in class order those were all one
    # class (CIFAR-10's airplanes), unlike torchvision's CIFAR-10 order.
    import torch

    from benchmarks.airbench_ref import write_airbench_files
    from datagen import make_imagefolder

    data = make_imagefolder(tmp_path / "data", per_class=12, size=(32, 32), splits=("train", "test"))
    dest = write_airbench_files(data, tmp_path / "ab")
    train = torch.load(dest / "train.pt", weights_only=True)
    assert sorted(train["labels"].tolist()) == [0] * 12 + [1] * 12 + [2] * 12
    assert set(train["labels"][:12].tolist()) == {0, 1, 2}  # the first third holds every class
    assert train["labels"].tolist() != sorted(train["labels"].tolist())
    # Kept for the same source; another folder (or limit) in the same place is decoded anew.
    other = make_imagefolder(tmp_path / "other", per_class=5, size=(32, 32), splits=("train", "test"))
    assert write_airbench_files(data, tmp_path / "ab") == dest
    assert torch.load(dest / "train.pt", weights_only=True)["labels"].numel() == 36
    write_airbench_files(other, tmp_path / "ab")
    assert torch.load(dest / "train.pt", weights_only=True)["labels"].numel() == 15
    write_airbench_files(other, tmp_path / "ab", limit=6)
    assert torch.load(dest / "test.pt", weights_only=True)["labels"].numel() == 6


@pytest.mark.skipif(importlib.util.find_spec("airbench") is None,
                    reason="needs airbench installed (pip install airbench==0.1.8)")
def test_airbench_ref_smoke(tmp_path):
    """airbench94's recipe, 3 steps on CPU, on a generated 32 px folder: one row, three TTA
    levels, the data written in airbench's format."""
    from datagen import make_imagefolder

    data = make_imagefolder(tmp_path / "data", per_class=16, size=(32, 32), splits=("train", "test"))
    out = tmp_path / "airbench.md"
    run_script("airbench_ref.py", "--smoke", "--data", str(data), "--workdir", str(tmp_path / "work"),
         "--out", str(out))
    (row,) = table_rows(out.read_text())
    assert row[:3] == ["0", "3 steps", "cpu"]
    assert all(0 <= float(c) <= 1 for c in row[3:6]) and float(row[6]) > 0
    assert (tmp_path / "work/smoke/cifar10/train.pt").exists()


_TIMM_SCRIPT = os.environ.get("TIMM_TRAIN_SCRIPT")


@pytest.mark.skipif(importlib.util.find_spec("timm") is None or not _TIMM_SCRIPT
                    or not os.path.isfile(os.path.expanduser(_TIMM_SCRIPT)),
                    reason="needs timm installed and $TIMM_TRAIN_SCRIPT (timm's train.py)")
def test_vs_timm_smoke_with_timm(tiny_folder, tmp_path):
    """The timm row for real: timm's train.py on the tiny folder, the same timm resnet18 in
    every runner."""
    out = tmp_path / "vs_timm.md"
    proc = run_script("vs_timm.py", "--smoke", "--data", str(tiny_folder), "--source", "timm",
                "--model", "resnet18", "--num-classes", "3", "--resolution", "16",
                "--batch-size", "8", "--handwritten", "tensor", "--device", "cpu",
                "--timm-train-script", os.path.expanduser(_TIMM_SCRIPT),
                "--workdir", str(tmp_path / "work"), "--out", str(out))
    assert not any(ln.startswith("timm: skipped") for ln in proc.stdout.splitlines())
    rows = {r[0]: r for r in table_rows(out.read_text())}
    assert set(rows) == {"cnn_bench", "hand-written (tensor)", "timm train.py"}
    for r in rows.values():
        wall, acc = float(r[2]), float(r[5])
        assert wall > 0 and 0 <= acc <= 1, r
    assert float(rows["timm train.py"][4]) > 0  # train s, timed by the launcher
    assert "cnn_bench / timm" in out.read_text()
