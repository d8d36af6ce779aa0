"""The benchmark scripts run end to end on CPU in smoke mode and emit their tables.

Speed is never asserted here: the scripts print their figures and targets, the tests only check
that every code path runs and the tables are well formed. Each smoke run is a subprocess, as a
user would start it, on the tiny generated folder with one intra-op thread.
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

from benchmarks import common, time_to_accuracy, timm_script, vs_timm
from conftest import ROOT

BENCH = ROOT / "benchmarks"


def _run(script: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if k != "TIMM_TRAIN_SCRIPT"}
    full_env.update(OMP_NUM_THREADS="1", **(env or {}))
    proc = subprocess.run([sys.executable, str(BENCH / script), *args], cwd=ROOT, env=full_env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


def _table_rows(text: str) -> list[list[str]]:
    """Body rows of the markdown table(s) in ``text``, as lists of cells."""
    rows = [ln for ln in text.splitlines() if ln.startswith("| ")]
    return [[c.strip() for c in ln.strip("|").split("|")] for ln in rows[1:]
            if not ln.startswith("| model") and not ln.startswith("| runner")]


def test_throughput_smoke(tmp_path):
    out = tmp_path / "throughput.md"
    # --loader-experiment: the loader-alone pass uses the speedrun's reflect crops and
    # alternating flips (GPU check G2's data %)
    proc = _run("throughput.py", "--smoke", "speednet_s:16:8", "--loader-experiment",
                "cifar10_speedrun", "--out", str(out), "--json", str(tmp_path / "raw.json"))
    text = out.read_text()
    assert text.strip() == proc.stdout.strip()
    assert "CPU:" in text and "torch " in text and "its augmentation cifar10_speedrun's" in text
    rows = _table_rows(text)
    assert [r[4] for r in rows] == ["cnn_bench", "plain"]
    a, b = rows
    assert a[:4] == ["speednet_s", "16", "8", "fp32"]
    for cell in (a[5], a[6], b[5], b[6], a[7], a[9]):  # img/s, ratio, peak memory
        assert float(cell.split(" ")[0].replace(",", "")) > 0, cell
    assert float(a[10].split(" ")[0]) >= 0  # data %: rounds to 0.0 next to a CPU step
    # the ratio cells are the median of the per-repeat ratios cnn_bench / plain
    import statistics

    (raw,) = json.loads((tmp_path / "raw.json").read_text())
    for kind, col in (("train", 7), ("eval", 8)):
        per_repeat = [x / y for x, y in zip(raw[f"cnn_bench_{kind}_ips"], raw[f"plain_{kind}_ips"])]
        assert raw[f"ratio_{kind}"] == pytest.approx(per_repeat)
        assert float(a[col].split(" ")[0]) == pytest.approx(statistics.median(per_repeat), abs=6e-4)


def test_throughput_compile_times_train_and_eval_through_the_compiled_model(monkeypatch, capsys,
                                                                            one_thread):
    # Under --compile the eval img/s came from the eager model on both paths (the trainer
    # evaluates through the compiled one). A counting stand-in for torch.compile shows the route.
    import collections

    import torch

    from benchmarks import throughput

    calls = collections.Counter()

    class Counting(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, x):
            calls["train" if self.m.training else "eval"] += 1
            return self.m(x)

    monkeypatch.setattr(torch, "compile", lambda m, **kw: Counting(m))
    throughput.main(["speednet_s:16:8", "--compile", "--steps", "2", "--warmup-steps", "1",
                     "--eval-steps", "3", "--repeats", "1", "--device", "cpu"])
    assert "fp32, compile" in capsys.readouterr().out
    # per path: 1 warm-up + 2 timed steps; 1 untimed (compiling) + 3 timed eval batches
    assert calls == {"train": 2 * 3, "eval": 2 * 4}


def test_throughput_builds_the_loader_experiments_model(monkeypatch, capsys, one_thread):
    # G2 timed speednet with its YAML defaults while the speedrun trains it with a whitening
    # stem, dirac init and frozen BN scales (~20% fewer FLOPs): another network's img/s.
    from benchmarks import throughput
    from cnn_bench.models import build as build_mod
    from cnn_bench.models.speednet import SpeedNet

    built, inits = [], []
    real_build, real_init = build_mod.build_model, SpeedNet.init_from_data
    monkeypatch.setattr(build_mod, "build_model",
                        lambda cfg, *a, **k: built.append(dict(cfg)) or real_build(cfg, *a, **k))
    monkeypatch.setattr(SpeedNet, "init_from_data",
                        lambda self, x: inits.append(x.shape) or real_init(self, x))
    throughput.main(["speednet:16:8", "--smoke", "--loader-experiment", "cifar10_speedrun",
                     "--device", "cpu"])
    assert "built with its options there" in capsys.readouterr().out
    assert built and all(m["whiten"] and m["dirac"] and m["bn_scale"] is False for m in built)
    assert len(inits) == len(built)  # the whitening stem is set from data in both paths


@pytest.mark.parametrize("splits, val_split, view", [
    (("train", "test"), "test", False),
    (("train", "val"), "val", False),
    # cnn_bench would also score test/ at the end (extra work in its wall time) ...
    (("train", "val", "test"), "val", True),
    # ... or validate on val/ while the other runners evaluate valid/
    (("train", "val", "valid"), "valid", True),
    (("train", "val", "test"), "test", True),
])
def test_vs_timm_gives_every_runner_the_same_splits(tmp_path, splits, val_split, view):
    from datagen import make_imagefolder

    root = make_imagefolder(tmp_path / "root", per_class=1, splits=splits)
    got = common.same_splits_view(root, val_split, tmp_path / "view")
    assert (got != root) is view
    assert sorted(p.name for p in got.iterdir() if p.is_dir()) == sorted(["train", val_split])


def test_vs_timm_smoke_without_timm(tiny_folder, tmp_path):
    out = tmp_path / "vs_timm.md"
    proc = _run("vs_timm.py", "--smoke", "--data", str(tiny_folder), "--resolution", "16",
                "--batch-size", "8", "--workdir", str(tmp_path / "work"), "--out", str(out))
    skipped = [ln for ln in proc.stdout.splitlines() if ln.startswith("timm: skipped")]
    assert len(skipped) == 1 and "TIMM_TRAIN_SCRIPT" in skipped[0]
    rows = {r[0]: r for r in _table_rows(out.read_text())}
    assert set(rows) == {"cnn_bench", "hand-written (tensor)", "hand-written (folder)", "timm train.py"}
    for name in ("cnn_bench", "hand-written (tensor)", "hand-written (folder)"):
        wall, acc = float(rows[name][2]), float(rows[name][5])
        assert wall > 0 and 0 <= acc <= 1, rows[name]
    assert rows["timm train.py"][2].startswith("skipped")
    assert "CPU target" in out.read_text()
    # the hand-written runners score the test split (3 classes x 8 images), as cnn_bench does
    for name in ("hand-written (tensor)", "hand-written (folder)"):
        run = tmp_path / "work" / "runs" / f"{vs_timm.slug(name)}-0"
        result = json.loads((run / "result.json").read_text())
        assert {h["val_images"] for h in result["history"]} == {24}
        assert result["final_acc"] == pytest.approx(float(rows[name][5]), abs=5e-5)
    # The folder has val/ too: cnn_bench must evaluate test/ after every epoch, as the others do
    # (its summary then has no separate test_acc), through a view without val/.
    summary = json.loads((tmp_path / "work" / "runs" / "cnn-bench-0" / "summary.json").read_text())
    assert summary["test_acc"] is None
    assert summary["final_val_acc"] == pytest.approx(float(rows["cnn_bench"][5]), abs=5e-5)
    assert not (tmp_path / "work" / "view" / "val").exists()


def test_time_to_accuracy_smoke(tiny_folder, tmp_path):
    out = tmp_path / "tta.md"
    _run("time_to_accuracy.py", "--smoke", "--data", str(tiny_folder), "--seeds", "0",
         "--set", "dataset.resolution=16", "--workdir", str(tmp_path / "work"), "--out", str(out))
    rows = {r[0]: r for r in _table_rows(out.read_text())}
    assert set(rows) == {"cifar10_resnet18", "cifar10_speedrun"}
    for exp, r in rows.items():
        assert r[1] == "1" and r[2] == "1/1" and r[6] == "1" and r[-1] == "-", r
        assert float(r[5].split()[0]) >= float(r[4].split()[0])  # + the evaluation's time
        # The folder has val/ too: the accuracy per epoch (and to target) is test/'s, through a
        # view without val/ (else the trainer validates on val/ and scores test/ once at the end).
        summary = json.loads((tmp_path / "work" / f"{exp}-seed0" / "summary.json").read_text())
        assert summary["test_acc"] is None and summary["final_val_acc"] is not None
        assert float(r[7].split()[0]) == pytest.approx(summary["final_val_acc"], abs=5e-5)
    assert not (tmp_path / "work" / "view" / "val").exists()
    # epoch_table.py puts the two runs' curves side by side (their metrics.jsonl epoch records).
    work = tmp_path / "work"
    curves = tmp_path / "curves.md"
    _run("epoch_table.py", f"resnet={work / 'cifar10_resnet18-seed0'}",
         f"speed={work / 'cifar10_speedrun-seed0' / 'metrics.jsonl'}", "--out", str(curves))
    text = curves.read_text()
    assert text.splitlines()[0] == ("| epoch | resnet: acc | resnet: epoch s | speed: acc | "
                                    "speed: epoch s |")
    (row,) = _table_rows(text)
    for run, cells in (("cifar10_resnet18", row[1:3]), ("cifar10_speedrun", row[3:5])):
        (rec,) = [json.loads(ln) for ln in (work / f"{run}-seed0" / "metrics.jsonl").open()
                  if '"val/acc"' in ln]
        assert cells == [f"{rec['val/acc']:.4f}", f"{rec['epoch_time_s']:.2f}"], run
    assert row[0] == "1"


def test_epoch_table_shows_a_run_without_evaluation(tmp_path):
    # Without a val/test split the trainer logs val/acc as null; sub-second epochs keep digits.
    from benchmarks import epoch_table

    (tmp_path / "metrics.jsonl").write_text(
        '{"epoch": 1, "val/acc": null, "epoch_time_s": 0.31}\n'
        '{"epoch": 2, "val/acc": 0.5, "epoch_time_s": 0.29}\n')
    rows = _table_rows(epoch_table.table({"a": epoch_table.read_epochs(tmp_path)}))
    assert rows == [["1", "-", "0.31"], ["2", "0.5000", "0.29"]]


@pytest.mark.parametrize("module", ["throughput", "vs_timm", "time_to_accuracy", "handwritten",
                                    "epoch_table"])
def test_help(module, capsys):
    mod = __import__(f"benchmarks.{module}", fromlist=["main"])
    with pytest.raises(SystemExit) as exc:
        mod.main(["--help"])
    assert exc.value.code == 0
    assert "Example" in capsys.readouterr().out


def test_first_reaching_counts_training_time_up_to_the_target():
    records = [{"epoch": 1, "val/acc": 0.5, "epoch_time_s": 2.0, "val_time_s": 0.5},
               {"epoch": 2, "val/acc": 0.95, "epoch_time_s": 3.0, "val_time_s": 0.25},
               {"epoch": 3, "val/acc": 0.96, "epoch_time_s": 4.0, "val_time_s": 0.5}]
    assert time_to_accuracy.first_reaching(records, 0.94) == (2, 5.0, 5.75)
    assert time_to_accuracy.first_reaching(records, 0.99) == (None, None, None)


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
    _run("airbench_ref.py", "--smoke", "--data", str(data), "--workdir", str(tmp_path / "work"),
         "--out", str(out))
    (row,) = _table_rows(out.read_text())
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
    proc = _run("vs_timm.py", "--smoke", "--data", str(tiny_folder), "--source", "timm",
                "--model", "resnet18", "--num-classes", "3", "--resolution", "16",
                "--batch-size", "8", "--handwritten", "tensor", "--device", "cpu",
                "--timm-train-script", os.path.expanduser(_TIMM_SCRIPT),
                "--workdir", str(tmp_path / "work"), "--out", str(out))
    assert not any(ln.startswith("timm: skipped") for ln in proc.stdout.splitlines())
    rows = {r[0]: r for r in _table_rows(out.read_text())}
    assert set(rows) == {"cnn_bench", "hand-written (tensor)", "timm train.py"}
    for r in rows.values():
        wall, acc = float(r[2]), float(r[5])
        assert wall > 0 and 0 <= acc <= 1, r
    assert float(rows["timm train.py"][4]) > 0  # train s, timed by the launcher
    assert "cnn_bench / timm" in out.read_text()


def test_spread_and_subset(tmp_path):
    assert common.Spread.of([3, 1, 2]).fmt(1) == "2.0 (1.0-3.0)"
    assert common.Spread.of([5]).fmt(0) == "5"
    assert common.Spread.of([]).fmt() == "-"
    src = tmp_path / "src"
    for split in ("train", "test"):
        for cls in ("a", "b"):
            d = src / split / cls
            d.mkdir(parents=True)
            for i in range(5):
                (d / f"{i}.jpg").write_bytes(b"x")
    sub = common.make_subset(src, tmp_path / "sub", {"train": 3, "test": None})
    assert sorted(p.name for p in (sub / "train" / "a").iterdir()) == ["0.jpg", "1.jpg", "2.jpg"]
    assert len(list((sub / "test" / "b").iterdir())) == 5
    assert (sub / "train" / "a" / "0.jpg").resolve() == (src / "train" / "a" / "0.jpg").resolve()


def test_gpu_checks_smoke_writes_one_report(tmp_path):
    # The prepared GPU pass, in the steps' smoke modes on CPU: a step that runs puts its table
    # in report.md, one whose package is missing or whose time is gone says why.
    from datagen import make_imagefolder

    # 32 px like CIFAR-10: airbench's step refuses other sizes (where airbench is installed)
    tiny_folder = make_imagefolder(tmp_path / "data", per_class=16, size=(32, 32),
                                   splits=("train", "test"))
    out = tmp_path / "out"
    proc = _run("gpu_checks.py", "--smoke", "--data", str(tiny_folder), "--wheels",
                str(tmp_path / "none"), "--only", "g1_resnet50,airbench", "--out-dir", str(out))
    report = (out / "report.md").read_text()
    assert "## g1_resnet50: ok" in report and "| speednet_s | 16 | 8 | fp32 | cnn_bench |" in report
    has_airbench = importlib.util.find_spec("airbench") is not None
    assert ("## airbench: ok" if has_airbench else "## airbench: skipped") in report
    assert "==== g1_resnet50: ok" in (out / "logs.txt").read_text()
    assert proc.stdout.splitlines()[0].startswith("g1_resnet50: ok")

    _run("gpu_checks.py", "--smoke", "--data", str(tiny_folder), "--wheels", str(tmp_path / "none"),
         "--only", "g3_speedrun", "--budget", "0", "--out-dir", str(out))
    assert "## g3_speedrun: skipped" in (out / "report.md").read_text()
    assert "not started: 0 s of the budget left" in (out / "report.md").read_text()


def test_gpu_checks_uses_the_carried_timm_script(tiny_folder, tmp_path):
    # --prepare copies $TIMM_TRAIN_SCRIPT into .gpu/ (the GPU machine cannot download it);
    # there, with no $TIMM_TRAIN_SCRIPT set, the carried copy is the one G4 uses.
    gpu = tmp_path / "gpu"
    gpu.mkdir()
    (gpu / "timm_train.py").write_text("print('timm')\n")
    out = tmp_path / "out"
    _run("gpu_checks.py", "--smoke", "--data", str(tiny_folder), "--wheels", str(tmp_path / "none"),
         "--data-tar", str(gpu / "cifar10-jpeg.tar.xz"), "--only", "g4_timm", "--budget", "0",
         "--out-dir", str(out))
    report = (out / "report.md").read_text()
    assert f"- timm's train.py: {gpu / 'timm_train.py'}" in report
    assert "is not set" not in report


def test_gpu_checks_flags_compile_fallbacks_and_skipped_cuda_graphs():
    from benchmarks import gpu_checks

    out = ("epoch 1\nUserWarning: torch.compile failed, training eagerly: boom\n"
           "skipping cudagraphs due to mutated inputs (2 instances)\nepoch 2\n"
           "UserWarning: torch.compile failed, training eagerly: boom\n")
    assert gpu_checks.notable_lines(out) == [
        "UserWarning: torch.compile failed, training eagerly: boom",
        "skipping cudagraphs due to mutated inputs (2 instances)"]
    assert gpu_checks.notable_lines("epoch 1\nepoch 2\n") == []


def test_gpu_checks_step_past_the_budget_takes_its_children_along(tmp_path):
    # A stopped step's own children (time_to_accuracy's train.py runs) must not keep running.
    import time

    from benchmarks import gpu_checks

    marker = tmp_path / "grandchild_ran"
    child = f"import time, pathlib; time.sleep(2); pathlib.Path({str(marker)!r}).touch()"
    argv = [sys.executable, "-c", "import subprocess, sys, time; subprocess.Popen([sys.executable, "
            f"'-c', {child!r}]); print('started', flush=True); time.sleep(30)"]
    code, output = gpu_checks._run(argv, 1.0, tmp_path / "step.log")
    assert code is None and output == "started\n"
    assert (tmp_path / "step.log").read_text() == "started\n"  # what a cut-off pass brings back
    time.sleep(2.5)
    assert not marker.exists()
    assert gpu_checks._run([sys.executable, "-c", "print('hi')"], 30, tmp_path / "b.log") == (0, "hi\n")


def test_gpu_checks_without_a_visible_gpu_stops_at_once(tmp_path):
    # Every step would have run on the CPU into the budget, the CUDA tests "ok" while skipped.
    import torch

    from benchmarks import gpu_checks

    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    assert gpu_checks.main(["--budget", "10", "--out-dir", str(tmp_path)]) == 1
    assert "sees no GPU: nothing run" in (tmp_path / "report.md").read_text()
