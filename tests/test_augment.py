"""Batch augmentation on uint8 tensors: each config keeps shape and dtype, ``none`` only
normalises, crops are windows of the (zero- or reflect-) padded image with per-sample offsets,
colour jitter and affine draw per sample, unknown options are refused with a suggestion."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from cnn_bench.data import BatchAugment
from cnn_bench.errors import CnnBenchError

REPO = Path(__file__).resolve().parents[1]
MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def _u8(b=6, r=16, seed=0):
    return torch.randint(0, 256, (b, 3, r, r), dtype=torch.uint8,
                         generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", ["none", "basic", "seed"])
def test_augment_configs_keep_shape_and_dtype(name):
    conf = OmegaConf.load(REPO / f"conf/augmentation/{name}.yaml")
    assert conf.name == name and conf.label_smoothing == 0.0
    aug = BatchAugment.from_config(OmegaConf.to_container(conf), MEAN, STD, 16)
    out = aug(_u8(), torch.Generator().manual_seed(0))
    assert out.shape == (6, 3, 16, 16) and out.dtype == torch.float32
    assert torch.isfinite(out).all()
    # the YAML's options are the ones built (they were all dropped without a test noticing)
    for key, value in OmegaConf.to_container(conf).items():
        if key in ("brightness", "contrast", "saturation", "rotation", "translate", "hflip"):
            assert getattr(aug, key) == pytest.approx(value), key
    changed = not torch.equal(out, BatchAugment.normalize_only(MEAN, STD)(_u8()))
    assert changed is (name != "none")


def test_none_is_just_normalisation():
    x = _u8()
    out = BatchAugment.from_config({"name": "none", "label_smoothing": 0.1}, MEAN, STD, 16)(x)
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    torch.testing.assert_close(out, (x.float() / 255 - mean) / std)


def test_flip_and_pad_crop():
    x = _u8(b=5)
    norm = BatchAugment.normalize_only(MEAN, STD)
    flipped = BatchAugment(MEAN, STD, hflip=1.0)(x)
    torch.testing.assert_close(flipped, norm(x.flip(3)))
    p = 2
    out = BatchAugment(MEAN, STD, resolution=16, crop_padding=p / 16)(x, torch.Generator().manual_seed(1))
    padded = torch.nn.functional.pad(norm(x), (p, p, p, p), value=float(norm(torch.zeros(1, 3, 1, 1, dtype=torch.uint8))[0, 0, 0, 0]))
    shifts = set()
    for i in range(len(x)):  # each output is some 16x16 window of the zero-padded image
        hits = [(dy, dx) for dy in range(2 * p + 1) for dx in range(2 * p + 1)
                if torch.allclose(out[i], padded[i, :, dy:dy + 16, dx:dx + 16])]
        assert hits, f"sample {i} is not a crop of the padded image"
        shifts.add(hits[0])
    assert len(shifts) > 1  # offsets are drawn per sample


def test_reflect_pad_crop_is_a_window_of_the_mirrored_image():
    x = _u8(b=6)
    norm = BatchAugment.normalize_only(MEAN, STD)
    p = 3
    aug = BatchAugment(MEAN, STD, resolution=16, crop_padding=p, padding_mode="reflect")
    out = aug(x, torch.Generator().manual_seed(2))
    padded = torch.nn.functional.pad(norm(x), (p, p, p, p), mode="reflect")
    shifts = set()
    for i in range(len(x)):
        hits = [(dy, dx) for dy in range(2 * p + 1) for dx in range(2 * p + 1)
                if torch.equal(out[i], padded[i, :, dy:dy + 16, dx:dx + 16])]
        assert hits, f"sample {i} is not a crop of the reflect-padded image"
        shifts.add(hits[0])
    assert len(shifts) > 1 and any(0 in s or 2 * p in s for s in shifts)  # edges reached too
    with pytest.raises(CnnBenchError, match="padding_mode must be one of constant, reflect"):
        BatchAugment.from_config({"crop_padding": 2, "padding_mode": "mirror"}, MEAN, STD, 16)
    with pytest.raises(CnnBenchError, match="crop_padding < the resolution"):
        BatchAugment(MEAN, STD, resolution=16, crop_padding=16, padding_mode="reflect")


def test_jitter_and_affine_are_per_sample():
    same = _u8(b=1).expand(8, -1, -1, -1).contiguous()
    for opts in ({"brightness": 0.4, "contrast": 0.4, "saturation": 0.4},
                 {"rotation": 20.0, "translate": 0.1, "scale": (0.9, 1.1)}):
        out = BatchAugment(MEAN, STD, **opts)(same, torch.Generator().manual_seed(0))
        assert out.shape == same.shape
        assert not torch.allclose(out[0], out[1])
    lo = (0 - MEAN[0]) / STD[0]
    hi = (1 - MEAN[0]) / STD[0]
    out = BatchAugment(MEAN, STD, brightness=0.9)(same, torch.Generator().manual_seed(0))
    assert out.min() >= lo - 1e-5 and out.max() <= hi + 1e-5  # jitter clamps to [0, 1]


def test_augment_rejects_unknown_option():
    with pytest.raises(CnnBenchError, match="did you mean: hflip"):
        BatchAugment.from_config({"hflipp": 0.5}, MEAN, STD, 32)


def _mid(b=4, r=15, seed=0):
    """Mid-range colours (no clamping at 0 or 1), odd size (a centre pixel)."""
    return torch.randint(90, 166, (b, 3, r, r), dtype=torch.uint8,
                         generator=torch.Generator().manual_seed(seed))


def _unit(aug_out: torch.Tensor) -> torch.Tensor:
    """Normalised output back to [0, 1] units."""
    return aug_out * torch.tensor(STD).view(1, 3, 1, 1) + torch.tensor(MEAN).view(1, 3, 1, 1)


def _gray_mean(x: torch.Tensor) -> torch.Tensor:
    import torchvision.transforms.v2.functional as TF

    return TF.rgb_to_grayscale(x).mean(dim=(1, 2, 3))


def test_contrast_scales_each_image_about_its_grey_mean():
    x = _mid()
    out = _unit(BatchAugment(MEAN, STD, contrast=0.5)(x, torch.Generator().manual_seed(0)))
    xf = x.float() / 255
    torch.testing.assert_close(_gray_mean(out), _gray_mean(xf), atol=1e-4, rtol=0)
    m = _gray_mean(xf).view(-1, 1, 1, 1)
    f = ((out - m).flatten(1) * (xf - m).flatten(1)).sum(1) / ((xf - m).flatten(1) ** 2).sum(1)
    torch.testing.assert_close(out - m, f.view(-1, 1, 1, 1) * (xf - m), atol=1e-4, rtol=0)
    assert ((0.5 <= f) & (f <= 1.5)).all() and (f - 1).abs().max() > 0.01


def test_saturation_leaves_grey_alone_and_moves_colour():
    import torchvision.transforms.v2.functional as TF

    aug = BatchAugment(MEAN, STD, saturation=0.5)
    grey = _mid()[:, :1].expand(-1, 3, -1, -1).contiguous()
    torch.testing.assert_close(_unit(aug(grey, torch.Generator().manual_seed(0))),
                               grey.float() / 255, atol=1e-4, rtol=0)
    x = _mid()
    out = _unit(aug(x, torch.Generator().manual_seed(0)))
    xf = x.float() / 255
    g = TF.rgb_to_grayscale(xf)
    f = ((out - g).flatten(1) * (xf - g).flatten(1)).sum(1) / ((xf - g).flatten(1) ** 2).sum(1)
    torch.testing.assert_close(out - g, f.view(-1, 1, 1, 1) * (xf - g), atol=1e-4, rtol=0)
    assert (f - 1).abs().max() > 0.01


def test_rotation_turns_about_the_centre():
    x = _mid()
    out = _unit(BatchAugment(MEAN, STD, rotation=30.0)(x, torch.Generator().manual_seed(0)))
    xf = x.float() / 255
    torch.testing.assert_close(out[..., 7, 7], xf[..., 7, 7], atol=1e-4, rtol=0)
    assert (out - xf).abs().amax(dim=(1, 2, 3)).max() > 0.1  # angles drawn from +-30 deg
