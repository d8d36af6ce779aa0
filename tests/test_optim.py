"""Optimizer parameter groups: which tensors decay."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cnn_bench.models.external import PassthroughModel
from cnn_bench.optim import param_groups


class _TokenNet(nn.Module):
    """A timm-style model: a class token and position embedding it asks to keep undecayed."""

    def __init__(self):
        super().__init__()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, 8))
        self.pos_embed = nn.Parameter(torch.zeros(1, 5, 8))
        self.proj = nn.Linear(8, 8)
        self.head = nn.Linear(8, 10)

    def no_weight_decay(self):
        return {"cls_token", "pos_embed"}

    def forward(self, x):
        return self.head(self.proj(x + self.cls_token + self.pos_embed).mean(1))


def _decay_of(model, **kw):
    return {name: g["weight_decay"] for g in param_groups(model, 0.05, **kw)
            for name, p in model.named_parameters() for q in g["params"] if p is q}


@pytest.mark.parametrize("wrapped", [False, True])
def test_no_weight_decay_names_are_not_decayed(wrapped):
    # ndim > 1 was the whole rule: ViT's cls_token and pos_embed decayed, where timm's
    # train.py keeps what no_weight_decay() names out of decay.
    model = PassthroughModel(_TokenNet(), 10, "timm") if wrapped else _TokenNet()
    p = "model." if wrapped else ""
    decay = _decay_of(model)
    assert decay[f"{p}cls_token"] == decay[f"{p}pos_embed"] == 0.0
    assert decay[f"{p}proj.weight"] == decay[f"{p}head.weight"] == 0.05
    assert decay[f"{p}proj.bias"] == 0.0
    # airbench's decay-everything option still leaves them alone
    assert _decay_of(model, decay_norm_and_bias=True)[f"{p}cls_token"] == 0.0


def test_timm_vit_groups_match_timms_own():
    timm = pytest.importorskip("timm")
    from timm.optim import param_groups_weight_decay

    from cnn_bench.models import build_model

    model = build_model({"source": "timm", "name": "vit_tiny_patch16_224"}, 10, 32)
    inner = model.model
    ref = {id(p): g["weight_decay"] for g in param_groups_weight_decay(
        inner, 0.05, no_weight_decay_list=set(inner.no_weight_decay())) for p in g["params"]}
    ours = {id(p): g["weight_decay"] for g in param_groups(model, 0.05) for p in g["params"]}
    assert ours == ref and timm
