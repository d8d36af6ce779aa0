"""``StepModel`` and the compile warm-up, with stand-ins for ``torch.compile``.

The warm-up compiles before epoch 1 (a train forward + backward, eval forwards at every eval
shape) and puts back what it touched (BN statistics, RNG, gradients); the compile mode reaches
``torch.compile``; CUDA-graph outputs are copied before the next call reuses their buffers; a
skipped CUDA graph is reported; out of memory is not mistaken for a compile failure. The real
compiler runs in ``test_trainer_options.py`` (CPU) and ``test_cuda.py`` (GPU).
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch._dynamo.utils import counters

from cnn_bench import loop
from cnn_bench.loop import StepModel, compile_warmup
from cnn_bench.runtime import Runtime

pytestmark = pytest.mark.usefixtures("one_thread")


class _DropoutNet(nn.Module):
    """Conv + BN + dropout + linear: a train-mode forward moves BN statistics and draws from the
    global RNG, so a warm-up that did not restore them would show."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.5),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))

    def forward(self, x):
        return self.body(x)


@pytest.mark.parametrize("tta", ["none", "flip"])
def test_compile_warmup_restores_buffers_rng_and_grads(monkeypatch, tta):
    torch.manual_seed(0)
    model = _DropoutNet()
    seen = []

    def fake_compile(m, **kw):
        def compiled(x):
            seen.append((m.training, torch.is_grad_enabled(), x.shape[0]))
            return m(x)
        return compiled

    monkeypatch.setattr(torch, "compile", fake_compile)
    step = StepModel(model, compile=True)
    backward = []
    model.body[0].weight.register_hook(lambda g: backward.append(g.abs().sum() > 0))
    gen = torch.Generator().manual_seed(1)
    train = [(torch.randn(8, 3, 12, 12, generator=gen), torch.randint(0, 3, (8,), generator=gen))]
    val = [(torch.randn(16, 3, 12, 12, generator=gen), torch.randint(0, 3, (16,), generator=gen))]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    seconds = compile_warmup(step, train, step, val, nn.CrossEntropyLoss(),
                             Runtime(torch.device("cpu"), "fp32", False), tta=tta)
    assert seconds > 0
    evals = [(False, False, 16)] * (2 if tta == "flip" else 1)
    assert seen == [(True, True, 8), *evals]  # train fwd at the train batch, eval at the eval batch
    assert backward == [True]  # the backward ran (it compiles lazily)
    assert all(p.grad is None for p in model.parameters())
    assert torch.equal(torch.get_rng_state(), rng)  # dropout's draws undone
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k  # running stats and num_batches_tracked restored
    assert state["body.1.num_batches_tracked"] == 0


@pytest.mark.parametrize("mode, device, warned", [("reduce-overhead", "cuda", True),
                                                  ("default", "cuda", False),
                                                  ("reduce-overhead", "cpu", False)])
def test_compile_warmup_warns_when_cuda_graphs_are_skipped(monkeypatch, mode, device, warned):
    # reduce-overhead's CUDA graphs can be skipped (mutated inputs, CPU tensors...) and inductor
    # says so only under TORCH_LOGS=cudagraphs: the run would be silently slower than chosen.
    # On the CPU inductor counts every graph as skipped: there the warning was always false.
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)  # "cuda" is pretend here
    def fake_compile(m, **kw):
        def compiled(x):
            counters["inductor"]["cudagraph_skips"] += 1   # as inductor counts a skipped graph
            return m(x)
        return compiled

    monkeypatch.setattr(torch, "compile", fake_compile)
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: None)
    step = StepModel(_DropoutNet(), compile=True, mode=mode)
    gen = torch.Generator().manual_seed(1)
    train = [(torch.randn(8, 3, 12, 12, generator=gen), torch.randint(0, 3, (8,), generator=gen))]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compile_warmup(step, train, None, None, nn.CrossEntropyLoss(),
                       Runtime(torch.device(device), "fp32", False))
    msgs = [str(w.message) for w in caught if "CUDA graphs skipped" in str(w.message)]
    assert msgs == (["CUDA graphs skipped for 1 compiled graph(s): compile_mode=reduce-overhead "
                     "runs those without them (TORCH_LOGS=cudagraphs says why)"] if warned else [])
    assert step.compiled


class _ListLoader(list):
    """Batches in a list, with the sizes a cnn_bench loader reports."""

    def __init__(self, batches, num_samples, batch_size):
        super().__init__(batches)
        self.num_samples, self.batch_size = num_samples, batch_size


