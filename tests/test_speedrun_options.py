"""The speedrun's airbench options: SpeedNet ``dirac=`` and ``bn_scale=``, the optimizer's
``norm_bias_lr_mult`` (BN shifts at a multiple of the lr, the logged lr left as scheduled) and
``model.bn_momentum`` (every model's BatchNorm running-stat momentum)."""

from __future__ import annotations

import json

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

import cnn_bench.train as train_mod
from cnn_bench.errors import CnnBenchError
from cnn_bench.models import get_model
from cnn_bench.models.build import build_model
from cnn_bench.optim import base_lr, build_optimizer, build_scheduler
from conftest import compose_config, tiny_overrides


def _blocks(model):
    return list(model.stages)


def test_dirac_convs_start_as_identities():
    x = torch.randn(2, 128, 9, 9)
    model = get_model("speednet_s", 10, dirac=True)
    for block in _blocks(model):
        for conv in (block.conv1, block.conv2):
            n = min(conv.in_channels, conv.out_channels)
            torch.testing.assert_close(conv(x[:, : conv.in_channels])[:, :n], x[:, :n])
    plain = get_model("speednet_s", 10)
    conv = _blocks(plain)[1].conv2
    assert not torch.allclose(conv(x[:, : conv.in_channels]), x[:, : conv.in_channels])


def _sgd_cfg(**kw):
    base = {"name": "sgd", "lr": 0.1, "momentum": 0.9, "nesterov": True, "weight_decay": 1e-3,
            "head_lr_mult": 1.0, "norm_bias_lr_mult": 1.0}
    return OmegaConf.create({**base, **kw})


def _lr_of(optimizer) -> dict[int, float]:
    return {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}


def test_norm_bias_lr_mult_scales_only_normalisation_shifts():
    model = get_model("speednet_s", 10, whiten=True)  # trainable BN scales, a conv bias, a head
    opt = build_optimizer(_sgd_cfg(norm_bias_lr_mult=64.0, head_lr_mult=2.0), model,
                          torch.device("cpu"))
    lrs = _lr_of(opt)
    for name, mod in model.named_modules():
        if isinstance(mod, nn.BatchNorm2d):
            assert lrs[id(mod.bias)] == pytest.approx(6.4), name
            assert lrs[id(mod.weight)] == pytest.approx(0.1), name
    assert lrs[id(model.stem[0].bias)] == pytest.approx(0.1)  # a conv bias, not a BN shift
    assert lrs[id(model.fc.weight)] == pytest.approx(0.2)
    assert base_lr(opt) == pytest.approx(0.1)
    decays = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    assert decays[id(model.stages[0].bn1.bias)] == 0.0
    assert decays[id(model.stages[0].conv1.weight)] == pytest.approx(1e-3)
    # The schedule moves every group together; base_lr reads it back without the multipliers.
    sched_cfg = OmegaConf.create({"name": "onecycle", "pct_start": 0.5, "div_factor": 5.0,
                                  "final_div_factor": 100.0})
    sched = build_scheduler(sched_cfg, opt, steps_per_epoch=4, epochs=1)
    opt.step()  # no gradients: changes nothing, keeps the step order LambdaLR expects
    sched.step()
    assert base_lr(opt) == pytest.approx(0.1 * (0.2 + 0.8 * 1 / 2))
    assert _lr_of(opt)[id(model.stages[0].bn1.bias)] == pytest.approx(64 * base_lr(opt))
    # A first group with multiplier 0 (the head's bias at head_lr_mult=0) does not hide it.
    opt = build_optimizer(_sgd_cfg(head_lr_mult=0.0), _BodyAndHead(), torch.device("cpu"))
    assert opt.param_groups[0]["lr"] == 0.0
    assert base_lr(opt) == pytest.approx(0.1)


