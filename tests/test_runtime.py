"""Runtime rules that only a GPU machine meets, checked on CPU with torch's CUDA queries
stubbed: the auto precision, the out-of-memory message, CUDA RNG states on fewer GPUs."""

from __future__ import annotations

import pytest
import torch

from conftest import compose_config


@pytest.mark.parametrize("native, expected", [(True, "bf16"), (False, "fp16")])
def test_auto_precision_needs_native_bf16(monkeypatch, native, expected):
    # torch.cuda.is_bf16_supported() defaults to counting emulated bf16 (V100, T4), where it is
    # far slower than fp16 + GradScaler; the auto rule must ask for native support.
    import contextlib

    from cnn_bench.runtime import resolve_runtime

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device", lambda d: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "is_bf16_supported",
                        lambda including_emulation=True: native or including_emulation)
    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    flags = {k: getattr(cudnn, k) for k in ("benchmark", "deterministic", "allow_tf32")}
    tf32 = matmul.allow_tf32
    try:
        rt = resolve_runtime(compose_config(["trainer.device=cuda"]).trainer)
    finally:  # resolve_runtime sets CUDA backend flags: leave them as they were
        for k, v in flags.items():
            setattr(cudnn, k, v)
        matmul.allow_tf32 = tf32
    assert rt.precision == expected and rt.use_scaler == (expected == "fp16")



def test_out_of_memory_ends_with_one_line(capsys):
    from cnn_bench import cli

    cfg = compose_config(["trainer.batch_size=512"])

    @cli.user_errors
    def task(cfg):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has "
                                     "a total capacity of 79.19 GiB of which 1.2 GiB is free.\n"
                                     "Of the allocated memory ...")

    with pytest.raises(SystemExit) as e:
        task(cfg)
    assert e.value.code == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("error: out of GPU memory (trainer.batch_size=512, ")
    assert "lower the batch size" in line and line.endswith("Tried to allocate 2.00 GiB")


def test_cuda_rng_states_restore_on_fewer_gpus(monkeypatch):
    # A checkpoint from a 2-GPU machine resumed on a 1-GPU one: set_rng_state_all raised
    # IndexError; each state this machine has a GPU for is restored.
    from cnn_bench import runtime

    state = {**runtime.rng_state(), "cuda": [torch.ones(3, dtype=torch.uint8),
                                             torch.zeros(3, dtype=torch.uint8)]}
    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s, i: restored.append((s, i)))
    runtime.set_rng_state(state)
    assert len(restored) == 1 and restored[0][1] == 0 and torch.equal(restored[0][0], state["cuda"][0])
