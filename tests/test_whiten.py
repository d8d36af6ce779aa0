"""SpeedNet's whitening stem (``model.whiten=true``): the filters ``init_from_data`` computes
whiten 2x2 patches, stay frozen through training, and are set by the trainer only on a fresh
run (never over loaded weights)."""

from __future__ import annotations

import pytest
import torch

import cnn_bench.train as train_mod
from cnn_bench.checkpoint import load_checkpoint
from cnn_bench.models import get_model
from cnn_bench.models.speednet import WHITEN_EPS, WHITEN_WIDTH
from conftest import compose_config, tiny_overrides

HALF = WHITEN_WIDTH // 2


def _correlated_images(n: int = 64, res: int = 16) -> torch.Tensor:
    """Images whose neighbouring pixels and channels are strongly correlated (like photos)."""
    g = torch.Generator().manual_seed(0)
    base = torch.randn(n, 1, res, res, generator=g)
    smooth = torch.nn.functional.avg_pool2d(base, 3, 1, 1) * 3
    return smooth.expand(n, 3, res, res) + 0.5 * torch.randn(n, 3, res, res, generator=g)


def _patch_outputs(conv: torch.nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """The stem conv's responses without its bias, one row per patch position."""
    out = torch.nn.functional.conv2d(x, conv.weight, None, conv.stride)
    return out.permute(0, 2, 3, 1).reshape(-1, out.shape[1]).double()


def test_init_from_data_whitens_the_patches():
    x = _correlated_images()
    model = get_model("speednet_s", 10, whiten=True)
    conv = model.stem[0]
    raw = _patch_outputs(conv, x)  # default init: correlated responses
    model.init_from_data(x)
    out = _patch_outputs(conv, x)
    cov = out[:, :HALF].T @ out[:, :HALF] / len(out)
    # Unit variance (less the eps share of each eigenvalue), no correlation between filters.
    patches = _patches(x)
    eigenvalues = torch.linalg.eigvalsh(patches.T @ patches / len(patches)).flip(0)
    torch.testing.assert_close(cov.diagonal(), eigenvalues / (eigenvalues + WHITEN_EPS),
                               rtol=1e-4, atol=1e-4)
    off = cov - torch.diag(cov.diagonal())
    assert off.abs().max() < 1e-4
    raw_cov = raw.T @ raw / len(raw)
    assert (raw_cov - torch.diag(raw_cov.diagonal())).abs().max() > 1e-2  # it was not white before
    # The second half are the negatives: GELU keeps both signs of every direction.
    torch.testing.assert_close(out[:, HALF:], -out[:, :HALF])
    assert not conv.weight.requires_grad and conv.bias.requires_grad


def _patches(x: torch.Tensor) -> torch.Tensor:
    """The raw 2x2 patches as 12-vectors (what the whitening decorrelates)."""
    p = x.unfold(2, 2, 1).unfold(3, 2, 1).permute(0, 2, 3, 1, 4, 5)
    return p.reshape(-1, 12).double()


@pytest.mark.parametrize("res,stem", [(32, "cifar"), (16, "cifar"), (64, "imagenet")])
def test_whitened_speednet_trains_every_trainable_parameter(res, stem):
    model = get_model("speednet_s", 7, whiten=True, stem=stem)
    x = _correlated_images(4, res)
    model.init_from_data(x)
    logits = model(x)
    assert logits.shape == (4, 7) and torch.isfinite(logits).all()
    logits.logsumexp(1).sum().backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert name == "stem.0.weight" and p.grad is None


def test_without_whiten_init_from_data_changes_nothing():
    model = get_model("speednet_s", 10)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert not model.wants_data_init
    model.init_from_data(_correlated_images())
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def _stem(ck: dict, key: str = "model") -> torch.Tensor:
    return ck[key]["stem.0.weight"]


def test_trainer_whitens_a_fresh_run_and_keeps_loaded_weights(tiny_folder, tmp_path):
    out1 = tmp_path / "fresh"
    train_mod.run(compose_config(tiny_overrides(
        tiny_folder, out1, "model.whiten=true", "trainer.ema_decay=0.9")))
    ck = load_checkpoint(out1 / "checkpoints" / "last.pt")
    w = _stem(ck).flatten(1)[:HALF].double()
    gram = w @ w.T  # whitening filters are orthogonal: v_i / sqrt(l_i + eps)
    assert (gram - torch.diag(gram.diagonal())).abs().max() < 1e-3 * gram.diagonal().max()
    fresh = get_model("speednet_s", 3, whiten=True).stem[0].weight.flatten(1)[:HALF].double()
    fresh_gram = fresh @ fresh.T
    assert (fresh_gram - torch.diag(fresh_gram.diagonal())).abs().max() > 1e-2 * fresh_gram.diagonal().max()
    # Frozen: the EMA copy (taken before step 1) holds the same filters after training.
    assert torch.equal(_stem(ck), _stem(ck, "model_ema"))
    assert ck["model"]["stem.0.bias"].abs().sum() > 0  # the bias trained

    # model.weights=FILE: the loaded filters are kept, not recomputed from this run's batches.
    out2 = tmp_path / "loaded"
    train_mod.run(compose_config(tiny_overrides(
        tiny_folder, out2, "model.whiten=true", f"model.weights={out1 / 'checkpoints' / 'last.pt'}",
        "trainer.seed=5", "trainer.epochs=1")))
    ck2 = load_checkpoint(out2 / "checkpoints" / "last.pt")
    assert torch.equal(_stem(ck2), _stem(ck))
