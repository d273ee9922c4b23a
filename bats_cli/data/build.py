"""One entry point for every data set: name + directory -> (train, test, spec)."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path

from torch.utils.data import Dataset, Subset
from torchvision import transforms as T

from bats_cli.core.errors import UserInputError
from bats_cli.data import sources
from bats_cli.data.loader import balanced_subset, holdout_split
from bats_cli.data.spec import (
    SMALL_IMAGE_MAX,
    AugmentConfig,
    DataSpec,
    canonical_name,
    check_image_size,
    fixed_spec,
    imagefolder_spec,
)
from bats_cli.data.transforms import eval_transform, train_transform

_NO_DOWNLOAD = {
    "fashion-mini": "it ships inside the package and needs no --data-dir",
    "imagenet": "get ILSVRC-2012 from https://image-net.org and sort it into train/<class>/ and val/<class>/",
    "imagefolder": "point --data-dir at a folder with train/<class>/*.jpg and val/<class>/*.jpg",
}
# Data sets torchvision can fetch; the default for them is to download when missing.
DOWNLOADABLE = ("fashion-mnist", "cifar10", "cifar100")
# Side of the images as each fixed-size source stores them.
_STORED_SIDE = {"fashion-mini": 32, "fashion-mnist": 28, "cifar10": 32, "cifar100": 32}


@dataclass
class Datasets:
    """Train and test splits (test = val/ for ImageFolder layouts), their spec and augmentation.

    ``val`` is what a run validates on per epoch (and picks ``best`` by): the test split, or with
    ``holdout`` a part carved from the training split, so that the test split is read only once,
    by ``bats eval``."""

    train: Dataset
    test: Dataset
    spec: DataSpec
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    val: Dataset | None = None
    holdout: int | None = None

    def __post_init__(self) -> None:
        if self.val is None:
            self.val = self.test


def describe_spec(
    name: str, data_dir: str | Path | None = None, image_size: int | None = None
) -> DataSpec:
    """The spec without loading the data (imagefolder reads folder names and one image header)."""
    key = canonical_name(name)
    check_image_size(image_size)
    return _spec_and_native_side(key, data_dir, image_size)[0]


def build_datasets(
    name: str,
    *,
    data_dir: str | Path | None = None,
    download: bool | None = None,
    subset: int | None = None,
    image_size: int | None = None,
    augment: AugmentConfig | None = None,
    seed: int = 0,
    holdout: int | None = None,
) -> Datasets:
    """Load a data set with the paper's transforms; ``augment=None`` means the paper default.

    ``download=None`` fetches torchvision's data sets when they are missing (False forbids it).
    """
    key = canonical_name(name)
    check_image_size(image_size)
    spec, native = _spec_and_native_side(key, data_dir, image_size)
    if download and key not in DOWNLOADABLE:
        raise UserInputError(f"--download is not available for {key}; {_NO_DOWNLOAD[key]}")
    download = key in DOWNLOADABLE if download is None else download
    augment = AugmentConfig.paper_default(key) if augment is None else augment
    augment.validate(spec.image_size)
    prepare = _prepare_steps(key, spec, native)
    train_tf, test_tf = train_transform(spec, augment, prepare), eval_transform(spec, prepare)
    train, test = _load(key, data_dir, download, train_tf, test_tf)
    train_part, val = balanced_subset(train, subset, seed=seed), None
    if holdout:
        # The held-out images are served without augmentation: the same files, evaluation transforms.
        eval_view = copy.copy(train)
        eval_view.transform = test_tf
        train_part, val = holdout_split(train_part, holdout, seed=seed,
                                        eval_view=_same_indices(train_part, eval_view))
    return Datasets(
        train=train_part,
        test=balanced_subset(test, subset, seed=seed),
        spec=spec,
        augment=augment,
        val=val,
        holdout=holdout or None,
    )


def _same_indices(view: Dataset, base: Dataset) -> Dataset:
    """``base`` indexed as ``view`` indexes its own parent (a subset's indices, or all of it)."""
    return Subset(base, list(view.indices)) if isinstance(view, Subset) else base


def _spec_and_native_side(key: str, data_dir, image_size: int | None) -> tuple[DataSpec, int | None]:
    """The spec and the side of the images as stored (None: ImageNet, resized anyway)."""
    if key == "imagefolder":
        num_classes, native = sources.probe_image_folder(data_dir, key)
        return imagefolder_spec(num_classes, image_size or _default_folder_size(native)), native
    if key == "imagenet":
        # Without a directory (e.g. `bats flops`) assume the full 1000-class ImageNet.
        num_classes = None if data_dir is None else sources.count_classes(data_dir, key)
        return fixed_spec(key, num_classes=num_classes, image_size=image_size), None
    return fixed_spec(key, image_size=image_size), _STORED_SIDE[key]


def _default_folder_size(native: int) -> int:
    # Small images keep their size (CIFAR network); larger ones follow the ImageNet 224 crop.
    return native if native <= SMALL_IMAGE_MAX else 224


def _prepare_steps(key: str, spec: DataSpec, native: int | None) -> list:
    """Deterministic steps that bring raw images to the spec's square size (CIFAR network only)."""
    if spec.network != "cifar":
        return []
    steps = []
    if key == "fashion-mnist":
        # Zero-pad 28 -> 32 as fashion-mini is stored, so both feed the same network.
        steps, native = [T.Pad(2)], 32
    if key == "imagefolder" or native != spec.image_size:
        # Folder images may differ in size or aspect; the CIFAR pipeline needs one square size.
        steps.append(T.Resize((spec.image_size, spec.image_size)))
    return steps


def _load(key: str, data_dir, download: bool, train_tf, test_tf) -> tuple[Dataset, Dataset]:
    if key == "fashion-mini":
        return sources.load_fashion_mini(train_tf, test_tf)
    if key == "fashion-mnist":
        return sources.load_fashion_mnist(data_dir, download, train_tf, test_tf)
    if key in ("cifar10", "cifar100"):
        return sources.load_cifar(key, data_dir, download, train_tf, test_tf)
    return sources.load_image_folders(data_dir, key, train_tf, test_tf)
