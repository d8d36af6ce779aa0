"""The prepared GPU pass (``benchmarks/gpu_checks.py``) on CPU: its steps' smoke modes, the
carried timm script, the budget and the report. Speed is never asserted here.
"""

from __future__ import annotations

import importlib.util
import sys

import pytest

from benchrun import run_script


def test_gpu_checks_smoke_writes_one_report(tmp_path):
    # The prepared GPU pass, in the steps' smoke modes on CPU: a step that runs puts its table
    # in report.md, one whose package is missing or whose time is gone says why.
    from datagen import make_imagefolder

    # 32 px like CIFAR-10: airbench's step refuses other sizes (where airbench is installed)
    tiny_folder = make_imagefolder(tmp_path / "data", per_class=16, size=(32, 32),
                                   splits=("train", "test"))
    out = tmp_path / "out"
    proc = run_script("gpu_checks.py", "--smoke", "--data", str(tiny_folder), "--wheels",
                str(tmp_path / "none"), "--only", "g1_resnet50,airbench", "--out-dir", str(out))
    report = (out / "report.md").read_text()
    assert "## g1_resnet50: ok" in report and "| speednet_s | 16 | 8 | fp32 | cnn_bench |" in report
    has_airbench = importlib.util.find_spec("airbench") is not None
    assert ("## airbench: ok" if has_airbench else "## airbench: skipped") in report
    assert "==== g1_resnet50: ok" in (out / "logs.txt").read_text()
    assert proc.stdout.splitlines()[0].startswith("g1_resnet50: ok")

    run_script("gpu_checks.py", "--smoke", "--data", str(tiny_folder), "--wheels", str(tmp_path / "none"),
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
    run_script("gpu_checks.py", "--smoke", "--data", str(tiny_folder), "--wheels", str(tmp_path / "none"),
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
