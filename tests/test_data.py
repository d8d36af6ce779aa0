"""Tests of the data path: datasets, decoding, cache, both loaders (batch augmentation
itself: ``test_augment.py``)."""

from __future__ import annotations

import os
import pickle
import socket
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

import cnn_bench.data.memory as memory
from cnn_bench.data import BatchAugment, DataBundle, Loader, build_data, decode_image
from cnn_bench.data.bundled import ASSET
from cnn_bench.errors import CnnBenchError
from datagen import add_broken_files, add_odd_mode_images, make_imagefolder

REPO = Path(__file__).resolve().parents[1]
MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    """Never touch the user's ~/.cache, even for configs that leave cache_dir null."""
    monkeypatch.setenv("CNN_BENCH_CACHE", str(tmp_path / "env-cache"))


def cfg(root=None, **kw) -> dict:
    base = dict(name="imagefolder", root=str(root) if root else None, resolution=16,
                val_fraction=0.1, num_classes=None, mean=list(MEAN), std=list(STD),
                in_memory="auto", max_memory_gb=4, cache_dir=None, num_workers=0, split_seed=0)
    base.update(kw)
    return base


def build(data_cfg, aug=None, **kw) -> DataBundle:
    kw = {"batch_size": 8, "device": "cpu", "seed": 0, **kw}
    return build_data(data_cfg, aug, **kw)


def batches(loader, epoch=None):
    if epoch is not None:
        loader.set_epoch(epoch)
    return list(loader)


def assert_same(a, b):
    assert len(a) == len(b)
    for (xa, ya), (xb, yb) in zip(a, b):
        torch.testing.assert_close(xa, xb, rtol=0, atol=0)
        assert torch.equal(ya, yb)


@pytest.fixture
def folder(tmp_path):
    return make_imagefolder(tmp_path / "imgs", per_class=8, splits=("train", "val", "test"))


# --- bundled dataset -------------------------------------------------------------------------


