"""The trainer's speed options switch on and off on CPU without changing results beyond tolerance.

Each option is run through ``cnn_bench.train.run`` on the tiny generated folder (speednet_s at
16 px, batch 16, 2 epochs of 3 steps) and compared with the same run with the option off.
A spy around ``train_one_epoch`` checks that the option really took effect (memory format,
autocast dtype, compiled forward), counts host syncs in the step loop and compilations inside
the epochs (none: the compile warm-up does them before epoch 1).
"""

from __future__ import annotations

import json
import os
import shutil
import sysconfig
import math
import warnings
from pathlib import Path

import pytest
import torch
from torch._dynamo.utils import counters

import cnn_bench.train as train_mod
from cnn_bench import loop
from cnn_bench.checkpoint import load_checkpoint
from conftest import compose_config, tiny_overrides

# one_thread: on a busy 2-core machine a second OpenMP thread waiting for a descheduled peer
# makes each op of these tiny models ~10 ms slower (seconds per test)
pytestmark = pytest.mark.usefixtures("one_thread")

SHORT = ["trainer.epochs=2", "trainer.limit_train_batches=3", "trainer.save_last=false"]


class Spy:
    """Wraps ``train_one_epoch`` as the trainer calls it: records what the first batch and the
    model look like, the autocast dtype in effect, and host syncs (``item``/``tolist``/``cpu``)."""

    def __init__(self, monkeypatch, count_syncs: bool = False):
        self.syncs = 0
        self.compiles: list[dict] = []  # per epoch: dynamo/AOT/inductor counters that moved
        self.first: dict = {}
        self._counting = False
        if count_syncs:  # not with compile: dynamo would trace the patched methods
            for name in ("item", "tolist", "cpu"):
                orig = getattr(torch.Tensor, name)
                monkeypatch.setattr(torch.Tensor, name, self._counter(orig))
        real = loop.train_one_epoch
        monkeypatch.setattr(train_mod, "train_one_epoch", self._wrap(real))

    def _counter(self, orig):
        def counted(t, *args, **kwargs):
            if self._counting:
                self.syncs += 1
            return orig(t, *args, **kwargs)
        return counted

    def _wrap(self, real):
        def wrapped(step_model, loader, criterion, optimizer, scheduler, scaler, rt, state, **kw):
            if not self.first:
                model = step_model.eager
                x, _ = next(iter(loader))  # loaders draw from their own generators: no side effects
                conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
                was_training = model.training
                model.eval()  # eval + no_grad: BN running stats stay untouched
                with torch.no_grad(), rt.autocast():
                    dtype = model(x).dtype
                model.train(was_training)
                self.first = {
                    "x_channels_last": x.is_contiguous(memory_format=torch.channels_last)
                    and not x.is_contiguous(),
                    "w_channels_last": conv.weight.is_contiguous(memory_format=torch.channels_last)
                    and not conv.weight.is_contiguous(),
                    "autocast_dtype": dtype, "compiled": step_model.fn is not step_model.eager,
                }
            self._counting = True
            before = _compile_counters()
            try:
                return real(step_model, loader, criterion, optimizer, scheduler, scaler, rt,
                            state, **kw)
            finally:
                self._counting = False
                after = _compile_counters()
                self.compiles.append({k: v - before.get(k, 0) for k, v in after.items()
                                      if v != before.get(k, 0)})
        return wrapped


def _compile_counters() -> dict:
    """Counts of frames traced, joint graphs built and inductor graphs compiled or cache-loaded."""
    return {f"{group}.{key}": n for group in ("frames", "aot_autograd", "inductor")
            for key, n in counters[group].items() if group != "inductor" or "fxgraph" in key}


def _run(tiny_folder, tmp_path, name: str, *extra: str) -> dict:
    cfg = compose_config(tiny_overrides(tiny_folder, tmp_path / name, *SHORT, *extra))
    return train_mod.run(cfg)


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


@pytest.fixture
def reference(tiny_folder, tmp_path):
    """The run with every option off (CPU defaults: fp32, NCHW, eager, foreach SGD); function
    scope so its data cache lands in the test's cache dir (it takes ~0.3 s)."""
    return _run(tiny_folder, tmp_path, "ref", "trainer.channels_last=false",
                "trainer.precision=fp32")


def test_reference_learns(reference):
    assert reference["channels_last"] is False and reference["precision"] == "fp32"
    assert reference["final_train_loss"] < math.log(3)  # 3 classes: below chance after 6 steps


def test_channels_last_on_off_same_loss(tiny_folder, tmp_path, monkeypatch, reference):
    spy = Spy(monkeypatch)
    s = _run(tiny_folder, tmp_path, "cl", "trainer.channels_last=true")
    assert s["channels_last"] is True
    assert spy.first["x_channels_last"] and spy.first["w_channels_last"]
    for key in ("final_train_loss", "final_val_loss"):
        assert _rel(s[key], reference[key]) < 1e-4, key


def test_bf16_autocast_on_cpu_close_and_finite(tiny_folder, tmp_path, monkeypatch, reference):
    spy = Spy(monkeypatch)
    s = _run(tiny_folder, tmp_path, "bf16", "trainer.precision=bf16")
    assert s["precision"] == "bf16" and spy.first["autocast_dtype"] == torch.bfloat16
    for key in ("final_train_loss", "final_val_loss"):
        assert math.isfinite(s[key]), key
        assert _rel(s[key], reference[key]) < 3e-2, key  # bf16 keeps 8 mantissa bits


