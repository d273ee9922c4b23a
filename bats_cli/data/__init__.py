"""Data sets behind one interface, augmentation, deterministic loading and the search split (§6.2).

    ds = build_datasets("fashion-mini")                    # embedded, no download
    ds = build_datasets("cifar10", data_dir="~/data", download=True)
    weights, arch = search_split(ds.train, seed=0)
    for x, y in make_loader(weights, batch_size=64, seed=0, epoch=3, skip_batches=10): ...
"""

from bats_cli.data.build import Datasets, build_datasets, describe_spec
from bats_cli.data.loader import (
    SeededView,
    ShieldedDataLoader,
    balanced_subset,
    batch_seed,
    derive_seed,
    epoch_order,
    make_loader,
    search_split,
    sharded_loader,
    steps_per_epoch,
    targets_of,
)
from bats_cli.data.spec import DATASETS, AugmentConfig, DataSpec
from bats_cli.data.transforms import (
    MixUp,
    cutout,
    eval_transform,
    mixup,
    train_transform,
)

__all__ = [
    "DATASETS",
    "AugmentConfig",
    "DataSpec",
    "Datasets",
    "MixUp",
    "SeededView",
    "ShieldedDataLoader",
    "balanced_subset",
    "batch_seed",
    "build_datasets",
    "cutout",
    "derive_seed",
    "describe_spec",
    "epoch_order",
    "make_loader",
    "mixup",
    "search_split",
    "sharded_loader",
    "steps_per_epoch",
    "targets_of",
    "eval_transform",
    "train_transform",
]
