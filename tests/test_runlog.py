"""RunLog: the TensorBoard and metrics.jsonl records of a run, across a resume."""

from __future__ import annotations

import time

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.summary.writer import event_file_writer

from cnn_bench.runlog import RunLog


def test_resumed_events_follow_the_first_attempts_within_one_second(tmp_path, monkeypatch):
    # TensorBoard reads a run's event files in name order: <unix second>.<host>.<pid>.<writer
    # counter>. Two attempts in one process within one second whose counters cross a digit
    # (9 -> 10) sort the resumed attempt's file first, and the purge then dropped nothing and
    # the curve read 8, 12, 4.
    monkeypatch.setattr(event_file_writer, "_global_uid", event_file_writer.AtomicCounter(9))
    while time.time() % 1 > 0.2:  # both writers start in the same second without the fix
        time.sleep(0.05)
    first = RunLog(tmp_path, start_step=0, start_epoch=0)
    for step in (4, 8):  # epoch 2 is logged, then the run dies before its checkpoint
        first.epoch(step, {"epoch": step // 4, "val/acc": step / 100})
    first.close()
    resumed = RunLog(tmp_path, start_step=4, start_epoch=1)
    for step in (8, 12):
        resumed.epoch(step, {"epoch": step // 4, "val/acc": step / 10})
    resumed.close()

    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    assert [(e.step, round(e.value, 2)) for e in acc.Scalars("val/acc")] == [
        (4, 0.04), (8, 0.8), (12, 1.2)]
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 3


def test_resume_after_a_torn_metrics_line(tiny_folder, tmp_path, monkeypatch):
    # A kill while metrics.jsonl's next line was being written (it is appended before last.pt)
    # left half a JSON record, and the resume then ended in a JSONDecodeError traceback.
    import json

    import cnn_bench.train as train_mod
    from conftest import compose_config, interrupt_after_first_epoch, tiny_overrides

    overrides = tiny_overrides(tiny_folder, tmp_path, "trainer.epochs=2",
                               "trainer.limit_train_batches=2")
    interrupt_after_first_epoch(monkeypatch, lambda: train_mod.run(compose_config(overrides)))
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write('{"epoch": 2, "step": 4, "train/lo')
    summary = train_mod.run(compose_config([*overrides, "trainer.resume=auto"]))
    records = [json.loads(ln) for ln in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2] and summary["epochs"] == 2
    assert records[-1]["val/acc"] == summary["final_val_acc"]
