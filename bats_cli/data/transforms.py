"""Per-sample transforms (paper §6.2) and batch-level MixUp, all from torchvision.

Every random choice is drawn from torch's global RNG, which the loader seeds per sample
(see ``loader.SeededView``); this is what makes augmentation reproducible on resume.
"""

from __future__ import annotations

import torch
from torchvision import transforms as T
from torchvision.transforms import v2

from bats_cli.data.rng import seeded_cpu_rng
from bats_cli.data.spec import AugmentConfig, DataSpec

# ImageNet convention (paper §6.2): resize to 256x256, crop 224; scaled for other crop sizes.
_RESIZE_RATIO = 256 / 224


def train_transform(spec: DataSpec, augment: AugmentConfig, prepare: list | None = None) -> T.Compose:
    """Crop + flip (+ AutoAugment), tensor, normalise (+ Cutout) for the spec's network family."""
    steps = list(prepare or [])
    if spec.network == "cifar":
        steps += [T.RandomCrop(spec.image_size, padding=4), T.RandomHorizontalFlip()]
        policy = T.AutoAugmentPolicy.CIFAR10
    else:
        side = _resize_side(spec.image_size)
        steps += [T.Resize(side), T.RandomCrop(spec.image_size), T.RandomHorizontalFlip()]
        policy = T.AutoAugmentPolicy.IMAGENET
    if augment.autoaugment:
        steps.append(T.AutoAugment(policy))
    steps += [T.ToTensor(), T.Normalize(spec.mean, spec.std)]
    if augment.cutout:
        steps.append(cutout(augment.cutout, spec.image_size))
    return T.Compose(steps)


def eval_transform(spec: DataSpec, prepare: list | None = None) -> T.Compose:
    """Deterministic: (resize + centre crop for ImageNet-style data,) tensor, normalise."""
    steps = list(prepare or [])
    if spec.network == "imagenet":
        steps += [T.Resize(_resize_side(spec.image_size)), T.CenterCrop(spec.image_size)]
    return T.Compose(steps + [T.ToTensor(), T.Normalize(spec.mean, spec.std)])


def cutout(size: int, image_size: int) -> T.RandomErasing:
    """Cutout (DeVries & Taylor 2017) with one size×size hole of zeros after normalisation.

    torchvision has no Cutout; RandomErasing with p=1, a fixed square area and value 0 is the
    same operation except that the hole always lies fully inside the image, whereas the original
    centres it anywhere and clips it at the border (so its holes are sometimes smaller).
    """
    area = (size * size) / (image_size * image_size)
    return T.RandomErasing(p=1.0, scale=(area, area), ratio=(1.0, 1.0), value=0)


def _resize_side(crop: int) -> tuple[int, int]:
    side = round(crop * _RESIZE_RATIO)
    return (side, side)


class MixUp:
    """Batch-level MixUp (Zhang et al. 2018) via torchvision.transforms.v2.MixUp.

    ``mix(x, y)`` returns the mixed images and soft targets (rows sum to 1). Pass ``seed`` (e.g.
    ``batch_seed(seed, epoch, step)``) to make the draw independent of the global RNG, so that a
    resumed run mixes exactly like an uninterrupted one.
    """

    def __init__(self, alpha: float, num_classes: int | None = None):
        self.alpha = float(alpha)
        self.num_classes = num_classes

    def __call__(self, x: torch.Tensor, y: torch.Tensor, *, seed: int | None = None):
        num_classes = self.num_classes
        if y.ndim == 1 and num_classes is None:
            raise ValueError("MixUp needs num_classes for integer labels: mixup(alpha, num_classes=...)")
        transform = v2.MixUp(alpha=self.alpha, num_classes=num_classes)
        if seed is None:
            return transform(x, y)
        with seeded_cpu_rng(seed):
            return transform(x, y)


def mixup(alpha: float, num_classes: int | None = None) -> MixUp:
    """A batch-level MixUp callable ``(x, y[, seed=]) -> (x_mixed, soft_targets)``."""
    return MixUp(alpha, num_classes)