@pytest.mark.parametrize("num_samples,limit,eval_shapes", [
    (20, None, [16, 4]),   # 16 + a partial batch of 4: both static shapes compiled up front
    (32, None, [16]),      # no partial batch
    (20, 1, [16]),         # limit_val_batches=1 never reaches the partial batch
])
def test_compile_warmup_compiles_the_partial_eval_batch(monkeypatch, num_samples, limit,
                                                        eval_shapes):
    seen = []

    def fake_compile(m, **kw):
        assert kw.get("dynamic") is False  # one static graph per shape
        def compiled(x):
            seen.append((m.training, x.shape[0]))
            return m(x)
        return compiled

    monkeypatch.setattr(torch, "compile", fake_compile)
    model = _DropoutNet()
    step = StepModel(model, compile=True)
    x = torch.randn(16, 3, 12, 12)
    train = [(x[:8], torch.zeros(8, dtype=torch.long))]
    n_batches = -(-num_samples // 16)
    val = _ListLoader([(x, torch.zeros(16, dtype=torch.long))] * n_batches, num_samples, 16)
    compile_warmup(step, train, step, val, nn.CrossEntropyLoss(),
                   Runtime(torch.device("cpu"), "fp32", False), eval_limit=limit)
    assert seen == [(True, 8)] + [(False, n) for n in eval_shapes]


def test_compile_warmup_is_free_when_not_compiled():
    model = _DropoutNet()
    step = StepModel(model, compile=False)
    loader = [(torch.zeros(2, 3, 12, 12), torch.zeros(2, dtype=torch.long))]
    assert compile_warmup(step, loader, step, loader, nn.CrossEntropyLoss(),
                          Runtime(torch.device("cpu"), "fp32", False)) == 0.0


@pytest.mark.parametrize("mode,graphs", [("default", False), ("reduce-overhead", True),
                                        ("max-autotune", True),
                                        ("max-autotune-no-cudagraphs", False)])
def test_compile_mode_reaches_torch_compile_and_cuda_graph_outputs_survive(monkeypatch, mode,
                                                                           graphs):
    """trainer.compile_mode goes to torch.compile (default = torch's own default, no mode); with
    CUDA-graph modes every call starts a cudagraph step and hands back a copy of the output, so
    flip TTA's first logits stay valid after the second call reuses the graph's buffers."""
    calls, marks = [], []
    buffer = torch.zeros(4, 3)

    def fake_compile(m, **kw):
        calls.append(kw)

        def replay(x):  # like a CUDA graph: one static output buffer, overwritten per call
            buffer.copy_(m(x))
            return buffer
        return replay

    monkeypatch.setattr(torch, "compile", fake_compile)
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: marks.append(1))
    step = StepModel(loop_tta_model(), compile=True, mode=mode)
    assert calls == [{"mode": None if mode == "default" else mode, "dynamic": False}]
    x = torch.arange(4 * 3 * 2 * 2, dtype=torch.float32).reshape(4, 3, 2, 2)
    got = loop.eval_logits(step, x, "flip")
    want = (loop_tta_model()(x) + loop_tta_model()(loop.hflip(x))) / 2
    assert len(marks) == (2 if graphs else 0)
    if graphs:
        assert torch.equal(got, want)
    else:  # without the copy the first pass's logits were overwritten by the second
        assert not torch.equal(got, want)
    with pytest.raises(ValueError, match="compile mode must be one of"):
        StepModel(loop_tta_model(), compile=True, mode="fast")


def test_out_of_memory_is_not_a_compile_failure(monkeypatch):
    # A batch too big for the GPU must surface as out-of-memory (a one-line error at the CLI),
    # not as "torch.compile failed, training eagerly" followed by the same OOM uncompiled.
    def fake_compile(m, **kw):
        def run(x):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB.")
        return run

    monkeypatch.setattr(torch, "compile", fake_compile)
    step = StepModel(loop_tta_model(), compile=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback warning
        with pytest.raises(torch.OutOfMemoryError):
            step(torch.zeros(4, 3, 2, 2))
    assert step.compiled



def loop_tta_model() -> nn.Module:
    """Logits = per-channel means of the image's left column (flip-sensitive, 3 classes)."""
    class LeftColumn(nn.Module):
        def forward(self, x):
            return x[..., :1].mean(dim=(2, 3))
    return LeftColumn()


def test_each_run_in_one_process_compiles_afresh(tiny_folder, tmp_path, monkeypatch):
    # Jobs of a sweep run one after another in one process (Hydra's basic launcher): their
    # graphs piled up in the same code objects' caches until dynamo's recompile limit, after
    # which a later job trained eagerly without a word. (The eager backend: dynamo's caching
    # without inductor's compile time; the limit lowered from 8 to reach it in two runs.)
    import cnn_bench.train as train_mod
    from conftest import compose_config, tiny_overrides

    real = torch.compile
    monkeypatch.setattr(torch, "compile", lambda m, **kw: real(m, backend="eager", dynamic=False))
    graphs = []
    # config.patch, not monkeypatch: monkeypatch's undo deleted the key from dynamo's config,
    # and every later torch.compile in the session failed ("recompile_limit does not exist")
    with torch._dynamo.config.patch(recompile_limit=3):
        for res in (16, 20):
            before = counters["stats"]["unique_graphs"]
            train_mod.run(compose_config(tiny_overrides(
                tiny_folder, tmp_path / str(res), "trainer.compile=true", "trainer.epochs=1",
                "trainer.limit_train_batches=1", f"dataset.resolution={res}")))
            graphs.append(counters["stats"]["unique_graphs"] - before)
    assert graphs[0] > 0 and graphs[1] == graphs[0]
