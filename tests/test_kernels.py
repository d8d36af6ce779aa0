"""The step's kernels agree with plain references: foreach and fused optimizers with the
for-loop ones (and fused SGD with a step the fp16 scaler skipped), the evaluation pass's
confusion matrix with per-image counting; on CUDA, evaluation syncs once per pass."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

from cnn_bench import loop
from cnn_bench.models.build import build_model
from cnn_bench.optim import build_optimizer
from cnn_bench.runtime import Runtime
from conftest import compose_config

pytestmark = pytest.mark.usefixtures("one_thread")


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


def _train_epoch(model, data, rt, lr: float, grad_clip=None, limit=None) -> dict:
    """One ``loop.train_one_epoch`` with plain SGD at a constant ``lr``."""
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    return loop.train_one_epoch(loop.StepModel(model, False), data, torch.nn.CrossEntropyLoss(),
                                opt, sched, scaler, rt, loop.TrainState(), limit=limit,
                                log_every=3, grad_clip=grad_clip, log_steps=lambda *a: None,
                                progress=False)


def test_train_epoch_counts_every_prediction_and_loss():
    # lr 0: the weights never move, so the epoch's accuracy and mean loss are evaluate()'s on
    # the same batches (a train/acc that counted nothing went unnoticed).
    model, data, rt = _eval_setup(torch.device("cpu"), batches=4)
    m = _train_epoch(model, data, rt, lr=0.0)
    ref = loop.evaluate(model, data, torch.nn.CrossEntropyLoss(), rt, 5)
    assert m["images"] == 32 and 0 < m["acc"] < 1
    assert m["acc"] == pytest.approx(ref["acc"]) and m["loss"] == pytest.approx(ref["loss"], rel=1e-5)


def test_grad_clip_bounds_the_step():
    # SGD without momentum moves the weights by lr x the (clipped) gradient: its norm is the clip.
    model, data, rt = _eval_setup(torch.device("cpu"), batches=1)
    before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    _train_epoch(model, data, rt, lr=1.0, grad_clip=1e-3)
    after = torch.cat([p.detach().flatten() for p in model.parameters()])
    assert (after - before).norm().item() == pytest.approx(1e-3, rel=1e-4)


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