def test_decay_norm_and_bias_decays_every_parameter_as_much_per_step():
    # airbench decays BN shifts and the stem's bias too (BN biases kept 100% of their value
    # here vs 2.6% there over a speedrun): per step, lr * decay equals the weights'.
    model = get_model("speednet_s", 10, whiten=True)
    opt = build_optimizer(_sgd_cfg(norm_bias_lr_mult=64.0, decay_norm_and_bias=True), model,
                          torch.device("cpu"))
    per_step = {id(p): g["lr"] * g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    weight = per_step[id(model.stages[0].conv1.weight)]
    assert weight == pytest.approx(0.1 * 1e-3)
    for p in (model.stages[0].bn1.bias, model.stem[0].bias):
        assert per_step[id(p)] == pytest.approx(weight)
    assert all(per_step[id(p)] > 0 for p in model.parameters() if p.requires_grad)


class _BodyAndHead(nn.Module):
    classifier_name = "fc"

    def __init__(self):
        super().__init__()
        self.body = nn.Linear(4, 4, bias=False)
        self.fc = nn.Linear(4, 2)


def test_frozen_bn_scales_stay_one_while_the_shifts_train():
    torch.manual_seed(0)
    model = get_model("speednet_s", 5, whiten=True, dirac=True, bn_scale=False)
    x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 5, (8,))
    model.init_from_data(x)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and all(not bn.weight.requires_grad for bn in bns)
    shifts = [bn.bias.detach().clone() for bn in bns]
    opt = build_optimizer(_sgd_cfg(norm_bias_lr_mult=64.0), model, torch.device("cpu"))
    for _ in range(3):
        opt.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        for name, p in model.named_parameters():
            if p.requires_grad:
                assert p.grad is not None and p.grad.abs().sum() > 0, name
        opt.step()
    assert torch.isfinite(loss)
    for bn, before in zip(bns, shifts):
        assert torch.equal(bn.weight, torch.ones_like(bn.weight)) and bn.weight.grad is None
        assert not torch.equal(bn.bias, before)


def test_trainer_logs_the_scheduled_lr_not_the_multiplied_one(tiny_folder, tmp_path):
    out = tmp_path / "run"
    cfg = compose_config(tiny_overrides(
        tiny_folder, out, "scheduler=none", "optimizer.lr=0.05",
        "optimizer.norm_bias_lr_mult=64", "model.bn_scale=false", "model.dirac=true",
        "trainer.epochs=1"))
    summary = train_mod.run(cfg)
    assert 0 <= summary["test_acc"] <= 1
    lines = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert [ln["lr"] for ln in lines] == [pytest.approx(0.05)]  # the BN shifts' group had 3.2
    ck = torch.load(out / "checkpoints/last.pt", weights_only=True)
    bn_scales = [v for k, v in ck["model"].items() if k.endswith("bn1.weight")]
    assert bn_scales and all(torch.equal(v, torch.ones_like(v)) for v in bn_scales)


@pytest.mark.parametrize("model", ["speednet_s", "resnet18", "mobilenet_v2", "regnet_bifpn"])
def test_bn_momentum_sets_every_batchnorm_and_changes_only_running_stats(model):
    cfg = OmegaConf.to_container(compose_config([f"model={model}"]).model)
    torch.manual_seed(0)
    plain = build_model(cfg, 10, 32)
    torch.manual_seed(0)
    fast = build_model({**cfg, "bn_momentum": 0.4}, 10, 32)
    bns = [m for m in fast.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and all(m.momentum == 0.4 for m in bns)
    assert all(m.momentum == 0.1 for m in plain.modules() if isinstance(m, nn.BatchNorm2d))
    x = torch.randn(4, 3, 32, 32)
    outs = []
    for m in (plain, fast):
        torch.manual_seed(1)  # the same dropout masks
        outs.append(m.train()(x))
    torch.testing.assert_close(outs[1], outs[0])  # the forward pass is the same
    bn_p, bn_f = next(m for m in plain.modules() if isinstance(m, nn.BatchNorm2d)), bns[0]
    # running mean starts at 0: one batch moves it by 0.4 instead of 0.1 of the batch mean
    torch.testing.assert_close(bn_f.running_mean, 4 * bn_p.running_mean)


def test_bn_momentum_override_and_bad_values(tiny_folder, tmp_path):
    cfg = compose_config(tiny_overrides(tiny_folder, tmp_path, "model.bn_momentum=0.4"))
    assert cfg.model.bn_momentum == 0.4
    with pytest.raises(CnnBenchError, match="bn_momentum"):
        build_model({**OmegaConf.to_container(cfg.model), "bn_momentum": 0.0}, 10, 16)
