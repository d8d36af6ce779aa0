"""The trainer's speed options switch on and off on CPU without changing results beyond tolerance.

Each option is run through ``cnn_bench.train.run`` on the tiny generated folder (speednet_s at
16 px, batch 16, 2 epochs of 3 steps) and compared with the same run with the option off.
A spy around ``train_one_epoch`` checks that the option really took effect (memory format,
autocast dtype, compiled forward), counts host syncs in the step loop and compilations inside
the epochs (none: the compile warm-up does them before epoch 1).
"""

from __future__ import annotations

import json
import math
import warnings

import pytest
import torch
from torch import nn
from torch._dynamo.utils import counters

import cnn_bench.train as train_mod
from cnn_bench import loop
from cnn_bench.checkpoint import load_checkpoint
from cnn_bench.loop import StepModel, compile_warmup
from cnn_bench.models.build import build_model
from cnn_bench.optim import build_optimizer
from cnn_bench.runtime import Runtime
from conftest import compose_config, tiny_overrides

SHORT = ["trainer.epochs=2", "trainer.limit_train_batches=3", "trainer.save_last=false"]


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread: these models are tiny, and on a busy 2-core machine a second OpenMP
    thread waiting for a descheduled peer makes each op ~10 ms slower (seconds per test)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


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
    """torch.compile on CPU needs a C++ compiler (a cold compile takes ~40 s on 2 cores); if it
    fails, the trainer trains eagerly after one warning - either outcome is correct."""
    spy = Spy(monkeypatch)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        s = _run(tiny_folder, tmp_path, "compiled", "trainer.compile=true")
    fallback = [w for w in caught if "torch.compile failed" in str(w.message)]
    assert s["compile"] is True and (spy.first["compiled"] or fallback)
    assert len(fallback) <= 1
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
             if k not in ("epoch_time_s", "val_time_s", "train/images_per_s")}
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


@pytest.mark.parametrize("mode, warned", [("reduce-overhead", True), ("default", False)])
def test_compile_warmup_warns_when_cuda_graphs_are_skipped(monkeypatch, mode, warned):
    # reduce-overhead's CUDA graphs can be skipped (mutated inputs, CPU tensors...) and inductor
    # says so only under TORCH_LOGS=cudagraphs: the run would be silently slower than chosen.
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
                       Runtime(torch.device("cpu"), "fp32", False))
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


def loop_tta_model() -> nn.Module:
    """Logits = per-channel means of the image's left column (flip-sensitive, 3 classes)."""
    class LeftColumn(nn.Module):
        def forward(self, x):
            return x[..., :1].mean(dim=(2, 3))
    return LeftColumn()


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


def _three_steps(model, opt, dev: torch.device) -> None:
    """Three optimizer steps on seeded random batches (8 images at 16 px) on ``dev``."""
    gen = torch.Generator(device=dev).manual_seed(1)
    for _ in range(3):
        x = torch.randn(8, 3, 16, 16, generator=gen, device=dev)
        y = torch.randint(0, 10, (8,), generator=gen, device=dev)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


@pytest.mark.parametrize("name", ["sgd", "adam", "adamw"])
def test_foreach_matches_for_loop_optimizer(name):
    """build_optimizer asks for foreach kernels on CPU; they give the for-loop's parameters."""
    cfg = compose_config([f"optimizer={name}", "model=speednet_s"])
    params = []
    for foreach in (True, False):
        torch.manual_seed(0)
        model = build_model(cfg.model, 10, 16)
        opt = build_optimizer(cfg.optimizer, model, torch.device("cpu"))
        assert all(g["foreach"] for g in opt.param_groups)
        for g in opt.param_groups:
            g["foreach"] = foreach
        _three_steps(model, opt, torch.device("cpu"))
        params.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*params):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_fused_sgd_survives_a_skipped_first_step():
    # fp16's GradScaler skips a step whose gradients overflowed, usual at the start. Fused SGD
    # (build_optimizer's choice on CUDA; torch has CPU kernels of it too) then stored momentum
    # it had never written (empty_like) and the next step added garbage to the weights.
    cfg = compose_config(["optimizer=sgd", "model=speednet_s"])
    x = torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    y = torch.arange(8) % 10
    results = []
    for fused in (True, False):
        torch.manual_seed(0)
        model = build_model(cfg.model, 10, 16)
        start = [p.detach().clone() for p in model.parameters()]
        # device "cuda" makes build_optimizer choose fused kernels, "cpu" foreach ones
        opt = build_optimizer(cfg.optimizer, model, torch.device("cuda" if fused else "cpu"))
        assert all(bool(g["fused"]) == fused for g in opt.param_groups)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
        for step in range(3):
            opt.zero_grad(set_to_none=True)
            loss = nn.functional.cross_entropy(model(x), y)
            # step 0 overflows: the scaler must skip it, as it does for an fp16 inf
            scaler.scale(loss * (math.inf if step == 0 else 1.0)).backward()
            scaler.step(opt)
            scaler.update()
            if step == 0:
                for a, b in zip(start, model.parameters()):
                    assert torch.equal(a, b.detach()), "a skipped step moved the weights"
        results.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*results):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="fused optimizers are CUDA kernels")
def test_fused_matches_for_loop_on_cuda():
    cfg = compose_config(["optimizer=sgd", "model=speednet_s"])
    dev = torch.device("cuda")
    params = []
    for fused in (True, False):
        torch.manual_seed(0)
        model = build_model(cfg.model, 10, 16).to(dev)
        opt = build_optimizer(cfg.optimizer, model, dev)
        assert all(g["fused"] for g in opt.param_groups)
        for g in opt.param_groups:
            g["fused"], g["foreach"] = fused, False
        _three_steps(model, opt, dev)
        params.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*params):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def _eval_setup(dev: torch.device, batches: int, num_classes: int = 5):
    """A seeded linear model and ``batches`` random batches of 8 images (4 px), on ``dev``."""
    gen = torch.Generator().manual_seed(0)
    data = [(torch.randn(8, 3, 4, 4, generator=gen).to(dev),
             torch.randint(0, num_classes, (8,), generator=gen).to(dev)) for _ in range(batches)]
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(48, num_classes)).to(dev)
    return model, data, Runtime(dev, "fp32", channels_last=False)


def test_evaluate_confusion_counts_every_prediction():
    model, data, rt = _eval_setup(torch.device("cpu"), batches=4)
    m = loop.evaluate(model, data, torch.nn.CrossEntropyLoss(), rt, 5)
    want = torch.zeros(5, 5, dtype=torch.long)
    with torch.no_grad():
        for x, y in data:
            for t, p in zip(y.tolist(), model(x).argmax(1).tolist()):
                want[t, p] += 1
    assert torch.equal(m["confusion"], want) and m["images"] == 32
    assert m["acc"] == pytest.approx(want.diag().sum().item() / 32)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="host syncs are a CUDA matter")
def test_evaluate_syncs_once_per_pass_on_cuda():
    """1 batch and 6 batches cost the same number of host syncs (torch's sync debug mode)."""
    counts = []
    for batches in (1, 6):
        model, data, rt = _eval_setup(torch.device("cuda"), batches)
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                loop.evaluate(model, data, torch.nn.CrossEntropyLoss(), rt, 5)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        counts.append(sum("synchroniz" in str(w.message) for w in caught))
    assert counts[0] == counts[1]