def test_bundled_cifar10_mini_loads_offline(tmp_path, monkeypatch):
    assert ASSET.stat().st_size <= 5 * 1024 * 1024

    def no_network(*a, **k):
        raise AssertionError("cifar10_mini must not use the network")

    monkeypatch.setattr(socket, "socket", no_network)
    data_cfg = OmegaConf.load(REPO / "conf/dataset/cifar10_mini.yaml")
    data_cfg.cache_dir = str(tmp_path / "cache")
    data_cfg.num_workers = 0
    b = build(data_cfg, OmegaConf.load(REPO / "conf/augmentation/basic.yaml"), batch_size=256)
    assert b.num_classes == 10 and b.classes[0] == "airplane" and b.in_memory
    assert (b.train.num_samples, b.val.num_samples, b.test.num_samples) == (9000, 1000, 2000)
    per_class = torch.bincount(torch.cat([b.train.labels, b.val.labels]), minlength=10)
    assert per_class.tolist() == [1000] * 10  # stratified carve keeps the advertised counts
    assert torch.bincount(b.val.labels).tolist() == [100] * 10
    assert torch.bincount(b.test.labels).tolist() == [200] * 10
    x, y = next(iter(b.train))
    assert x.shape == (256, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert len(b.train) == 9000 // 256  # drop_last on train
    assert len(b.test) == -(-2000 // 256)


# --- both paths ------------------------------------------------------------------------------


def test_auto_in_memory_leaves_half_the_gpu_free(monkeypatch):
    # A raised max_memory_gb must not put more on a GPU than it can hold next to the model.
    from cnn_bench.data.build import fits_on_device

    gib = 2**30
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (10 * gib, 80 * gib))
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert fits_on_device(4 * gib, 100, cuda) and not fits_on_device(6 * gib, 100, cuda)
    assert fits_on_device(6 * gib, 100, cpu)            # host memory: max_memory_gb alone
    assert not fits_on_device(4 * gib, 4, cuda)         # 4 GiB > 4 GB


def test_memory_and_stream_give_identical_batches(folder, tmp_path):
    aug = OmegaConf.load(REPO / "conf/augmentation/seed.yaml")
    mem = build(cfg(folder, in_memory=True, cache_dir=str(tmp_path / "c1")), aug)
    stream = build(cfg(folder, in_memory=False, cache_dir=str(tmp_path / "c2")), aug)
    assert mem.in_memory and not stream.in_memory
    assert isinstance(stream.train, Loader) and isinstance(mem.train, Loader)
    assert_same(batches(mem.val), batches(stream.val))
    assert_same(batches(mem.test), batches(stream.test))
    # Same order and augmentation draws: train batches match too.
    assert_same(batches(mem.train, 3), batches(stream.train, 3))
    # ... and they are augmented: the un-augmented train images, in the same order, differ
    plain = build(cfg(folder, in_memory=True, cache_dir=str(tmp_path / "c1")), None)
    (x_aug, y_aug), (x_plain, y_plain) = batches(mem.train, 3)[0], batches(plain.train, 3)[0]
    assert torch.equal(y_aug, y_plain) and not torch.allclose(x_aug, x_plain)


def _flipped(loader, epoch: int) -> dict[int, bool]:
    """Which training samples (by index) an epoch flipped, found by matching every output image
    against the sample and its mirror image (crop_padding 0: nothing else changes them)."""
    norm = BatchAugment.normalize_only(MEAN, STD)
    plain, mirror = norm(loader.images), norm(loader.images.flip(3))
    seen = {}
    for x, _ in batches(loader, epoch):
        for img in x:
            i = int((plain - img).abs().flatten(1).amax(1).argmin())
            j = int((mirror - img).abs().flatten(1).amax(1).argmin())
            is_plain = torch.equal(plain[i], img)
            assert is_plain or torch.equal(mirror[j], img)
            seen[i if is_plain else j] = not is_plain
    return seen


def test_alternating_flip_flips_each_image_every_other_epoch(folder, tmp_path):
    aug = OmegaConf.create({"name": "basic", "crop_padding": 0, "hflip": 0.5,
                            "hflip_alternate": True})
    mem = build(cfg(folder, in_memory=True, cache_dir=str(tmp_path / "c1")), aug, batch_size=4)
    first = _flipped(mem.train, 0)
    assert len(first) == mem.train.num_samples  # 24 samples, 6 full batches
    assert 0 < sum(first.values()) < len(first)  # a random part of them, not all or none
    assert _flipped(mem.train, 1) == {i: not f for i, f in first.items()}
    assert _flipped(mem.train, 2) == first
    # The streaming path applies the same decisions to the same batches.
    stream = build(cfg(folder, in_memory=False, cache_dir=str(tmp_path / "c2")), aug,
                   batch_size=4)
    assert_same(batches(mem.train, 3), batches(stream.train, 3))
    with pytest.raises(CnnBenchError, match="hflip_alternate .* needs hflip=0.5, got 1.0"):
        BatchAugment(MEAN, STD, hflip=1.0, hflip_alternate=True)


def test_stream_with_worker_processes(folder, tmp_path):
    mem = build(cfg(folder, in_memory=True, cache_dir=str(tmp_path / "c1")))
    stream = build(cfg(folder, in_memory=False, num_workers=2, cache_dir=str(tmp_path / "c2")),
                   channels_last=True)
    out = batches(stream.val)
    assert all(x.is_contiguous(memory_format=torch.channels_last) for x, _ in out)
    assert_same(batches(mem.val), [(x.contiguous(), y) for x, y in out])


def test_set_epoch_reproducible(folder, tmp_path):
    aug = OmegaConf.load(REPO / "conf/augmentation/seed.yaml")
    data_cfg = cfg(folder, cache_dir=str(tmp_path / "c"))
    b = build(data_cfg, aug, batch_size=4)
    e2 = batches(b.train, 2)
    assert_same(e2, batches(b.train, 2))
    e3 = batches(b.train, 3)
    assert not torch.equal(e2[0][0], e3[0][0])
    # A "resumed" run: a fresh bundle jumping straight to epoch 2 sees the same batches.
    resumed = build(data_cfg, aug, batch_size=4)
    assert_same(e2, batches(resumed.train, 2))
    other_seed = build(data_cfg, aug, batch_size=4, seed=1)
    assert not torch.equal(e2[0][0], batches(other_seed.train, 2)[0][0])


def test_loader_lengths_and_drop_last(folder, tmp_path):
    b = build(cfg(folder, cache_dir=str(tmp_path / "c")), batch_size=5, eval_batch_size=7)
    assert b.train.num_samples == 24 and len(b.train) == 4  # 24 // 5, partial batch dropped
    assert sum(len(y) for _, y in b.train) == 20
    assert len(b.val) == 4 and sum(len(y) for _, y in b.val) == 24  # eval keeps everything
    small = build(cfg(folder, cache_dir=str(tmp_path / "c")), batch_size=100)
    assert len(small.train) == 1 and len(next(iter(small.train))[1]) == 24


# --- imagefolder quirks ----------------------------------------------------------------------


@pytest.mark.parametrize("in_memory,workers,run", [(True, 0, 1), (True, 0, 2), (False, 2, 1),
                                                    (False, 0, 2)])
def test_broken_files_skipped_and_named_in_one_warning(folder, tmp_path, in_memory, workers, run):
    broken = add_broken_files(folder / "train" / "a")
    data_cfg = cfg(folder, in_memory=in_memory, num_workers=workers, cache_dir=str(tmp_path / "c"))
    for _ in range(run):  # the second run reads the decode/validation cache: same warning
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            b = build(data_cfg)
            for _ in b.train:  # streaming must not raise from a worker
                pass
        msgs = [str(w.message) for w in caught if "unreadable" in str(w.message)]
        assert len(msgs) == 1, msgs
        assert msgs[0].startswith("skipped 3 unreadable files")
        for p, why in zip(broken, ("truncated", "empty file", "not an image")):
            assert f"{p.name} ({why})" in msgs[0]
        assert sorted(b.skipped) == sorted(str(p) for p in broken)
        assert b.train.num_samples == 24


@pytest.mark.parametrize("in_memory", [True, False])
def test_dangling_link_is_skipped_like_an_unreadable_file(folder, tmp_path, in_memory):
    link = folder / "train" / "a" / "zz_dangling.jpg"
    os.symlink(tmp_path / "nowhere.jpg", link)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        b = build(cfg(folder, in_memory=in_memory, cache_dir=str(tmp_path / "c")))
        list(b.train)
    msgs = [str(w.message) for w in caught if "unreadable" in str(w.message)]
    assert len(msgs) == 1 and "zz_dangling.jpg" in msgs[0], msgs
    assert b.skipped == [str(link)] and b.train.num_samples == 24


def test_cache_sees_a_file_replaced_with_its_size_and_mtime_restored(folder, tmp_path):
    # cp -p / rsync -a / unpacking an archive restore mtimes; an uncompressed BMP of the same
    # dimensions keeps its size. The decoded cache must still serve the new pixels.
    bmp = folder / "val" / "a" / "zz.bmp"
    pixels = np.full((16, 16, 3), 40, np.uint8)
    Image.fromarray(pixels).save(bmp)
    data_cfg = cfg(folder, in_memory=True, cache_dir=str(tmp_path / "c"))
    before = build(data_cfg).val.images.clone()
    st = bmp.stat()
    Image.fromarray(255 - pixels).save(bmp)
    os.utime(bmp, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert bmp.stat().st_size == st.st_size and bmp.stat().st_mtime_ns == st.st_mtime_ns
    after = build(data_cfg).val.images
    assert not torch.equal(before, after)
    fresh = build({**data_cfg, "cache_dir": str(tmp_path / "fresh")}).val.images
    assert torch.equal(after, fresh)


def test_odd_modes_load_as_rgb(folder, tmp_path):
    odd = add_odd_mode_images(folder / "train" / "b")
    for path in odd.values():
        img = decode_image(path.read_bytes())
        assert img.dtype == torch.uint8 and img.shape == (3, 28, 20)
    for key in ("I;16", "I;16-tiff"):  # 16-bit is rescaled, not clipped
        assert (decode_image(odd[key].read_bytes()) == 128).all()
    cmyk = decode_image(odd["CMYK"].read_bytes()).float()
    rgb = decode_image((folder / "train" / "b" / "rgba.png").read_bytes()).float()
    assert (cmyk - rgb).abs().mean() < 12  # CMYK converted to the same picture, not inverted
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # notes.txt is ignored, nothing is skipped
        b = build(cfg(folder, cache_dir=str(tmp_path / "c")))
    assert b.train.num_samples == 24 + len(odd) and not b.skipped


def test_file_broken_mid_run_ends_in_one_line(folder, tmp_path):
    for workers in (0, 2):
        b = build(cfg(folder, in_memory=False, num_workers=workers, cache_dir=str(tmp_path / "c")))
        victim = folder / "val" / "b" / "002.jpg"
        original = victim.read_bytes()
        victim.write_bytes(b"overwritten after validation")
        try:
            with pytest.raises(CnnBenchError, match=r"val/b/002.jpg became unreadable") as err:
                list(b.val)
        finally:
            victim.write_bytes(original)
        assert "\n" not in str(err.value) and "Traceback" not in str(err.value)


def test_mean_std_null_is_measured(folder, tmp_path):
    from datagen import direct_stats

    b = build(cfg(folder, mean=None, std=None, val_fraction=0, cache_dir=str(tmp_path / "c")))
    mean, std = direct_stats(folder / "train", 16)  # every train image, decoded apart
    assert b.mean == pytest.approx(mean, abs=2e-3) and b.std == pytest.approx(std, abs=2e-3)
    # streaming cannot measure cheaply: ImageNet's, and a warning saying so (it was silent)
    with pytest.warns(UserWarning, match="normalising with ImageNet's statistics"):
        s = build(cfg(folder, mean=None, std=None, in_memory=False, cache_dir=str(tmp_path / "c")))
    assert s.mean == (0.485, 0.456, 0.406) and s.std == (0.229, 0.224, 0.225)
    x = torch.cat([x for x, _ in build(cfg(folder, mean=b.mean, std=b.std,
                                              cache_dir=str(tmp_path / "c"))).train])
    assert x.shape[0] > 0


def test_empty_class_folder_is_named(folder, tmp_path):
    (folder / "train" / "zebra").mkdir()
    with pytest.raises(CnnBenchError, match=r"train/zebra has no images"):
        build(cfg(folder, cache_dir=str(tmp_path / "c")))


def test_num_classes_mismatch(folder, tmp_path):
    with pytest.raises(CnnBenchError, match=r"num_classes=5 but the data has 3 classes"):
        build(cfg(folder, num_classes=5, cache_dir=str(tmp_path / "c")))
    assert build(cfg(folder, num_classes=3, cache_dir=str(tmp_path / "c"))).num_classes == 3


def test_val_classes_must_match_train(folder, tmp_path):
    make_imagefolder(folder, classes=("q",), per_class=2, splits=("val",))
    with pytest.raises(CnnBenchError, match=r"extra q"):
        build(cfg(folder, cache_dir=str(tmp_path / "c")))


def test_single_folder_split_is_deterministic(tmp_path):
    root = make_imagefolder(tmp_path / "flat", per_class=10, splits=None)
    data_cfg = cfg(root, val_fraction=0.2, cache_dir=str(tmp_path / "c"))
    a, b = build(data_cfg), build(data_cfg)
    assert (a.train.num_samples, a.val.num_samples, a.test) == (24, 6, None)
    assert torch.bincount(a.val.labels).tolist() == [2, 2, 2]
    assert torch.equal(a.val.images, b.val.images)
    c = build({**data_cfg, "split_seed": 1})
    assert not torch.equal(a.val.images, c.val.images)
    d = build(cfg(make_imagefolder(tmp_path / "t", per_class=10, splits=("train",)),
                  val_fraction=0.2, cache_dir=str(tmp_path / "c")))
    assert (d.train.num_samples, d.val.num_samples) == (24, 6)  # train/ without val/: carved


def test_user_errors_are_one_line(tmp_path):
    cases = [
        (cfg(name="imagefoldr"), "did you mean: imagefolder"),
        (cfg(), "dataset.root is required for dataset=imagefolder"),
        (cfg(tmp_path / "nope"), "does not exist"),
        (cfg(tmp_path, resoluton=3), "did you mean: resolution"),
        (cfg(tmp_path, in_memory="maybe"), "auto, true or false"),
        (cfg(make_imagefolder(tmp_path / "v", splits=("val",))), "has val/ but no train/"),
    ]
    for data_cfg, msg in cases:
        with pytest.raises(CnnBenchError, match=msg) as err:
            build(data_cfg)
        assert "\n" not in str(err.value)


# --- cache -----------------------------------------------------------------------------------


def test_cache_written_once_and_reused(folder, tmp_path, monkeypatch):
    data_cfg = cfg(folder, cache_dir=str(tmp_path / "cache"))
    first = build(data_cfg)
    files = sorted((tmp_path / "cache").glob("*.pt"))
    assert [f.name.split("-")[1] for f in files] == ["test", "train", "val"]
    stamps = [f.stat().st_mtime_ns for f in files]

    def no_decode(*a, **k):
        raise AssertionError("second build must come from the cache")

    monkeypatch.setattr(memory, "decode_source", no_decode)
    second = build(data_cfg)
    assert [f.stat().st_mtime_ns for f in files] == stamps
    assert torch.equal(first.train.images, second.train.images)
    assert not list((tmp_path / "cache").glob("*.tmp"))
    # A different resolution or changed file gets its own entry instead of a stale hit.
    monkeypatch.undo()
    build({**data_cfg, "resolution": 12})
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 6


def test_auto_chooses_streaming_when_too_big(folder, tmp_path):
    b = build(cfg(folder, max_memory_gb=1e-6, cache_dir=str(tmp_path / "c")))
    assert not b.in_memory
    assert not list((tmp_path / "c").glob("*px-*.pt"))  # nothing decoded to disk


# --- torchvision sets (faked: no network here) ------------------------------------------------


def _fake_cifar10(root: Path, n=6):
    base = root / "cifar-10-batches-py"
    base.mkdir(parents=True)
    rng = np.random.default_rng(0)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        entry = {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                 "labels": [i % 10 for i in range(n)]}
        (base / name).write_bytes(pickle.dumps(entry))
    meta = {"label_names": ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog",
                            "horse", "ship", "truck"]}
    (base / "batches.meta").write_bytes(pickle.dumps(meta))


def test_cifar10_via_torchvision_array(tmp_path, monkeypatch):
    import torchvision.datasets.cifar as tv_cifar

    monkeypatch.setattr(tv_cifar, "check_integrity", lambda *a, **k: True)
    _fake_cifar10(tmp_path / "data")
    data_cfg = {**OmegaConf.to_container(OmegaConf.load(REPO / "conf/dataset/cifar10.yaml")),
                "root": str(tmp_path / "data"), "download": False, "num_workers": 0,
                "cache_dir": str(tmp_path / "c")}
    b = build(data_cfg)
    assert b.num_classes == 10 and b.train.num_samples + b.val.num_samples == 30
    assert b.test.num_samples == 6
    s = build({**data_cfg, "in_memory": False})
    assert_same(batches(b.test), batches(s.test))


def test_cifar10_download_failure_is_one_line(tmp_path, monkeypatch):
    import torchvision.datasets.cifar as tv_cifar

    def offline(*a, **k):
        raise OSError("<urlopen error [Errno -3] Temporary failure in name resolution>")

    monkeypatch.setattr(tv_cifar, "download_and_extract_archive", offline)
    with pytest.raises(CnnBenchError, match=r"could not download CIFAR-10.*pass dataset.root=") as err:
        build(cfg(tmp_path / "none", name="cifar10", download=True))
    assert "\n" not in str(err.value)
