"""Dataset layouts: split folders, archive roots against the same tree unpacked, splits that
cannot be read, and the decoded-data cache's files."""

from __future__ import annotations

import os
import stat
import tarfile
import warnings
import zipfile
from pathlib import Path

import pytest
import torch

from cnn_bench.checkpoint import atomic_save
from cnn_bench.data import build_data
from cnn_bench.data.cache import save_payload
from cnn_bench.errors import CnnBenchError
from datagen import add_broken_files, make_imagefolder


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CNN_BENCH_CACHE", str(tmp_path / "env-cache"))


def cfg(root, **kw) -> dict:
    base = dict(name="imagefolder", root=str(root), resolution=16, val_fraction=0.25,
                num_classes=None, mean=[0.5] * 3, std=[0.25] * 3, in_memory=True,
                max_memory_gb=4, cache_dir=None, num_workers=0, split_seed=0)
    base.update(kw)
    return base


def build(data_cfg, **kw):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        b = build_data(data_cfg, None, **{"batch_size": 2, "device": "cpu", "seed": 0, **kw})
    return b, [str(w.message) for w in caught]


def tar(tree: Path, archive: Path, mode: str = "w:xz") -> Path:
    with tarfile.open(archive, mode) as t:
        for top in sorted(os.listdir(tree)):
            t.add(tree / top, arcname=top)
    return archive


def splits_of(b):
    return {k: (getattr(b, k).images, getattr(b, k).labels)
            for k in ("train", "val", "test") if getattr(b, k) is not None}


# --- archives give what the unpacked folder gives ----------------------------------------------

@pytest.fixture
def odd_tree(tmp_path):
    """train/ (with a nested folder, a hard link, a symlink, a hidden file, a non-image),
    val/ and test/: everything imagefolder reads or ignores."""
    tree = make_imagefolder(tmp_path / "tree", classes=("a", "b"), per_class=4,
                            splits=("train", "val", "test"))
    a = tree / "train" / "a"
    make_imagefolder(a / "deeper", classes=("x",), per_class=2, splits=None, seed=5)
    os.link(a / "000.jpg", a / "hard.jpg")
    os.symlink("001.png", a / "soft.png")
    (a / ".hidden.jpg").write_bytes((a / "002.jpg").read_bytes())
    (a / "notes.txt").write_text("not an image")
    return tree


@pytest.mark.parametrize("mode,name", [("w:xz", "d.tar.xz"), ("w:gz", "d.tar.gz"),
                                       ("w:bz2", "d.tbz"), ("w", "d.tar"), ("w:xz", "D.TAR.XZ")])
def test_archive_root_gives_the_unpacked_folders_data(odd_tree, tmp_path, mode, name):
    # Only lower-case .xz was decompressed: a .tar.gz was sliced compressed and every image
    # "unreadable"; links, nested folders and val/ were dropped, hidden and .txt members kept.
    archive = tar(odd_tree, tmp_path / name, mode)
    folder, w_folder = build(cfg(odd_tree, cache_dir=str(tmp_path / "c1")))
    packed, w_packed = build(cfg(archive, name="cifar10_mini", cache_dir=str(tmp_path / "c2")))
    assert w_folder == [] and w_packed == []
    assert folder.classes == packed.classes == ["a", "b"]
    a, b = splits_of(folder), splits_of(packed)
    assert a.keys() == b.keys() == {"train", "val", "test"}
    assert len(a["train"][1]) == 4 + 2 + 2 + 4  # a: 4 + deeper/x's 2 + both links; b: 4
    for split in a:
        assert torch.equal(a[split][0], b[split][0]) and torch.equal(a[split][1], b[split][1]), split


