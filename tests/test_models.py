"""The model zoo: every model trains at 32/64/224 px, matches torchvision where it claims to,
and hits the papers' sizes and costs (building from YAML and its errors: test_model_configs.py)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
import torchvision
from omegaconf import OmegaConf
from torch import nn

from cnn_bench.errors import CnnBenchError
from cnn_bench.models import build_model, count_flops, count_params, get_model, list_models
from cnn_bench.models.external import PASSTHROUGHS

ROOT = Path(__file__).resolve().parent.parent
CONF = ROOT / "conf" / "model"
HAS_TIMM = importlib.util.find_spec("timm") is not None
NUM_CLASSES = 10

# ours -> torchvision's name, for models whose state dicts must be interchangeable.
TORCHVISION_TWINS = {
    "alexnet": "alexnet", "resnet18": "resnet18", "resnet34": "resnet34", "resnet50": "resnet50",
    "resnet101": "resnet101", "resnet152": "resnet152", "mobilenet_v2": "mobilenet_v2",
    "regnetx_400mf": "regnet_x_400mf", "regnety_400mf": "regnet_y_400mf",
}


def _cfg(name: str) -> dict:
    """The model's YAML, as Hydra would hand it to build_model."""
    return OmegaConf.to_container(OmegaConf.load(CONF / f"{name}.yaml"))


def _zoo(pattern: str = "*") -> list[str]:
    return [n for n in list_models(pattern) if n not in PASSTHROUGHS]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# --- every model: forward + backward ------------------------------------------------------------

# The deep ResNets repeat resnet50's blocks: 32 and 64 px only, to keep the suite fast on CPU.
SLOW_AT_224 = {"resnet101", "resnet152"}
CASES = [(n, r) for n in list_models() for r in (32, 64, 224) if not (r == 224 and n in SLOW_AT_224)]


@pytest.mark.parametrize("name,resolution", CASES)
def test_forward_backward(name, resolution):
    if name == "timm" and not HAS_TIMM:
        pytest.skip("timm is not installed (its error path is tested below)")
    torch.manual_seed(0)
    model = build_model(_cfg(name), NUM_CLASSES, resolution)
    model.train()
    out = model(torch.randn(2, 3, resolution, resolution))
    assert out.shape == (2, NUM_CLASSES)
    assert torch.isfinite(out).all()
    out.square().mean().backward()
    for pname, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, f"{pname} got no gradient"
            assert torch.isfinite(p.grad).all(), f"{pname} has a non-finite gradient"
    # The output depends on the first layer and the classifier reads real features (a head that
    # multiplied them by 0 passed the checks above). Inner layers may have all-zero gradients at
    # init: a zero-initialised last BN of a residual branch (timm's zero_init_last) silences it.
    first = next(p for p in model.parameters() if p.requires_grad)
    head = model.get_submodule(model.classifier_name).weight
    assert first.grad.abs().sum() > 0 and head.grad.abs().sum() > 0
    assert not torch.allclose(out[0], out[1])  # the prediction depends on the image


@pytest.mark.parametrize("name", [n for n in _zoo() if n not in SLOW_AT_224])
@pytest.mark.parametrize("resolution", [33, 97])
def test_odd_resolutions(name, resolution):
    model = build_model(_cfg(name), NUM_CLASSES, resolution).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, resolution, resolution)).shape == (1, NUM_CLASSES)


@pytest.mark.parametrize("name", [n for n in list_models() if n != "timm" or HAS_TIMM])
def test_interface(name):
    model = build_model(_cfg(name), NUM_CLASSES, 64).eval()
    head = model.get_submodule(model.classifier_name)
    assert isinstance(head, nn.Linear) and head.out_features == NUM_CLASSES
    assert model.stage_names, "no stages"
    order = [n for n, _ in model.named_modules()]
    idx = [order.index(s) for s in model.stage_names]  # raises if a path does not exist
    assert idx == sorted(idx), "stages are not in input -> output order"
    assert not any(s == model.classifier_name or model.classifier_name.startswith(s + ".")
                   for s in model.stage_names), "the classifier is inside a stage"
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), model.forward_head(model.forward_features(x)))


# --- torchvision compatibility ------------------------------------------------------------------

@pytest.mark.parametrize("ours,theirs", list(TORCHVISION_TWINS.items()))
def test_param_count_matches_torchvision(ours, theirs):
    expected = count_params(torchvision.models.get_model(theirs, weights=None))
    assert count_params(get_model(ours, 1000, stem="imagenet", width_mult=1.0)) == expected


