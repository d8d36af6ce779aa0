"""The sweep report on fabricated job directories: rows of done, failed, running and
pre-status jobs, the Pareto front, the width x resolution heatmap's cells, the CLI's errors.
(A report written by a real sweep is checked in ``test_sweep.py``.)"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from cnn_bench.sweep.status import DONE, FAILED
from conftest import PLOTS, ROOT, read_csv


def fake_job(job: Path, status: str | None, model: str = "mobilenet_v2", width: float = 1.0,
             res: int = 96, val_accs=(0.5, 0.6), summary: bool = True, flops: int = 10**8,
             reason: str | None = None) -> Path:
    """A job directory as the trainer and the sweep wrapper leave it."""
    job.mkdir(parents=True)
    (job / ".hydra").mkdir()
    cfg = {"model": {"name": model, "width_mult": width}, "dataset": {"resolution": res},
           "trainer": {"epochs": 2}}
    (job / ".hydra" / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    lines = [{"epoch": i + 1, "train/acc": a - 0.1, "train/loss": 1.0, "val/acc": a,
              "val/loss": 2.0 - a, "epoch_time_s": 2.0, "train/images_per_s": 100.0,
              "wall_time_s": 3.0 * (i + 1)}
             for i, a in enumerate(val_accs)]
    if lines:
        (job / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
        (job / "metrics.jsonl").write_text("".join(json.dumps(ln) + "\n" for ln in lines))
    if summary:
        best = max(val_accs)
        (job / "summary.json").write_text(json.dumps({
            "model": model, "width_mult": width, "resolution": res, "params": int(10**6 * width),
            "flops": flops, "epochs": len(val_accs), "best_val_acc": best,
            "best_epoch": list(val_accs).index(best) + 1, "final_val_acc": val_accs[-1],
            "final_val_loss": 2.0 - val_accs[-1], "final_train_acc": val_accs[-1] - 0.1,
            "wall_time_s": 5.0, "train_images_per_s": 100.0}))
    if status:
        (job / "status.json").write_text(json.dumps({"status": status, "reason": reason}))
    return job


def test_report_on_a_partly_failed_running_sweep(tmp_path):
    from cnn_bench import report
    from cnn_bench.sweep.results import collect, pareto_front

    sweep = tmp_path / "sweep"
    fake_job(sweep / "model=mobilenet_v2,res=96", DONE, val_accs=(0.5, 0.7), flops=10**8)
    fake_job(sweep / "model=mobilenet_v2,res=128", DONE, res=128, val_accs=(0.6, 0.65), flops=2 * 10**8)
    fake_job(sweep / "model=mobilenet_v2,res=160", DONE, res=160, val_accs=(0.8, 0.9), flops=3 * 10**8)
    fake_job(sweep / "model=mobilenet_v1,res=96", "running", model="mobilenet_v1",
             val_accs=(0.4,), summary=False)
    fake_job(sweep / "model=mobilenet_v1,res=128", FAILED, model="mobilenet_v1", res=128,
             val_accs=(), summary=False, reason="RuntimeError: Output size is too small")
    fake_job(sweep / "nested" / "model=mobilenet_v1,width=0.5", None, model="mobilenet_v1",
             width=0.5)  # a run from before status records: summary only

    rows = {r.job: r for r in collect(sweep)}
    assert len(rows) == 6
    running = rows["model=mobilenet_v1,res=96"]
    assert running.status == "running" and running.final_val_acc == 0.4 and running.epochs == 1
    assert running.max_epochs == 2 and running.params is None and running.images_per_s == 100.0
    assert running.wall_time_s == 3.0  # the run's wall time so far, not its epochs' 2.0 s
    failed = rows["model=mobilenet_v1,res=128"]
    assert failed.status == FAILED and failed.best_val_acc is None and failed.resolution == 128
    assert rows["nested/model=mobilenet_v1,width=0.5"].status == DONE
    done = rows["model=mobilenet_v2,res=96"]
    assert done.best_val_acc == 0.7 and done.best_epoch == 2 and done.best_val_loss == pytest.approx(1.3)
    front = pareto_front(list(rows.values()))
    assert [r.resolution for r in front if r.model == "mobilenet_v2"] == [96, 160]  # 128 is dominated

    assert report.main([str(sweep), "--no-tensorboard"]) == 0
    csv_rows = read_csv(sweep / "results.csv")
    assert len(csv_rows) == 6 and {r["status"] for r in csv_rows} == {DONE, "running", FAILED}
    md = (sweep / "results.md").read_text()
    assert "6 jobs: 4 done, 1 failed, 1 running" in md
    assert "`model=mobilenet_v1,res=128`: failed: RuntimeError: Output size is too small" in md
    assert "| done | `model=mobilenet_v2,res=96` |" in md  # rows name their job
    for plot in PLOTS:
        assert (sweep / plot).stat().st_size > 5000 and f"]({plot})" in md
    # The Pareto entries name their job too (jobs may differ in an lr or a seed), and the table
    # has the test accuracy the CSV has.
    assert "- mobilenet_v2 x1 @ 96 px: 70.00% at 0.1000 GFLOPs (`model=mobilenet_v2,res=96`)" in md
    assert "| test acc (%) |" in md


def test_report_without_matplotlib_still_writes_the_tables(tmp_path, monkeypatch, capsys):
    # report.py imported the plots (matplotlib) at module level: without it the sweep callback
    # died before any table was written.
    import importlib

    monkeypatch.setitem(sys.modules, "cnn_bench.sweep.plots", None)
    monkeypatch.delitem(sys.modules, "cnn_bench.report", raising=False)
    report = importlib.import_module("cnn_bench.report")
    sweep = tmp_path / "sweep"
    fake_job(sweep / "model=mobilenet_v2,res=96", DONE)
    assert report.main([str(sweep), "--no-tensorboard"]) == 0
    assert (sweep / "results.csv").is_file() and (sweep / "results.md").is_file()
    assert not list(sweep.glob("*.png")) and "warning: no figures" in capsys.readouterr().err


def test_heatmap_of_equal_accuracies_writes_light_on_dark():
    # One job (or all equal): the cells take the colour scale's dark end, and their labels were
    # black on it.
    from types import SimpleNamespace

    from cnn_bench.sweep.plots import width_resolution_heatmap

    rows = [SimpleNamespace(model="m", width=w, resolution=96, best_val_acc=0.5, status=DONE)
            for w in (1.0, 0.5)]
    fig = width_resolution_heatmap(rows)
    assert [t.get_color() for t in fig.axes[0].texts] == ["white", "white"]


def test_pareto_front_keeps_exact_ties():
    from types import SimpleNamespace

    from cnn_bench.sweep.results import pareto_front

    rows = [SimpleNamespace(job=j, flops=f, best_val_acc=a) for j, f, a in
            [("a", 100, 0.9), ("b", 100, 0.9), ("c", 200, 0.9), ("d", 50, 0.5), ("e", 100, 0.8)]]
    assert [r.job for r in pareto_front(rows)] == ["d", "a", "b"]  # c and e are dominated


def test_heatmap_averages_jobs_that_share_a_cell():
    # Two seeds of the same model, width and resolution: one cell, their mean, marked n=2
    # (a later job used to overwrite the earlier one's cell).
    from types import SimpleNamespace

    from cnn_bench.sweep.plots import heatmap_cells

    def row(width, res, acc, status=DONE):
        return SimpleNamespace(width=width, resolution=res, best_val_acc=acc, status=status)

    rows = [row(1.0, 96, 1.0), row(1.0, 96, 0.0), row(0.5, 96, 0.5, "running"),
            row(0.5, 128, None, FAILED)]
    grid, notes = heatmap_cells(rows, [1.0, 0.5], [96, 128])
    assert grid[0][0] == 50.0 and notes[0][0] == "50.0 (n=2)"
    assert notes[1][0] == "50.0*" and notes[1][1] == FAILED and notes[0][1] == ""


def test_report_cli_errors_are_one_line(tmp_path):
    p = subprocess.run([sys.executable, "-m", "cnn_bench.report", str(tmp_path / "missing")],
                       cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and p.stderr.strip() == f"error: no sweep directory at {tmp_path / 'missing'}"


def test_figures_mark_the_same_pareto_front_as_results_md(tmp_path, monkeypatch):
    # A diverged job writes summary.json (FLOPs, a finite best) and is marked failed: the
    # figures circled it on their front while results.md left it out.
    from cnn_bench.sweep import plots
    from cnn_bench.sweep.results import collect

    sweep = tmp_path / "sweep"
    fake_job(sweep / "a", DONE, val_accs=(0.5, 0.6), flops=2 * 10**8)
    fake_job(sweep / "b", FAILED, val_accs=(0.7, 0.8), flops=10**8, reason="training diverged")
    rows = collect(sweep)
    fronts = []
    real = plots.pareto_front
    monkeypatch.setattr(plots, "pareto_front", lambda rs, x="flops": fronts.append(real(rs, x=x)) or fronts[-1])
    plots.acc_vs_flops(rows)
    plots.acc_vs_params(rows)
    assert [[r.job for r in f] for f in fronts] == [["a"], ["a"]]