def test_archive_without_val_carves_the_same_split_as_the_folder(odd_tree, tmp_path):
    import shutil

    shutil.rmtree(odd_tree / "val")
    archive = tar(odd_tree, tmp_path / "d.tar")
    folder, _ = build(cfg(odd_tree, cache_dir=str(tmp_path / "c1")))
    packed, _ = build(cfg(archive, name="cifar10_mini", cache_dir=str(tmp_path / "c2")))
    for split, (x, y) in splits_of(folder).items():
        px, py = splits_of(packed)[split]
        assert torch.equal(x, px) and torch.equal(y, py), split


def test_archive_class_folder_without_images_is_one_line(tmp_path):
    tree = make_imagefolder(tmp_path / "tree", classes=("a", "b"), per_class=2, splits=("train",))
    (tree / "train" / "empty").mkdir()
    with pytest.raises(CnnBenchError, match=r"class folder train/empty of .* has no images"):
        build(cfg(tar(tree, tmp_path / "d.tar.xz"), name="cifar10_mini"))
    with pytest.raises(CnnBenchError, match=r"class folder .*train/empty has no images"):
        build(cfg(tree))


def test_archive_root_mistakes_are_one_line(tmp_path):
    tree = make_imagefolder(tmp_path / "tree", classes=("a",), per_class=1, splits=("train",))
    with zipfile.ZipFile(tmp_path / "d.zip", "w") as z:
        z.write(tree / "train" / "a" / "000.jpg", "train/a/000.jpg")
    with pytest.raises(CnnBenchError) as e:
        build(cfg(tmp_path / "d.zip", name="cifar10_mini"))
    assert "\n" not in str(e.value) and "not a readable tar archive" in str(e.value)
    with pytest.raises(CnnBenchError, match="is a folder: dataset=cifar10_mini reads a tar"):
        build(cfg(tree, name="cifar10_mini"))


def test_bundled_archive_with_other_test_classes_is_one_line(tmp_path):
    # dataset.root may point at another archive of the bundled layout: a test class that train
    # lacks must not silently shrink the test set.
    tree = make_imagefolder(tmp_path / "tree", classes=("a", "b"), per_class=2,
                            splits=("train", "test"))
    make_imagefolder(tree / "extra", classes=("c",), per_class=2, splits=None)
    (tree / "extra" / "c").rename(tree / "test" / "c")
    archive = tmp_path / "mini.tar.xz"
    with tarfile.open(archive, "w:xz") as tar:
        tar.add(tree / "train", arcname="train")
        tar.add(tree / "test", arcname="test")
    with pytest.raises(CnnBenchError, match=r"test/ do not match train's \(extra c\)"):
        build(cfg(archive, name="cifar10_mini"))



@pytest.mark.parametrize("in_memory", [True, False])
def test_user_archive_with_a_broken_member_is_skipped_on_both_paths(tmp_path, in_memory):
    # The streaming path never checked archive members: a truncated one stopped the first epoch
    # with "became unreadable during the run", where the in-memory path skipped it with a warning.
    tree = make_imagefolder(tmp_path / "tree", classes=("a", "b"), per_class=4,
                            splits=("train", "test"))
    add_broken_files(tree / "train" / "a")
    archive = tmp_path / "mini.tar.xz"
    with tarfile.open(archive, "w:xz") as tar:
        tar.add(tree / "train", arcname="train")
        tar.add(tree / "test", arcname="test")
    b, caught = build(cfg(archive, name="cifar10_mini", val_fraction=0, in_memory=in_memory,
                          cache_dir=str(tmp_path / "c")))
    labels = torch.cat([y for _, y in b.train])
    assert b.in_memory is in_memory
    (msg,) = [m for m in caught if "unreadable" in m]
    assert msg.startswith(f"skipped 3 unreadable files under {archive}")
    assert "train/a/truncated.jpg (truncated)" in msg
    assert sorted(labels.tolist()) == [0] * 4 + [1] * 4  # the 8 good images, labels intact


# --- split folders --------------------------------------------------------------------------