@pytest.mark.parametrize("ours", ["alexnet", "resnet18", "resnet50", "mobilenet_v2",
                                  "regnetx_400mf", "regnety_400mf"])
def test_torchvision_state_dict_loads_and_gives_equal_logits(ours):
    theirs = torchvision.models.get_model(TORCHVISION_TWINS[ours], weights=None).eval()
    model = get_model(ours, 1000, stem="imagenet").eval()
    model.load_state_dict(theirs.state_dict(), strict=True)
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        assert torch.equal(model(x), theirs(x))


# --- papers' sizes and costs ----------------------------------------------------------------------

def _macs(name: str, resolution: int = 224, **kw) -> float:
    return count_flops(get_model(name, 1000, stem="imagenet", **kw), resolution) / 2


def test_mobilenet_v2_matches_paper():
    assert _macs("mobilenet_v2") == pytest.approx(300e6, rel=0.05)


def test_mobilenet_v1_matches_paper():
    assert _macs("mobilenet_v1") == pytest.approx(569e6, rel=0.05)
    assert count_params(get_model("mobilenet_v1", 1000)) == pytest.approx(4.2e6, rel=0.05)


def test_regnetx_200mf_matches_paper():
    from cnn_bench.models.regnet import VARIANTS

    stages = VARIANTS["regnetx_200mf"].stages()
    assert [w for w, _, _ in stages] == [24, 56, 152, 368]
    assert [d for _, d, _ in stages] == [1, 1, 4, 7]
    assert count_params(get_model("regnetx_200mf", 1000)) == pytest.approx(2.7e6, rel=0.05)
    assert _macs("regnetx_200mf") == pytest.approx(200e6, rel=0.05)


@pytest.mark.parametrize("name", ["mobilenet_v1", "mobilenet_v2", "c_mobilenet_v2", "resnet18",
                                  "regnetx_200mf", "regnety_400mf", "alexnet"])
def test_cost_shrinks_with_width_mult(name):
    models = [get_model(name, 1000, stem="imagenet", width_mult=a) for a in (1.0, 0.75, 0.5, 0.35)]
    flops = [count_flops(m, 224) for m in models]
    params = [count_params(m) for m in models]
    assert flops == sorted(flops, reverse=True) and len(set(flops)) == 4, flops
    assert params == sorted(params, reverse=True) and len(set(params)) == 4, params


@pytest.mark.parametrize("name", ["mobilenet_v1", "mobilenet_v2", "resnet18", "regnety_400mf"])
def test_flops_shrink_with_resolution(name):
    model = get_model(name, 1000, stem="imagenet")
    flops = [count_flops(model, r) for r in (224, 192, 160, 128, 96)]
    assert flops == sorted(flops, reverse=True) and len(set(flops)) == 5, flops


def test_mobilenet_v2_last_conv_width():
    # The paper keeps 1280 for alpha < 1 and widens it for alpha > 1.
    assert get_model("mobilenet_v2", width_mult=0.5).num_features == 1280
    assert get_model("mobilenet_v2", width_mult=1.4).num_features == 1792
    assert get_model("mobilenet_v1", width_mult=0.5).num_features == 512


# --- family details ---------------------------------------------------------------------------------

