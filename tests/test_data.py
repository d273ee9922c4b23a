"""Data layer: data sets, layouts and their errors, subsets, search split, deterministic loading."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bats_cli.core.errors import UserInputError
from bats_cli.data import (
    DATASETS,
    AugmentConfig,
    SeededView,
    build_datasets,
    describe_spec,
    make_loader,
    mixup,
    search_split,
    targets_of,
)
from bats_cli.data.sources import read_fashion_mini
from bats_cli.data.spec import FASHION_STATS

FASHION_DEBIAN = Path("/usr/share/datasets/fashion-mnist")


def batches(loader) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(x.clone(), y.clone()) for x, y in loader]


def assert_same_batches(a, b) -> None:
    assert len(a) == len(b)
    for (xa, ya), (xb, yb) in zip(a, b, strict=True):
        assert torch.equal(ya, yb)
        assert torch.equal(xa, xb)


@pytest.fixture(scope="module")
def fashion():
    return build_datasets("fashion-mini")


@pytest.fixture(scope="module")
def augmented_small():
    """64 fashion-mini images with every per-sample augmentation on."""
    aug = AugmentConfig(cutout=8, autoaugment=True)
    return build_datasets("fashion-mini", subset=64, augment=aug).train


def make_image_tree(root: Path, splits=("train", "val"), classes=("a", "b"), per_class=3, side=8) -> Path:
    for split in splits:
        for c, name in enumerate(classes):
            (root / split / name).mkdir(parents=True)
            for i in range(per_class):
                pixels = np.full((side, side, 3), 40 * c + i, dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / name / f"{i}.png")
    return root


def write_idx(path: Path, array: np.ndarray, gz: bool) -> None:
    header = (0x800 + array.ndim).to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    data = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(data) if gz else data)


def make_fashion_files(folder: Path, gz: bool) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 20), ("t10k", 10)):
        suffix = ".gz" if gz else ""
        write_idx(folder / f"{prefix}-images-idx3-ubyte{suffix}", rng.integers(0, 256, (n, 28, 28)), gz)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte{suffix}", np.arange(n) % 10, gz)


# --- data sets ---------------------------------------------------------------------------------


def test_dataset_names():
    assert DATASETS == ("fashion-mini", "fashion-mnist", "cifar10", "cifar100", "imagenet", "imagefolder")


def test_fashion_mini_sizes_shape_and_balance(fashion):
    assert (len(fashion.train), len(fashion.test)) == (2500, 500)
    spec = fashion.spec
    assert (spec.num_classes, spec.image_size, spec.in_channels, spec.network) == (10, 32, 1, "cifar")
    assert np.bincount(targets_of(fashion.train)).tolist() == [250] * 10
    assert np.bincount(targets_of(fashion.test)).tolist() == [50] * 10
    x, y = next(iter(make_loader(fashion.train, batch_size=16, seed=0)))
    assert x.shape == (16, 1, 32, 32) and x.dtype == torch.float32
    assert y.shape == (16,) and int(y.max()) < 10


def test_fashion_mini_npz_matches_declared_statistics():
    arrays = read_fashion_mini()
    assert arrays["train_images"].dtype == np.uint8 and arrays["train_images"].shape == (2500, 32, 32)
    pixels = arrays["train_images"] / 255.0
    assert pixels.mean() == pytest.approx(FASHION_STATS[0][0], abs=0.01)
    assert pixels.std() == pytest.approx(FASHION_STATS[1][0], abs=0.01)
    assert len(arrays["classes"]) == 10


@pytest.mark.skipif(not FASHION_DEBIAN.is_dir(), reason="Debian dataset-fashion-mnist not installed")
def test_fashion_mini_is_reproduced_by_the_tool():
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
    from make_fashion_mini import build_arrays

    rebuilt = build_arrays(FASHION_DEBIAN, 250, 50, seed=0)
    shipped = read_fashion_mini()
    for key, array in rebuilt.items():
        assert np.array_equal(array, shipped[key]), key


def test_imagefolder_cifar10_mini(cifar10_mini_dir):
    ds = build_datasets("imagefolder", data_dir=cifar10_mini_dir)
    assert (len(ds.train), len(ds.test)) == (10_000, 2_000)
    assert (ds.spec.num_classes, ds.spec.image_size, ds.spec.in_channels) == (10, 32, 3)
    assert ds.spec.network == "cifar"
    assert np.bincount(targets_of(ds.test)).tolist() == [200] * 10
    assert ds.train[0][0].shape == (3, 32, 32) and ds.test[0][0].shape == (3, 32, 32)
    assert describe_spec("imagefolder", cifar10_mini_dir) == ds.spec


def test_imagefolder_cifar10_mini_subset(cifar10_mini_dir):
    ds = build_datasets("imagefolder", data_dir=cifar10_mini_dir, subset=200)
    assert np.bincount(targets_of(ds.train)).tolist() == [20] * 10
    assert len(ds.test) == 200


def test_imagefolder_large_images_use_imagenet_pipeline(tmp_path):
    root = make_image_tree(tmp_path, side=80)
    ds = build_datasets("imagefolder", data_dir=root)
    assert (ds.spec.network, ds.spec.image_size) == ("imagenet", 224)
    assert ds.train[0][0].shape == (3, 224, 224) and ds.test[0][0].shape == (3, 224, 224)
    small = build_datasets("imagefolder", data_dir=root, image_size=48)
    assert (small.spec.network, small.train[0][0].shape) == ("cifar", (3, 48, 48))


def test_imagefolder_val_labels_follow_train_classes(tmp_path):
    root = make_image_tree(tmp_path, splits=("train",), classes=("a", "b", "c"))
    make_image_tree(root, splits=("val",), classes=("c",))
    ds = build_datasets("imagefolder", data_dir=root)
    assert set(targets_of(ds.test).tolist()) == {2}


@pytest.mark.parametrize("layout", ["flat", "flat-gz", "torchvision"])
def test_fashion_mnist_layouts(tmp_path, layout):
    folder = tmp_path / "FashionMNIST" / "raw" if layout == "torchvision" else tmp_path
    make_fashion_files(folder, gz=layout == "flat-gz")
    ds = build_datasets("fashion-mnist", data_dir=tmp_path)
    assert (len(ds.train), len(ds.test), ds.spec.in_channels) == (20, 10, 1)
    assert ds.train[0][0].shape == (1, 32, 32)


def shape_of(spec) -> tuple:
    return spec.num_classes, spec.image_size, spec.in_channels, spec.network


def test_describe_spec_known_sets():
    assert shape_of(describe_spec("cifar10")) == (10, 32, 3, "cifar")
    assert shape_of(describe_spec("cifar100")) == (100, 32, 3, "cifar")
    assert shape_of(describe_spec("imagenet")) == (1000, 224, 3, "imagenet")
    assert shape_of(describe_spec("fashion-mini")) == (10, 32, 1, "cifar")
    assert describe_spec("CIFAR10").name == "cifar10"
    assert describe_spec("fashion_mnist").name == "fashion-mnist"


def test_paper_default_augmentation():
    assert AugmentConfig.paper_default("cifar10") == AugmentConfig(cutout=16)
    assert AugmentConfig.paper_default("cifar100") == AugmentConfig(mixup=0.2)
    assert AugmentConfig.paper_default("imagenet") == AugmentConfig()


def test_cutout_erases_one_square_hole():
    ds = build_datasets("fashion-mini", augment=AugmentConfig(cutout=16)).train
    plain = build_datasets("fashion-mini", augment=AugmentConfig()).train
    torch.manual_seed(0)
    holed = ds[3][0]
    torch.manual_seed(0)
    reference = plain[3][0]
    changed = (holed != reference).squeeze(0)
    assert (holed[0][changed] == 0).all()
    rows, cols = changed.any(1).nonzero(), changed.any(0).nonzero()
    assert int(rows.max() - rows.min()) < 16 and int(cols.max() - cols.min()) < 16


# --- subset and search split -------------------------------------------------------------------


def test_subset_is_balanced_and_deterministic():
    a = build_datasets("fashion-mini", subset=100, seed=1)
    b = build_datasets("fashion-mini", subset=100, seed=1)
    c = build_datasets("fashion-mini", subset=100, seed=2)
    assert (len(a.train), len(a.test)) == (100, 100)
    assert np.bincount(targets_of(a.train)).tolist() == [10] * 10
    assert a.train.indices == b.train.indices != c.train.indices


def test_search_split_disjoint_covering_deterministic(fashion):
    w, a = search_split(fashion.train, seed=0)
    w2, a2 = search_split(fashion.train, seed=0)
    w3, _ = search_split(fashion.train, seed=1)
    assert set(w.indices).isdisjoint(a.indices)
    assert sorted(w.indices + a.indices) == list(range(len(fashion.train)))
    assert (len(w), len(a)) == (1250, 1250)
    assert (w.indices, a.indices) == (w2.indices, a2.indices)
    assert w.indices != w3.indices
    assert np.bincount(targets_of(a)).tolist() == [125] * 10


def test_search_split_of_a_subset_keeps_training_transform():
    sub = build_datasets("fashion-mini", subset=11).train
    w, a = search_split(sub, seed=0)
    assert abs(len(w) - len(a)) == 1 and set(w.indices) | set(a.indices) == set(range(11))
    per_class = [np.bincount(targets_of(half), minlength=10) for half in (w, a)]
    assert np.abs(per_class[0] - per_class[1]).max() <= 1
    torch.manual_seed(0)
    first = a[0][0]
    assert any(not torch.equal(first, a[0][0]) for _ in range(10))  # random crop/flip still on


# --- deterministic, resumable loading ----------------------------------------------------------


def test_resume_mid_epoch_reproduces_order_and_augmentation(augmented_small):
    full = batches(make_loader(augmented_small, batch_size=8, seed=5, epoch=2))
    resumed = batches(make_loader(augmented_small, batch_size=8, seed=5, epoch=2, skip_batches=3))
    assert len(full) == 8
    assert_same_batches(full[3:], resumed)


def test_loader_independent_of_num_workers(augmented_small):
    serial = batches(make_loader(augmented_small, batch_size=16, seed=5, epoch=1))
    parallel = batches(make_loader(augmented_small, batch_size=16, seed=5, epoch=1, num_workers=2))
    assert_same_batches(serial, parallel)


def test_epochs_and_seeds_differ(augmented_small):
    e0 = batches(make_loader(augmented_small, batch_size=64, seed=5, epoch=0))[0]
    e1 = batches(make_loader(augmented_small, batch_size=64, seed=5, epoch=1))[0]
    s6 = batches(make_loader(augmented_small, batch_size=64, seed=6, epoch=0))[0]
    assert not torch.equal(e0[1], e1[1]) and not torch.equal(e0[1], s6[1])
    # Same sample, other epoch: other augmentation.
    assert not torch.equal(SeededView(augmented_small, seed=5, epoch=0)[0][0],
                           SeededView(augmented_small, seed=5, epoch=1)[0][0])


def test_loading_leaves_global_rng_untouched(augmented_small):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    batches(make_loader(augmented_small, batch_size=32, seed=0))
    assert torch.equal(torch.rand(3), expected)


def test_unshuffled_loader_keeps_order_and_drop_last(fashion):
    loader = make_loader(fashion.test, batch_size=64, shuffle=False, drop_last=True)
    assert len(loader) == 500 // 64
    first = next(iter(loader))[1]
    assert first.tolist() == targets_of(fashion.test)[:64].tolist()


# --- MixUp -------------------------------------------------------------------------------------


def test_mixup_soft_targets_sum_to_one():
    x, y = torch.randn(8, 1, 32, 32), torch.arange(8) % 10
    mix = mixup(0.2, num_classes=10)
    xm, ym = mix(x, y, seed=7)
    assert xm.shape == x.shape and ym.shape == (8, 10)
    assert torch.allclose(ym.sum(1), torch.ones(8))
    xm2, ym2 = mix(x, y, seed=7)
    assert torch.equal(xm, xm2) and torch.equal(ym, ym2)


# --- errors ------------------------------------------------------------------------------------


def raises_naming(path, **kwargs) -> str:
    with pytest.raises(UserInputError) as info:
        build_datasets(**kwargs)
    assert str(path) in str(info.value)
    return str(info.value)


def test_unknown_dataset_lists_choices():
    with pytest.raises(UserInputError, match="cifar100.*imagefolder"):
        build_datasets("mnist")


def test_missing_data_dir(tmp_path):
    missing = tmp_path / "nope"
    message = raises_naming(missing, name="imagefolder", data_dir=missing)
    assert "does not exist" in message and "train/<class>" in message
    with pytest.raises(UserInputError, match="--data-dir"):
        build_datasets("imagenet")


def test_empty_dir_and_missing_val(tmp_path):
    assert "no train/ folder" in raises_naming(tmp_path, name="imagefolder", data_dir=tmp_path)
    make_image_tree(tmp_path, splits=("train",))
    assert "no val/ folder" in raises_naming(tmp_path, name="imagenet", data_dir=tmp_path)


def test_file_instead_of_dir(tmp_path):
    file = tmp_path / "data.tar"
    file.write_bytes(b"x")
    assert "is a file" in raises_naming(file, name="imagefolder", data_dir=file)
    assert "is a file" in raises_naming(file, name="cifar10", data_dir=file)


def test_train_without_images(tmp_path):
    (tmp_path / "train" / "a").mkdir(parents=True)
    (tmp_path / "val").mkdir()
    raises_naming(tmp_path / "train", name="imagefolder", data_dir=tmp_path)


def test_val_with_unknown_class(tmp_path):
    make_image_tree(tmp_path, splits=("train",), classes=("a", "b"))
    make_image_tree(tmp_path, splits=("val",), classes=("a", "zebra"))
    assert "zebra" in raises_naming(tmp_path / "val", name="imagefolder", data_dir=tmp_path)


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_dir_without_batches(tmp_path, name):
    # download=False: the default (None) would fetch the data set instead of reporting it missing.
    message = raises_naming(tmp_path, name=name, data_dir=tmp_path, download=False)
    assert "--download" in message and {"cifar10": "test_batch", "cifar100": "meta"}[name] in message


def test_cifar_corrupted_batches(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for f in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"]:
        (folder / f).write_bytes(b"not a pickle")
    assert "corrupted" in raises_naming(tmp_path, name="cifar10", data_dir=tmp_path)


def test_fashion_mnist_dir_without_files(tmp_path):
    assert "--download" in raises_naming(tmp_path, name="fashion-mnist", data_dir=tmp_path, download=False)


def test_fashion_mnist_malformed_file(tmp_path):
    make_fashion_files(tmp_path, gz=False)
    (tmp_path / "train-images-idx3-ubyte").write_bytes(b"\x00\x00\x08\x03short")
    raises_naming(tmp_path / "train-images-idx3-ubyte", name="fashion-mnist", data_dir=tmp_path)


def test_bad_augment_and_download_flags():
    with pytest.raises(UserInputError, match="cutout"):
        build_datasets("fashion-mini", augment=AugmentConfig(cutout=40))
    with pytest.raises(UserInputError, match="--download"):
        build_datasets("fashion-mini", download=True)


def make_fake_cifar10(root: Path) -> Path:
    """A tiny CIFAR-10 python layout (test data only; the real one comes from --download)."""
    import pickle

    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {"data": rng.integers(0, 256, (4, 3072), dtype=np.uint8), "labels": [0, 1, 2, 3]}
        (folder / name).write_bytes(pickle.dumps(batch))
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": [str(i) for i in range(10)]}))
    return folder


def test_cifar_layout_loads_from_parent_or_batches_folder(tmp_path, monkeypatch):
    from torchvision.datasets import cifar

    # The fake batches cannot match torchvision's checksums of the real files.
    monkeypatch.setattr(cifar, "check_integrity", lambda *args, **kwargs: True)
    folder = make_fake_cifar10(tmp_path)
    for data_dir in (tmp_path, folder):
        ds = build_datasets("cifar10", data_dir=data_dir)
        assert (len(ds.train), len(ds.test), ds.augment.cutout) == (20, 4, 16)
        assert ds.train[0][0].shape == (3, 32, 32)