@pytest.mark.parametrize("archive", [False, True])
def test_split_folders_match_in_any_case(tmp_path, archive):
    # Train/ and Test/ were taken as two classes of a root without train/; Val/ next to train/
    # was ignored and val carved from train instead.
    tree = make_imagefolder(tmp_path / "tree", classes=("a", "b", "c"), per_class=2,
                            splits=("Train", "VAL", "Test"))
    root = tar(tree, tmp_path / "d.tar") if archive else tree
    b, _ = build(cfg(root, **({"name": "cifar10_mini"} if archive else {})))
    assert b.classes == ["a", "b", "c"]
    assert (b.train.num_samples, b.val.num_samples, b.test.num_samples) == (6, 6, 6)


def test_two_folders_for_one_split_is_one_line(tmp_path):
    tree = make_imagefolder(tmp_path / "tree", classes=("a",), per_class=2, splits=("train",))
    make_imagefolder(tmp_path / "tree", classes=("a",), per_class=2, splits=("Train",))
    if len(os.listdir(tree)) < 2:
        pytest.skip("case-insensitive file system")
    with pytest.raises(CnnBenchError, match=r"has both Train/ and train/; keep one"):
        build(cfg(tree))


# --- unreadable splits ------------------------------------------------------------------------

@pytest.mark.parametrize("in_memory", [True, False])
def test_a_split_with_no_readable_image_is_one_line(tmp_path, in_memory):
    # Scored as loss 0.0 / accuracy 0.0 before: a "perfect" val loss for early stopping.
    tree = make_imagefolder(tmp_path / "tree", classes=("a", "b"), per_class=2,
                            splits=("train", "val"))
    for cls in ("a", "b"):
        for f in (tree / "val" / cls).iterdir():
            f.unlink()
        add_broken_files(tree / "val" / cls)
    with pytest.raises(CnnBenchError, match=r"none of the 6 images of the val split is readable "
                                            r"\(e\.g\. \S*val/a/"):
        build(cfg(tree, in_memory=in_memory))


# --- cache and checkpoint files ---------------------------------------------------------------

def test_cache_is_decoded_again_after_a_decoder_upgrade(tmp_path, monkeypatch):
    import PIL

    import cnn_bench.data.memory as memory

    tree = make_imagefolder(tmp_path / "tree", classes=("a", "b"), per_class=2, splits=("train",))
    data_cfg = cfg(tree, cache_dir=str(tmp_path / "c"), val_fraction=0)
    build(data_cfg)
    calls = []
    real = memory.decode_source
    monkeypatch.setattr(memory, "decode_source", lambda *a, **k: calls.append(1) or real(*a, **k))
    build(data_cfg)
    assert calls == []  # same libraries: from the cache
    monkeypatch.setattr(PIL, "__version__", "99.0")
    build(data_cfg)
    assert calls == [1]


def test_cache_write_failure_warns_and_leaves_no_temp_file(tmp_path, monkeypatch):
    # torch.save turns a full disk into RuntimeError ("unexpected pos ..."), which was not
    # caught: the run died in the data pass and a partial .tmp file stayed in the cache folder.
    def disk_full(obj, f):
        f.write(b"partial")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.warns(UserWarning, match="could not write the dataset cache"):
        save_payload({"x": torch.zeros(2)}, tmp_path / "cache" / "x.pt")
    assert os.listdir(tmp_path / "cache") == []


def test_cache_and_checkpoint_files_follow_the_umask(tmp_path):
    # mkstemp made them 0600: a cache shared through $CNN_BENCH_CACHE, or a checkpoint handed to
    # the group, was unreadable to everyone else.
    umask = os.umask(0o022)
    os.umask(umask)
    save_payload({"x": torch.zeros(2)}, tmp_path / "c.pt")
    atomic_save({"x": torch.zeros(2)}, tmp_path / "k.pt")
    (tmp_path / "plain").write_text("")
    for f in ("c.pt", "k.pt", "plain"):
        assert stat.S_IMODE((tmp_path / f).stat().st_mode) == 0o666 & ~umask, f