def test_compile_matches_or_falls_back_with_one_warning(tiny_folder, tmp_path, monkeypatch,
                                                        reference):
    """torch.compile on CPU needs a C++ compiler and Python's headers (a cold compile takes ~40 s
    on 2 cores); without them the trainer trains eagerly after one warning. With them, it must
    compile: a fallback there would hide a broken compile path."""
    spy = Spy(monkeypatch)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        s = _run(tiny_folder, tmp_path, "compiled", "trainer.compile=true")
    fallback = [w for w in caught if "torch.compile failed" in str(w.message)]
    assert s["compile"] is True and (spy.first["compiled"] or fallback)
    assert len(fallback) <= 1
    can_compile = (shutil.which(os.environ.get("CXX", "g++")) is not None and
                   Path(sysconfig.get_paths()["include"], "Python.h").is_file())
    if can_compile:
        assert spy.first["compiled"] and not fallback, [str(w.message) for w in fallback]
    # The warm-up is timed apart (even a failed attempt takes time); epochs exclude it.
    assert s["compile_s"] > 0 and reference["compile_s"] == 0.0
    lines = [json.loads(ln) for ln in (tmp_path / "compiled" / "metrics.jsonl").read_text().splitlines()]
    assert lines[0]["compile_s"] == s["compile_s"] and "compile_s" not in lines[1]
    if not fallback:
        # Forward and backward were compiled before epoch 1: nothing is traced inside an epoch.
        assert spy.compiles == [{}, {}]
        for key in ("final_train_loss", "final_val_loss"):
            assert _rel(s[key], reference[key]) < 1e-3, key
        assert s["best_epoch"] == reference["best_epoch"]
        a = load_checkpoint(tmp_path / "compiled" / "checkpoints/best.pt")["model"]
        b = load_checkpoint(tmp_path / "ref" / "checkpoints/best.pt")["model"]
        for k in b:
            torch.testing.assert_close(a[k], b[k], rtol=1e-3, atol=1e-4, msg=k)


def _records(run_dir) -> list[dict]:
    """metrics.jsonl without the timing keys (they differ between any two runs)."""
    lines = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in ln.items()
             if k not in ("epoch_time_s", "val_time_s", "train/images_per_s", "wall_time_s")}
            for ln in lines]


def test_compile_warmup_leaves_the_run_bitwise_unchanged(tiny_folder, tmp_path, monkeypatch,
                                                         reference):
    """compile=true with a stand-in for torch.compile (a plain wrapper: the warm-up runs, nothing
    is compiled) gives bit-for-bit the weights, BN statistics and metrics of compile=false."""
    calls = []

    def fake_compile(model, **kw):
        def compiled(x):
            calls.append(model.training)
            return model(x)
        return compiled

    monkeypatch.setattr(torch, "compile", fake_compile)
    s = _run(tiny_folder, tmp_path, "fake", "trainer.compile=true")
    assert s["compile_s"] > 0  # the warm-up ran ...
    assert calls[:2] == [True, False]  # ... a train forward, then an eval one, before any epoch
    a = load_checkpoint(tmp_path / "fake" / "checkpoints/best.pt")["model"]
    b = load_checkpoint(tmp_path / "ref" / "checkpoints/best.pt")["model"]
    assert a.keys() == b.keys()
    for k in b:
        assert torch.equal(a[k], b[k]), k
    rec_a, rec_b = _records(tmp_path / "fake"), _records(tmp_path / "ref")
    assert rec_a[0].pop("compile_s") > 0 and rec_b[0].pop("compile_s") == 0.0
    assert rec_a == rec_b
    assert s["test_acc"] == reference["test_acc"]


def test_compile_mode_is_validated_and_recorded(tiny_folder, tmp_path, monkeypatch):
    from cnn_bench.config import validate
    from cnn_bench.errors import CnnBenchError
    with pytest.raises(CnnBenchError, match="trainer.compile_mode must be one of"):
        validate(compose_config(["trainer.compile_mode=fast"]))
    seen = []
    monkeypatch.setattr(torch, "compile", lambda m, **kw: seen.append(kw) or m)
    cfg = compose_config(tiny_overrides(tiny_folder, tmp_path / "run") + [
        "trainer.epochs=1", "trainer.limit_train_batches=1", "trainer.compile=true",
        "trainer.compile_mode=reduce-overhead"])
    s = train_mod.run(cfg)
    assert seen and all(kw == {"mode": "reduce-overhead", "dynamic": False} for kw in seen)
    assert s["compile_mode"] == "reduce-overhead"


def test_no_host_sync_per_step(tiny_folder, tmp_path, monkeypatch):
    """Syncs happen at log intervals and at the epoch's end, never per step: with a log interval
    longer than the epoch, 1 step and 4 steps cost the same number of syncs."""
    spy = Spy(monkeypatch, count_syncs=True)
    counts = {}
    for steps, every in ((1, 1000), (4, 1000), (4, 2)):
        spy.syncs = 0
        _run(tiny_folder, tmp_path, f"sync{steps}-{every}", "trainer.epochs=1",
             f"trainer.limit_train_batches={steps}", f"trainer.log_every_n_steps={every}")
        counts[(steps, every)] = spy.syncs
    assert counts[(1, 1000)] == counts[(4, 1000)] > 0
    assert counts[(4, 2)] > counts[(4, 1000)]  # one more flush: syncs follow log_every_n_steps
