"""Names, shapes and statistics of the data sets, and the augmentation settings (paper §6.2)."""

from __future__ import annotations

from dataclasses import dataclass, replace

from bats_cli.core.errors import UserInputError

DATASETS: tuple[str, ...] = (
    "fashion-mini",
    "fashion-mnist",
    "cifar10",
    "cifar100",
    "imagenet",
    "imagefolder",
)

# Above this side length an ImageFolder tree gets the ImageNet network and transforms.
SMALL_IMAGE_MAX = 64

# Per-channel statistics of the training sets (Fashion-MNIST: zero-padded to 32x32, as we feed it).
CIFAR10_STATS = ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
CIFAR100_STATS = ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))
IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
FASHION_STATS = ((0.2190,), (0.3318,))

FASHION_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)


@dataclass(frozen=True)
class DataSpec:
    """What a network needs to know about a data set."""

    name: str
    num_classes: int
    image_size: int
    in_channels: int
    network: str  # "cifar" or "imagenet": which stem / network family fits these images
    mean: tuple[float, ...]
    std: tuple[float, ...]


@dataclass(frozen=True)
class AugmentConfig:
    """Optional augmentations on top of the standard crop + flip.

    cutout: side in pixels of the one square hole (None: off); mixup: Beta alpha (None: off,
    applied per batch by the trainer with :func:`mixup`); autoaugment: torchvision AutoAugment.
    """

    cutout: int | None = None
    mixup: float | None = None
    autoaugment: bool = False

    @classmethod
    def paper_default(cls, dataset_name: str) -> AugmentConfig:
        """§6.2: Cutout 16 px for CIFAR-10, MixUp alpha=0.2 for CIFAR-100, nothing else."""
        name = canonical_name(dataset_name)
        if name == "cifar10":
            return cls(cutout=16)
        if name == "cifar100":
            return cls(mixup=0.2)
        return cls()

    def validate(self, image_size: int) -> None:
        """Raise UserInputError for settings that cannot be applied to images of this size."""
        if self.cutout is not None and not 0 < self.cutout < image_size:
            raise UserInputError(
                f"cutout size must be between 1 and {image_size - 1} px for {image_size} px images, "
                f"got {self.cutout}"
            )
        if self.mixup is not None and not self.mixup > 0:
            raise UserInputError(f"mixup alpha must be > 0, got {self.mixup}")


def canonical_name(name: str) -> str:
    """The DATASETS entry for a user-typed name (case and '_' vs '-' do not matter)."""
    key = str(name).strip().lower().replace("_", "-")
    if key not in DATASETS:
        raise UserInputError(f"unknown dataset {name!r}; choose one of: {', '.join(DATASETS)}")
    return key


def network_for(image_size: int) -> str:
    """The network family for square images of this side."""
    return "cifar" if image_size <= SMALL_IMAGE_MAX else "imagenet"


# The data sets whose shape does not depend on files: the one table of classes, sides, channels
# and network families (``counting.dataset_shape`` reads it too). Fashion-MNIST's 28 px images
# are fed zero-padded to 32 px.
FIXED_SPECS: dict[str, DataSpec] = {
    "cifar10": DataSpec("cifar10", 10, 32, 3, "cifar", *CIFAR10_STATS),
    "cifar100": DataSpec("cifar100", 100, 32, 3, "cifar", *CIFAR100_STATS),
    "imagenet": DataSpec("imagenet", 1000, 224, 3, "imagenet", *IMAGENET_STATS),
    "fashion-mini": DataSpec("fashion-mini", 10, 32, 1, "cifar", *FASHION_STATS),
    "fashion-mnist": DataSpec("fashion-mnist", 10, 32, 1, "cifar", *FASHION_STATS),
}


def fixed_spec(name: str, *, num_classes: int | None = None, image_size: int | None = None) -> DataSpec:
    """The spec of a data set whose shape does not depend on files (all but imagefolder); only
    ImageNet's class count follows its directory. A larger ``image_size`` of small images only
    resizes them for the CIFAR network."""
    try:
        spec = FIXED_SPECS[name]
    except KeyError:
        raise ValueError(f"{name} has no fixed spec") from None
    classes = (num_classes or spec.num_classes) if name == "imagenet" else spec.num_classes
    return replace(spec, num_classes=classes, image_size=image_size or spec.image_size)


def imagefolder_spec(num_classes: int, image_size: int) -> DataSpec:
    """Spec of a generic ImageFolder tree; ImageNet statistics stand in for its own (no full pass)."""
    return DataSpec("imagefolder", num_classes, image_size, 3, network_for(image_size), *IMAGENET_STATS)


MAX_IMAGE_SIZE = 4096


def check_image_size(image_size: int | None) -> None:
    """Raise UserInputError for an image size no network can take."""
    if image_size is not None and image_size < 8:
        raise UserInputError(f"image size must be at least 8 px, got {image_size}")
    if image_size is not None and image_size > MAX_IMAGE_SIZE:
        # 18x ImageNet's 224: beyond it one image's activations alone exhaust any machine.
        raise UserInputError(f"image size {image_size} px is absurd; at most {MAX_IMAGE_SIZE} px")
