"""The benchmark scripts run end to end on CPU in smoke mode and emit their tables.

Speed is never asserted here: the scripts print their figures and targets, the tests only check
that every code path runs and the tables are well formed. Each smoke run is a subprocess, as a
user would start it, on the tiny generated folder with one intra-op thread.
"""

from __future__ import annotations

import json

import pytest

from benchmarks import common, time_to_accuracy, vs_timm
from benchrun import run_script, table_rows


def test_throughput_smoke(tmp_path):
    out = tmp_path / "throughput.md"
    # --loader-experiment: the loader-alone pass uses the speedrun's reflect crops and
    # alternating flips (GPU check G2's data %)
    proc = run_script("throughput.py", "--smoke", "speednet_s:16:8", "--loader-experiment",
                "cifar10_speedrun", "--out", str(out), "--json", str(tmp_path / "raw.json"))
    text = out.read_text()
    assert text.strip() == proc.stdout.strip()
    assert "CPU:" in text and "torch " in text and "its augmentation cifar10_speedrun's" in text
    rows = table_rows(text)
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
    proc = run_script("vs_timm.py", "--smoke", "--data", str(tiny_folder), "--resolution", "16",
                "--batch-size", "8", "--workdir", str(tmp_path / "work"), "--out", str(out))
    skipped = [ln for ln in proc.stdout.splitlines() if ln.startswith("timm: skipped")]
    assert len(skipped) == 1 and "TIMM_TRAIN_SCRIPT" in skipped[0]
    rows = {r[0]: r for r in table_rows(out.read_text())}
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
    run_script("time_to_accuracy.py", "--smoke", "--data", str(tiny_folder), "--seeds", "0",
         "--set", "dataset.resolution=16", "--workdir", str(tmp_path / "work"), "--out", str(out))
    rows = {r[0]: r for r in table_rows(out.read_text())}
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
    run_script("epoch_table.py", f"resnet={work / 'cifar10_resnet18-seed0'}",
         f"speed={work / 'cifar10_speedrun-seed0' / 'metrics.jsonl'}", "--out", str(curves))
    text = curves.read_text()
    assert text.splitlines()[0] == ("| epoch | resnet: acc | resnet: epoch s | speed: acc | "
                                    "speed: epoch s |")
    (row,) = table_rows(text)
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
    rows = table_rows(epoch_table.table({"a": epoch_table.read_epochs(tmp_path)}))
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