def test_alexnet_v1_is_the_papers_network():
    model = get_model("alexnet_v1", 1000)
    convs = [m for m in model.features if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [96, 256, 384, 384, 256]
    assert sum(isinstance(m, nn.LocalResponseNorm) for m in model.features) == 2
    pools = [m for m in model.features if isinstance(m, nn.MaxPool2d)]
    assert len(pools) == 3 and all(p.kernel_size == 3 and p.stride == 2 for p in pools)
    drops = [m for m in model.classifier if isinstance(m, nn.Dropout)]
    assert len(drops) == 2 and all(d.p == 0.5 for d in drops)
    names = [n for n, _ in model.named_modules()]
    assert len(names) == len(set(names))
    # fc6 and fc7 are the last stages: unfreezing them all leaves only the stem (conv1) frozen.
    assert model.stage_names[-2:] == ["classifier.1", "classifier.4"]


def test_alexnet_imagenet_stem_too_small_is_a_clear_error():
    with pytest.raises(CnnBenchError, match="stem=cifar"):
        get_model("alexnet", 10, stem="imagenet")(torch.randn(1, 3, 32, 32))


@pytest.mark.parametrize("name", _zoo("resnet*"))
def test_resnet_projection_only_where_shape_changes(name):
    model = get_model(name, 10, stem="imagenet")
    for stage in model.stage_names:
        for i, block in enumerate(model.get_submodule(stage)):
            cin = block.conv1.in_channels
            cout = (block.bn3 if hasattr(block, "bn3") else block.bn2).num_features
            strided = block.conv1.stride != (1, 1) or block.conv2.stride != (1, 1)
            changes = strided or cin != cout
            assert (block.downsample is not None) == changes, f"{stage}.{i}"


def test_resnet_zero_init_residual():
    from cnn_bench.models.resnet import BasicBlock, Bottleneck

    for name, last in (("resnet18", "bn2"), ("resnet50", "bn3")):
        model = get_model(name, zero_init_residual=True)
        blocks = [m for m in model.modules() if isinstance(m, (BasicBlock, Bottleneck))]
        assert blocks and all(getattr(b, last).weight.abs().sum() == 0 for b in blocks)
        assert model.bn1.weight.abs().sum() > 0
    plain = get_model("resnet18")
    assert plain.layer1[0].bn2.weight.abs().sum() > 0


def test_mobilenet_v2_residual_only_when_shapes_match():
    model = get_model("mobilenet_v2")
    blocks = list(model.features)[1:-1]
    assert len(blocks) == 17
    for b in blocks:
        dw = [m for m in b.conv.modules() if isinstance(m, nn.Conv2d) and m.groups > 1][0]
        cin = b.conv[0][0].in_channels
        assert b.use_res_connect == (dw.stride == (1, 1) and cin == b.out_channels)
    assert sum(b.use_res_connect for b in blocks) == 10


def test_c_mobilenet_v2_has_a_residual_path_in_every_block():
    model = get_model("c_mobilenet_v2", 10, stem="cifar").eval()
    blocks = list(model.features)[1:-1]
    assert len(blocks) == 17
    x = torch.randn(2, 32, 16, 16)
    for i, block in enumerate(blocks):
        assert hasattr(block, "shortcut"), f"block {i} has no shortcut"
        if block.conv[0][0].in_channels != x.shape[1]:
            x = torch.randn(2, block.conv[0][0].in_channels, 16, 16)
        # Silence the main branch: what remains is the residual path alone.
        nn.init.zeros_(block.conv[-1].weight)
        nn.init.zeros_(block.conv[-1].bias)
        with torch.no_grad():
            out = block(x)
            torch.testing.assert_close(out, block.act(block.shortcut(x)))
        assert out.abs().sum() > 0, f"block {i}'s output does not depend on its shortcut"
        x = out


def test_bifpn_fusion_weights_learn_and_stay_non_negative():
    from cnn_bench.models.bifpn import FastNormalizedFusion

    model = get_model("regnet_bifpn", 10, stem="cifar", backbone="regnetx_200mf")
    fusions = [m for m in model.modules() if isinstance(m, FastNormalizedFusion)]
    assert len(fusions) == 3 * 8
    assert all(torch.equal(f.weight, torch.ones_like(f.weight)) for f in fusions)
    before = [f.weight.detach().clone() for f in fusions]
    opt = torch.optim.SGD(model.parameters(), lr=10.0)
    with torch.autograd.set_detect_anomaly(True):
        loss = nn.functional.cross_entropy(model(torch.randn(2, 3, 32, 32)), torch.tensor([1, 2]))
        loss.backward()
    opt.step()
    assert any(not torch.equal(b, f.weight) for b, f in zip(before, fusions))
    for f in fusions:
        w = f.fusion_weights()
        assert (w >= 0).all() and w.sum() <= 1
    with torch.no_grad():
        assert torch.isfinite(model(torch.randn(2, 3, 32, 32))).all()


@pytest.mark.parametrize("resolution", [32, 64, 65])
@pytest.mark.parametrize("stem", ["cifar", "imagenet"])
def test_bifpn_study_head(resolution, stem):
    model = get_model("regnet_bifpn", 10, stem=stem, head="study", backbone="regnetx_200mf")
    assert model.classifier_name == "head.mlp.3"
    assert model.stage_names[-3:] == ["neck", "head.conv", "head.mlp.0"]
    out = model(torch.randn(2, 3, resolution, resolution))
    assert out.shape == (2, 10)
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_bifpn_pyramid_levels():
    model = get_model("regnet_bifpn", 10, stem="imagenet", feature_size=32).eval()
    with torch.no_grad():
        feats = model.forward_features(torch.randn(1, 3, 224, 224))
    assert [tuple(f.shape[1:]) for f in feats] == [(32, 28, 28), (32, 14, 14), (32, 7, 7),
                                                    (32, 4, 4), (32, 2, 2)]
    assert model.stage_names[-1] == "neck"
