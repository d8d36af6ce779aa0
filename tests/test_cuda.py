"""The CUDA paths end to end on a real GPU: skipped without one (CI has none).

The tiny generated folder trains through ``cnn_bench.train.run`` on the GPU with the ``auto``
rules (bf16 autocast, channels_last, GPU-resident data), with fp16 + GradScaler, compiled (and
with CUDA graphs), resumed; ``evaluate.py`` reads the result; and the step loop is checked for
host syncs with torch's own sync debug mode. ``benchmarks/gpu_checks.py`` runs this file first.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch

import cnn_bench.train as train_mod
from cnn_bench import evaluate as evaluate_mod
from cnn_bench.checkpoint import load_checkpoint
from cnn_bench.runtime import cuda_has_bf16
from conftest import compose_config, interrupt_after_first_epoch, tiny_overrides

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

SHORT = ["trainer.device=cuda", "trainer.epochs=2", "trainer.limit_train_batches=3"]


def _run(tiny_folder, out, *extra: str) -> dict:
    return train_mod.run(compose_config(tiny_overrides(tiny_folder, out, *SHORT, *extra)))


def _fallbacks(caught) -> list[str]:
    return [str(w.message) for w in caught if "torch.compile failed" in str(w.message)]


def test_auto_rules_on_cuda(tiny_folder, tmp_path):
    s = _run(tiny_folder, tmp_path / "auto")
    assert s["device"].startswith("cuda") and s["in_memory"] is True
    assert s["precision"] == ("bf16" if cuda_has_bf16(torch.device("cuda")) else "fp16")
    assert s["channels_last"] is True
    assert math.isfinite(s["final_train_loss"]) and 0 <= s["test_acc"] <= 1
    res = evaluate_mod.run(compose_config(
        [f"ckpt={tmp_path / 'auto'}/checkpoints/best.pt", "device=cuda", "progress=false"],
        config_name="evaluate"))
    assert res["images"] == 3 * 8 and 0 <= res["acc"] <= 1


def test_fp16_trains_through_the_grad_scaler(tiny_folder, tmp_path):
    s = _run(tiny_folder, tmp_path / "fp16", "trainer.precision=fp16")
    assert s["precision"] == "fp16" and math.isfinite(s["final_train_loss"])
    scaler = load_checkpoint(tmp_path / "fp16" / "checkpoints/last.pt")["scaler"]
    assert scaler and scaler["scale"] > 0  # an enabled scaler's state (a disabled one is empty)


@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_compiled_run_matches_eager(tiny_folder, tmp_path, mode):
    # fp32 so the comparison is about compilation, not bf16 rounding; flip TTA calls the
    # compiled model twice before reading (CUDA graphs reuse their output buffers).
    common = ["trainer.precision=fp32", "trainer.tta=flip"]
    eager = _run(tiny_folder, tmp_path / "eager", *common)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compiled = _run(tiny_folder, tmp_path / mode, *common, "trainer.compile=true",
                        f"trainer.compile_mode={mode}")
    assert _fallbacks(caught) == []
    assert compiled["compile_s"] > 0
    for key in ("final_train_loss", "final_val_loss"):
        assert compiled[key] == pytest.approx(eager[key], rel=1e-2), key


def test_resume_on_cuda_matches_uninterrupted_run(tiny_folder, tmp_path, monkeypatch):
    extra = ["trainer.epochs=3", "augmentation=basic", "trainer.precision=fp32",
             "trainer.deterministic=true"]
    _run(tiny_folder, tmp_path / "full", *extra)
    interrupt_after_first_epoch(monkeypatch, lambda: _run(tiny_folder, tmp_path / "part", *extra))
    s = _run(tiny_folder, tmp_path / "part", *extra, "trainer.resume=auto")
    assert s["epochs"] == 3
    a = load_checkpoint(tmp_path / "full" / "checkpoints/last.pt")["model"]
    b = load_checkpoint(tmp_path / "part" / "checkpoints/last.pt")["model"]
    for k in a:  # atomics in some CUDA backward kernels may differ in the last bits
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)


def test_no_host_sync_per_training_step_on_cuda(tiny_folder, tmp_path):
    """With a log interval longer than the epoch, 1 and 4 training steps cost the same number
    of host syncs over a whole run (data on the GPU, augmentation, optimizer, scheduler)."""
    counts = []
    for steps in (1, 4):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                _run(tiny_folder, tmp_path / f"sync{steps}", "trainer.epochs=1",
                     f"trainer.limit_train_batches={steps}", "trainer.log_every_n_steps=1000",
                     "augmentation=basic")
            finally:
                torch.cuda.set_sync_debug_mode("default")
        counts.append(sum("synchroniz" in str(w.message) for w in caught))
    assert counts[0] == counts[1], counts


def test_streaming_matches_memory_on_cuda(tiny_folder, tmp_path):
    # The DataLoader path (pinned memory, non-blocking copies, decode workers) with the
    # speedrun's augmentation on the GPU: the same batches as GPU-resident data, so the same run.
    common = ["trainer.precision=fp32", "trainer.deterministic=true", "augmentation=basic",
              "augmentation.padding_mode=reflect", "augmentation.hflip_alternate=true"]
    mem = _run(tiny_folder, tmp_path / "mem", *common, "dataset.in_memory=true")
    stream = _run(tiny_folder, tmp_path / "stream", *common, "dataset.in_memory=false",
                  "dataset.num_workers=2")
    assert mem["in_memory"] is True and stream["in_memory"] is False
    for key in ("final_train_loss", "final_val_loss"):
        assert stream[key] == pytest.approx(mem[key], rel=1e-4), key
