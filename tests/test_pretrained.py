"""Weight loading: ``model.weights=FILE``, ``model.pretrained=true`` offline, pretrained
normalisation, refused pickles, and head-only fine-tuning from a weights file."""

from __future__ import annotations

import logging
import pickle
from pathlib import Path
from urllib.parse import urlparse

import pytest
import torch
import torchvision
from omegaconf import OmegaConf
from safetensors.torch import save_file

import cnn_bench.train as train_mod
from cnn_bench import evaluate as evaluate_mod
from cnn_bench.checkpoint import FORMAT, load_checkpoint
from cnn_bench.errors import CnnBenchError
from cnn_bench.models import build_model
from cnn_bench.models.build import trained_model_config
from cnn_bench.models.pretrained import pretrained_normalization
from cnn_bench.models.weights import load_weights_file
from conftest import compose_config, tiny_overrides

IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
RESNET18_FILE = Path(urlparse(torchvision.models.ResNet18_Weights.DEFAULT.url).path).name
SPEEDNET = {"name": "speednet_s", "stem": "auto", "width_mult": 1.0}


def _perturbed(model: torch.nn.Module, seed: int = 1) -> torch.nn.Module:
    """Every float tensor moved off its initial value (1-D ones kept positive: BN variances)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in model.state_dict().values():
            if t.is_floating_point():
                t.add_(torch.randn(t.shape, generator=g) * 0.1)
                if t.dim() == 1:
                    t.abs_()
    return model.eval()


def _logits(model: torch.nn.Module, res: int = 16) -> torch.Tensor:
    x = torch.randn(4, 3, res, res, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model.eval()(x)


# --- model.weights=FILE -------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["pt", "safetensors", "ddp_compiled_pt", "checkpoint"])
def test_weights_file_gives_identical_logits(kind, tmp_path):
    source = _perturbed(build_model(SPEEDNET, 10, 16))
    state = {k: v.clone() for k, v in source.state_dict().items()}
    path = tmp_path / f"w.{'safetensors' if kind == 'safetensors' else 'pt'}"
    if kind == "safetensors":
        save_file(state, str(path))
    elif kind == "ddp_compiled_pt":  # DataParallel of a torch.compile'd model
        torch.save({f"module._orig_mod.{k}": v for k, v in state.items()}, path)
    elif kind == "checkpoint":
        torch.save({"format": FORMAT, "model": state, "config": "x", "state": {"epoch": 1}}, path)
    else:
        torch.save(state, path)
    loaded = build_model({**SPEEDNET, "weights": str(path)}, 10, 16)
    assert torch.equal(_logits(loaded), _logits(source))
    report = load_weights_file(build_model(SPEEDNET, 10, 16), path)
    assert report.loaded == len(state) and not report.missing and not report.unexpected
    assert not report.replaced


def test_wrong_sized_classifier_stays_fresh_and_is_reported(tmp_path, caplog):
    path = tmp_path / "imagenet_head.pt"
    torch.save(_perturbed(build_model(SPEEDNET, 1000, 16)).state_dict(), path)
    file = torch.load(path, weights_only=True)
    torch.manual_seed(0)
    fresh = build_model(SPEEDNET, 10, 16).state_dict()
    torch.manual_seed(0)
    with caplog.at_level(logging.INFO, logger="cnn_bench"):
        model = build_model({**SPEEDNET, "weights": str(path)}, 10, 16)
    msg = "classifier fc replaced: weights have 1000 classes, run has 10"
    assert msg in caplog.text
    state = model.state_dict()
    for k, v in state.items():
        expected = fresh[k] if k.startswith("fc.") else file[k]
        assert torch.equal(v, expected), k
    report = load_weights_file(build_model(SPEEDNET, 10, 16), path)
    assert report.replaced == [msg] and not report.missing and not report.unexpected


def test_missing_and_unexpected_names_are_reported(tmp_path, caplog):
    state = build_model(SPEEDNET, 10, 16).state_dict()
    dropped = next(k for k in state if k.endswith("running_var"))
    del state[dropped]
    state["extra.weight"] = torch.zeros(3)
    torch.save(state, tmp_path / "w.pt")
    with caplog.at_level(logging.INFO, logger="cnn_bench"):
        report = load_weights_file(build_model(SPEEDNET, 10, 16), tmp_path / "w.pt")
    assert report.missing == [dropped] and report.unexpected == ["extra.weight"]
    assert dropped in caplog.text and "extra.weight" in caplog.text


def test_other_shape_mismatch_is_a_one_line_error(tmp_path):
    torch.save(build_model({**SPEEDNET, "width_mult": 0.5}, 10, 16).state_dict(), tmp_path / "w.pt")
    with pytest.raises(CnnBenchError) as err:
        build_model({**SPEEDNET, "weights": str(tmp_path / "w.pt")}, 10, 16)
    text = str(err.value)
    assert "\n" not in text
    first_bad = next(k for k, v in build_model(SPEEDNET, 10, 16).state_dict().items() if v.dim())
    assert first_bad in text and "shape [8, 3, 3, 3]" in text and "[16, 3, 3, 3]" in text


def test_unrelated_file_and_missing_file_are_refused(tmp_path):
    torch.save({"a.weight": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(CnnBenchError, match="none of its 1 names match"):
        build_model({**SPEEDNET, "weights": str(tmp_path / "other.pt")}, 10, 16)
    with pytest.raises(CnnBenchError, match="model.weights: no file at"):
        build_model({**SPEEDNET, "weights": str(tmp_path / "absent.pt")}, 10, 16)


def test_backbone_file_loads_into_the_part_that_holds_it(tmp_path, caplog):
    # A torchvision RegNet file for regnet_bifpn: "none of its 428 names match" before, where
    # only model.pretrained=true knew about the backbone. prefix.
    torch.manual_seed(0)
    torch.save(torchvision.models.regnet_x_400mf().state_dict(), tmp_path / "regnet.pt")
    with caplog.at_level(logging.INFO, logger="cnn_bench"):
        model = build_model({"name": "regnet_bifpn", "backbone": "regnetx_400mf",
                             "weights": str(tmp_path / "regnet.pt")}, 10, 32)
    file = torch.load(tmp_path / "regnet.pt")
    mine = model.state_dict()
    loaded = [k for k in file if f"backbone.{k}" in mine]
    assert len(loaded) > 0.9 * len(file)
    for k in loaded:
        assert torch.equal(mine[f"backbone.{k}"], file[k]), k
    assert f"loaded {len(loaded)} tensors" in caplog.text
    assert "unexpected (ignored): backbone.fc.weight, backbone.fc.bias" in caplog.text


# --- malicious pickles ---------------------------------------------------------------------------

def _payload(path: str) -> None:
    Path(path).write_text("the pickle ran code")


class _Evil:
    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return _payload, (self.marker,)


def test_pickle_payload_is_refused_and_never_runs(tmp_path):
    # The payload is live: a plain unpickling runs it.
    probe = tmp_path / "probe"
    pickle.loads(pickle.dumps(_Evil(probe)))
    assert probe.exists()

    marker = tmp_path / "pwned"
    state = build_model(SPEEDNET, 10, 16).state_dict()
    path = tmp_path / "evil.pt"
    torch.save({"format": FORMAT, "model": state, "evil": _Evil(marker)}, path)
    with pytest.raises(CnnBenchError, match="refusing to load"):
        build_model({**SPEEDNET, "weights": str(path)}, 10, 16)
    with pytest.raises(CnnBenchError, match="refusing to load"):
        load_checkpoint(path)
    cfg = compose_config([f"ckpt={path}", "device=cpu", "progress=false"], config_name="evaluate")
    with pytest.raises(CnnBenchError, match="refusing to load"):
        evaluate_mod.run(cfg)
    assert not marker.exists()


# --- model.pretrained=true, offline ---------------------------------------------------------------

@pytest.fixture(scope="module")
def hub_with_resnet18(tmp_path_factory):
    """A TORCH_HOME whose hub cache holds a random torchvision resnet18 under the real file name."""
    home = tmp_path_factory.mktemp("torch_home")
    (home / "hub" / "checkpoints").mkdir(parents=True)
    torch.manual_seed(123)
    reference = torchvision.models.resnet18().eval()
    torch.save(reference.state_dict(), home / "hub" / "checkpoints" / RESNET18_FILE)
    return home, reference


def _offline(monkeypatch, home: Path) -> None:
    """Point the hub cache at ``home`` and make any download attempt fail the test."""
    def no_download(url, dst, *a, **k):
        raise AssertionError(f"tried to download {url}")

    monkeypatch.setenv("TORCH_HOME", str(home))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_download)


def test_pretrained_loads_the_cached_file_without_network(hub_with_resnet18, monkeypatch):
    home, reference = hub_with_resnet18
    _offline(monkeypatch, home)
    model = build_model({"name": "resnet18", "stem": "auto", "pretrained": True}, 1000, 224)
    assert torch.equal(_logits(model, 64), _logits(reference, 64))


def test_pretrained_with_other_classes_replaces_the_classifier(hub_with_resnet18, monkeypatch,
                                                               caplog):
    home, reference = hub_with_resnet18
    _offline(monkeypatch, home)
    with caplog.at_level(logging.INFO, logger="cnn_bench"):
        # stem auto at 32 px would be the cifar stem: pretrained forces torchvision's.
        model = build_model({"name": "resnet18", "stem": "auto", "pretrained": True}, 10, 32)
    assert "classifier fc replaced: weights have 1000 classes, run has 10" in caplog.text
    assert isinstance(model.maxpool, torch.nn.MaxPool2d)
    assert model.fc.out_features == 10
    ref = reference.state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in model.state_dict().items()
               if not k.startswith("fc."))
    # evaluate rebuilds the same architecture from the run's config, without loading weights.
    rebuilt = trained_model_config({"name": "resnet18", "stem": "auto", "pretrained": True}, 32)
    assert rebuilt["stem"] == "imagenet" and rebuilt["pretrained"] is False


def test_pretrained_torchvision_passthrough(hub_with_resnet18, monkeypatch):
    home, reference = hub_with_resnet18
    _offline(monkeypatch, home)
    model = build_model({"source": "torchvision", "name": "resnet18", "pretrained": True}, 1000, 64)
    assert torch.equal(_logits(model, 64), _logits(reference, 64))


def test_pretrained_without_the_file_names_file_and_folder(tmp_path, monkeypatch):
    _offline(monkeypatch, tmp_path)

    def offline(url, dst, *a, **k):
        raise OSError("no network")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(CnnBenchError) as err:
        build_model({"name": "resnet18", "stem": "auto", "pretrained": True}, 10, 32)
    text = str(err.value)
    assert "\n" not in text
    assert RESNET18_FILE in text and str(tmp_path / "hub" / "checkpoints") in text


@pytest.mark.parametrize("cfg, match", [
    ({"name": "speednet_s", "pretrained": True}, "speednet_s has no ImageNet weights.*resnet18"),
    ({"name": "mobilenet_v1", "pretrained": True}, "it works with alexnet"),
    ({"name": "resnet18", "width_mult": 0.5, "pretrained": True}, "width_mult=1.0"),
    ({"name": "regnet_bifpn", "backbone": "regnetx_200mf", "pretrained": True}, "regnetx_400mf"),
    ({"name": "resnet18", "pretrained": True, "pretrained_tag": "NOPE"}, "IMAGENET1K_V1"),
    ({"name": "resnet18", "pretrained": True, "weights": "w.pt"}, "not both"),
])
def test_pretrained_refusals_are_one_line(cfg, match):
    with pytest.raises(CnnBenchError, match=match) as err:
        build_model(cfg, 10, 32)
    assert "\n" not in str(err.value)


def test_pretrained_normalization_is_the_weights():
    assert pretrained_normalization({"name": "resnet18", "pretrained": True}) == (
        IMAGENET_MEAN, IMAGENET_STD)
    assert pretrained_normalization({"name": "resnet18", "pretrained": False}) is None


def test_pretrained_run_normalises_with_imagenet_stats(hub_with_resnet18, tiny_folder, tmp_path,
                                                       monkeypatch):
    home, _ = hub_with_resnet18
    _offline(monkeypatch, home)
    cfg = compose_config(tiny_overrides(
        tiny_folder, tmp_path, "model=resnet18", "model.pretrained=true", "dataset.resolution=32",
        "dataset.mean=[0.5,0.5,0.5]", "dataset.std=[0.25,0.25,0.25]", "trainer.epochs=1",
        "trainer.limit_train_batches=1"))
    summary = train_mod.run(cfg)
    ck = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    assert ck["mean"] == pytest.approx(IMAGENET_MEAN) and ck["std"] == pytest.approx(IMAGENET_STD)
    assert list(cfg.dataset.mean) == [0.5, 0.5, 0.5]  # the caller's config is untouched
    assert OmegaConf.create(ck["config"]).model.pretrained is True

    # evaluate.py rebuilds the ImageNet stem the run used at 32 px and its normalisation, and
    # needs no weight file to do so.
    from cnn_bench import evaluate as evaluate_mod

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_hub"))
    res = evaluate_mod.run(compose_config([f"ckpt={tmp_path}/checkpoints/last.pt", "split=val",
                                           "device=cpu", "progress=false"], "evaluate"))
    assert res["acc"] == pytest.approx(summary["final_val_acc"], abs=1e-9)


# --- fine-tuning the head of a weights file -----------------------------------------------------

def test_head_finetune_from_weights_file_trains_only_the_head(tiny_folder, tmp_path, monkeypatch,
                                                             caplog):
    path = tmp_path / "backbone.pt"
    torch.save(_perturbed(build_model(SPEEDNET, 10, 16)).state_dict(), path)
    cfg = compose_config(tiny_overrides(tiny_folder, tmp_path / "run", f"model.weights={path}",
                                        "finetune=head", "trainer.epochs=1"))
    initial = {}
    real = train_mod.build_model

    def capture(*a, **k):
        model = real(*a, **k)
        initial.update({n: v.detach().clone() for n, v in model.state_dict().items()})
        return model

    monkeypatch.setattr(train_mod, "build_model", capture)
    with caplog.at_level("WARNING", logger="cnn_bench"):
        train_mod.run(cfg)
    assert not [r for r in caplog.records if "random" in r.getMessage()]  # weights were loaded
    file = torch.load(path, weights_only=True)
    final = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["model"]
    head = {k for k in final if k.startswith("fc.")}
    assert final["fc.weight"].shape[0] == 3  # 10-class file, 3-class run: the head started fresh
    for k, v in final.items():
        if k not in head:
            assert torch.equal(v, file[k]), k  # frozen: bitwise, BN statistics included
    assert all(not torch.equal(final[k], initial[k]) for k in head)  # the head trained

    # A resume takes every weight from last.pt: the initial file may be gone by then (it was
    # read again, and the run ended in "model.weights: no file at ...").
    path.unlink()
    resumed = compose_config(tiny_overrides(tiny_folder, tmp_path / "run", f"model.weights={path}",
                                            "finetune=head", "trainer.epochs=2", "trainer.resume=auto"))
    assert train_mod.run(resumed)["epochs"] == 2
    final2 = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["model"]
    assert all(torch.equal(v, file[k]) for k, v in final2.items() if k not in head)
    assert not torch.equal(final2["fc.weight"], final["fc.weight"])
