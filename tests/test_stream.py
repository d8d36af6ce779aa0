"""The streaming (DataLoader) path: results independent of how the data is read, and a data
worker's death as one line."""

from __future__ import annotations

import json
import os
import signal

import pytest
import torch.utils.data

import cnn_bench.train as train_mod
from cnn_bench import cli
from cnn_bench.data import memory, stream, workers
from conftest import compose_config, tiny_overrides


def _losses(out):
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [(r["train/loss"], r["val/loss"]) for r in map(json.loads, lines)]


def test_dropout_model_trains_alike_in_memory_and_streaming(tiny_folder, tmp_path):
    # Each DataLoader iterator drew its workers' base seed from the global RNG, which CPU
    # dropout uses too: the masks shifted with how the data was read (epoch 1 already differed
    # between in memory and 0 workers; 0 vs 2 workers and a resumed run differed later).
    extra = ["model=mobilenet_v2", "model.width_mult=0.35", "trainer.limit_train_batches=2"]
    runs = {"memory": ["dataset.in_memory=true"],
            "stream0": ["dataset.in_memory=false", "dataset.num_workers=0"],
            "stream2": ["dataset.in_memory=false", "dataset.num_workers=2"]}
    losses = {}
    for name, how in runs.items():
        train_mod.run(compose_config(tiny_overrides(tiny_folder, tmp_path / name, *extra, *how)))
        losses[name] = _losses(tmp_path / name)
    assert losses["memory"] == losses["stream0"] == losses["stream2"]


def test_a_killed_data_worker_is_one_line(tiny_folder, tmp_path, monkeypatch, capsys):
    # As the out-of-memory killer would: a 25-line traceback ending in "DataLoader worker
    # (pid N) is killed by signal: Killed.", raised wherever the main process was.
    real = stream._Decoded.__getitem__

    def dies_in_a_worker(self, i):
        if torch.utils.data.get_worker_info() is not None and i % 7 == 3:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(self, i)

    monkeypatch.setattr(stream._Decoded, "__getitem__", dies_in_a_worker)
    cfg = compose_config(tiny_overrides(tiny_folder, tmp_path / "run", "dataset.in_memory=false",
                                        "dataset.num_workers=2"))
    with pytest.raises(SystemExit) as e:
        cli.user_errors(lambda c: train_mod.run(c))(cfg)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "\n" not in err
    assert err.startswith("error: DataLoader worker (pid") and "out-of-memory killer" in err


def test_shared_memory_exhaustion_is_one_line():
    exc = RuntimeError("unable to allocate shared memory(shm) for file </torch_1_2>: No space "
                       "left on device (28)\nmore lines")
    why = workers.worker_failure(exc)
    assert why.startswith("the data-loading workers ran out of shared memory") and "\n" not in why
    assert workers.worker_failure(RuntimeError("size mismatch")) is None


_SIGINT_AT_FORK = []


def _sigint_in_parent_after_fork():
    if _SIGINT_AT_FORK:
        _SIGINT_AT_FORK.clear()
        os.kill(os.getpid(), signal.SIGINT)


os.register_at_fork(after_in_parent=_sigint_in_parent_after_fork)  # inert unless armed


def test_ctrl_c_while_workers_start_stops_the_run(tiny_folder, tmp_path):
    # A Ctrl-C landing while the workers were forked was raised inside an at-fork hook, where
    # Python prints "Exception ignored" and goes on: the run trained to the end and exited 0.
    cfg = compose_config(tiny_overrides(tiny_folder, tmp_path / "run", "dataset.in_memory=false",
                                        "dataset.num_workers=1"))
    real = torch.utils.data.DataLoader.__iter__

    def armed(self):
        _SIGINT_AT_FORK.append(True)  # the next fork (this loader's first worker) delivers it
        return real(self)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.utils.data.DataLoader, "__iter__", armed)
        with pytest.raises(KeyboardInterrupt):
            train_mod.run(cfg)
    assert not _SIGINT_AT_FORK


@pytest.mark.parametrize("which", ["decode", "validate"])
def test_ctrl_c_while_the_data_pass_starts_its_workers_stops_it(tiny_folder, tmp_path,
                                                                 monkeypatch, which):
    # The one-off decode (in memory) and validation (streaming) passes fork workers for large
    # datasets (>= 1,000 images; lowered here) and had the same window.
    monkeypatch.setattr(memory if which == "decode" else stream, "_MIN_PARALLEL", 1)
    cfg = compose_config(tiny_overrides(
        tiny_folder, tmp_path / "run", f"dataset.in_memory={which == 'decode'}",
        "dataset.num_workers=1", f"dataset.cache_dir={tmp_path / 'cache'}"))
    real = torch.utils.data.DataLoader.__iter__
    calls = []

    def armed_once(self):  # the data pass's loader, the first to start workers
        if not calls:
            _SIGINT_AT_FORK.append(True)
        calls.append(self)
        return real(self)

    monkeypatch.setattr(torch.utils.data.DataLoader, "__iter__", armed_once)
    with pytest.raises(KeyboardInterrupt):
        train_mod.run(cfg)
    assert not _SIGINT_AT_FORK and len(calls) == 1  # stopped in the data pass
