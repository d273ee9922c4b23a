"""Raw data sets (train + test split) read from disk or from the package, with layout checks.

Every missing or malformed data directory becomes one UserInputError that names the path and
what was expected there.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from importlib import resources
from pathlib import Path

import numpy as np
from PIL import Image
from torch.utils.data import Dataset
from torchvision import datasets as tvd

from bats_cli.core.errors import RunFailure, UserInputError
from bats_cli.data.idx import FASHION_FILES, find_idx_file, read_fashion_split
from bats_cli.data.scan import (
    IMAGE_EXTENSIONS,
    BadImage,
    FolderImages,
    check_image_file,
    class_folders,
    scan_split,
    warn_skipped,
)
from bats_cli.data.spec import FASHION_CLASSES

Transform = Callable | None

FASHION_MINI_FILE = "fashion_mini.npz"
IMAGEFOLDER_EXPECTED = (
    "expected an ImageFolder tree with train/<class>/*.jpg and val/<class>/*.jpg"
)
FASHION_EXPECTED = (
    "expected the Fashion-MNIST files train-images-idx3-ubyte, train-labels-idx1-ubyte, "
    "t10k-images-idx3-ubyte and t10k-labels-idx1-ubyte (or their .gz) in it or in "
    "FashionMNIST/raw/ below it (e.g. /usr/share/datasets/fashion-mnist from the Debian package "
    "dataset-fashion-mnist); pass --download to fetch them"
)


class ArrayImageDataset(Dataset):
    """Images held as a uint8 array (N×H×W grey or N×H×W×3), served as PIL images like torchvision's."""

    def __init__(self, images: np.ndarray, targets: np.ndarray, classes, transform: Transform = None):
        self.images = images
        self.targets = [int(t) for t in targets]
        self.classes = list(classes)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        image = Image.fromarray(self.images[index])
        if self.transform is not None:
            image = self.transform(image)
        return image, self.targets[index]


def require_dir(data_dir: str | Path | None, dataset: str, expected: str) -> Path:
    """The data directory as a Path, or a UserInputError saying what is wrong with it."""
    if data_dir is None or str(data_dir) == "":
        raise UserInputError(f"dataset {dataset} needs --data-dir DIR; {expected}")
    path = Path(data_dir).expanduser()
    if not path.exists():
        raise UserInputError(f"data directory {path} does not exist; {expected}")
    if not path.is_dir():
        raise UserInputError(f"data directory {path} is a file, not a folder; {expected}")
    return path


# --- fashion-mini (embedded) -------------------------------------------------------------------


def load_fashion_mini(train_tf: Transform, test_tf: Transform) -> tuple[Dataset, Dataset]:
    """The class-balanced Fashion-MNIST subset shipped in the package (see FASHION_MINI.md)."""
    arrays = read_fashion_mini()
    classes = [str(c) for c in arrays["classes"]]
    train = ArrayImageDataset(arrays["train_images"], arrays["train_labels"], classes, train_tf)
    test = ArrayImageDataset(arrays["test_images"], arrays["test_labels"], classes, test_tf)
    return train, test


def read_fashion_mini() -> dict[str, np.ndarray]:
    """All arrays of the embedded npz (no pickle: allow_pickle=False)."""
    resource = resources.files("bats_cli.data").joinpath(FASHION_MINI_FILE)
    with resource.open("rb") as fh, np.load(fh, allow_pickle=False) as npz:
        return {key: npz[key] for key in npz.files}


# --- fashion-mnist -----------------------------------------------------------------------------


def load_fashion_mnist(
    data_dir, download: bool, train_tf: Transform, test_tf: Transform
) -> tuple[Dataset, Dataset]:
    """Full Fashion-MNIST from the IDX files, in the flat (Debian, Zalando) or torchvision layout."""
    if data_dir is None or str(data_dir) == "":
        data_dir = default_data_dir()
    if download:
        root = Path(_require_dir_arg(data_dir, "fashion-mnist", FASHION_EXPECTED)).expanduser()
        if not root.is_dir() or find_fashion_folder(root) is None:
            _download(lambda: tvd.FashionMNIST(root, train=True, download=True), "fashion-mnist",
                      root, url=tvd.FashionMNIST.mirrors[0])
    root = require_dir(data_dir, "fashion-mnist", FASHION_EXPECTED)
    folder = find_fashion_folder(root)
    if folder is None:
        raise UserInputError(f"data directory {root} has no Fashion-MNIST files; {FASHION_EXPECTED}")
    splits = [read_fashion_split(folder, split) for split in ("train", "test")]
    train = ArrayImageDataset(*splits[0], FASHION_CLASSES, train_tf)
    test = ArrayImageDataset(*splits[1], FASHION_CLASSES, test_tf)
    return train, test


def find_fashion_folder(root: Path) -> Path | None:
    """The folder holding all four IDX files: root itself or torchvision's root/FashionMNIST/raw."""
    stems = [stem for pair in FASHION_FILES.values() for stem in pair]
    for folder in (root, root / "FashionMNIST" / "raw", root / "raw"):
        if all(find_idx_file(folder, stem) is not None for stem in stems):
            return folder
    return None


# --- cifar10 / cifar100 ------------------------------------------------------------------------


def load_cifar(
    name: str, data_dir, download: bool, train_tf: Transform, test_tf: Transform
) -> tuple[Dataset, Dataset]:
    """torchvision CIFAR10/100 over the python-pickle batches, downloaded when missing and allowed.

    Without ``data_dir`` the data lives in :func:`default_data_dir`.
    """
    cls = tvd.CIFAR10 if name == "cifar10" else tvd.CIFAR100
    expected = _cifar_expected(cls)
    given = data_dir is not None and str(data_dir) != ""
    if given:
        root = Path(_require_dir_arg(data_dir, name, expected)).expanduser()
    else:
        root = default_data_dir()
    root = _cifar_root(root, cls) if root.is_dir() else root
    missing = _cifar_missing(root, cls)
    if missing and download:
        _download(lambda: cls(root, train=True, download=True), name, root, url=cls.url)
        missing = _cifar_missing(root, cls)
    if missing:
        if not given:
            raise UserInputError(
                f"{name} is not in the default data directory {root} and --no-download forbids "
                f"fetching it; pass --data-dir DIR holding it or drop --no-download, or try offline "
                f"with --preset tiny (or --dataset fashion-mini); {expected}"
            )
        if not root.is_dir():
            raise UserInputError(f"data directory {root} does not exist; {expected}")
        raise UserInputError(
            f"data directory {root} has no {cls.__name__} data (missing {', '.join(missing)}); {expected}"
        )
    try:
        return cls(root, train=True, transform=train_tf), cls(root, train=False, transform=test_tf)
    except (RuntimeError, OSError, ValueError, EOFError) as exc:
        raise UserInputError(
            f"the {cls.__name__} files in {root / cls.base_folder} are corrupted ({exc}); "
            f"delete them to fetch them again"
        ) from None


def default_data_dir() -> Path:
    """Where torchvision data sets go without --data-dir: $XDG_CACHE_HOME/bats/datasets."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "bats" / "datasets"


def _cifar_expected(cls) -> str:
    files = [f for f, _ in cls.train_list + cls.test_list] + [cls.meta["filename"]]
    return (
        f"expected the python version of {cls.__name__} from https://www.cs.toronto.edu/~kriz/cifar.html: "
        f"{cls.base_folder}/{{{','.join(files)}}}; --download (the default) fetches it"
    )


def _cifar_root(path: Path, cls) -> Path:
    # Accept --data-dir pointing at the extracted folder itself as well as at its parent.
    if path.name == cls.base_folder and not (path / cls.base_folder).is_dir():
        return path.parent
    return path


def _cifar_missing(root: Path, cls) -> list[str]:
    files = [f for f, _ in cls.train_list + cls.test_list] + [cls.meta["filename"]]
    return [f"{cls.base_folder}/{f}" for f in files if not (root / cls.base_folder / f).is_file()]


# --- imagenet / imagefolder --------------------------------------------------------------------


def load_image_folders(
    data_dir, dataset: str, train_tf: Transform, test_tf: Transform
) -> tuple[Dataset, Dataset]:
    """The images of DIR/train and DIR/val after the up-front scan (see ``data/scan.py``).

    val/ is labelled by the train class list. Unusable files are skipped with a warning naming
    each; a split without images, an empty training class or fewer than two classes is refused.
    """
    root = require_split_dirs(data_dir, dataset)
    train_classes = class_folders(root / "train")
    extra = sorted(set(class_folders(root / "val")) - set(train_classes))
    if extra:
        raise UserInputError(
            f"{root / 'val'} has class folders that train/ lacks ({', '.join(extra[:5])}); "
            f"{IMAGEFOLDER_EXPECTED}"
        )
    train_scan = scan_split(root / "train", train_classes)
    warn_skipped(train_scan)
    _check_train_scan(train_scan)
    test_scan = scan_split(root / "val", train_classes)
    warn_skipped(test_scan)
    if not test_scan.samples:
        raise UserInputError(
            f"{root / 'val'} holds no usable images{_skipped_note(test_scan)}; {IMAGEFOLDER_EXPECTED}"
        )
    return FolderImages(train_scan, train_tf), FolderImages(test_scan, test_tf)


def _skipped_note(scan) -> str:
    return f" ({len(scan.skipped)} unusable file(s) skipped)" if scan.skipped else ""


def _check_train_scan(scan) -> None:
    if not scan.samples:
        raise UserInputError(
            f"{scan.root} holds no usable images{_skipped_note(scan)}; {IMAGEFOLDER_EXPECTED}"
        )
    empty = [c for i, c in enumerate(scan.classes) if scan.count(i) == 0]
    if empty:
        raise UserInputError(
            f"{scan.root / empty[0]}: a class folder without usable images"
            + (f" ({len(empty) - 1} more like it)" if len(empty) > 1 else "")
            + "; add images or remove the folder"
        )
    if len(scan.classes) < 2:
        raise UserInputError(
            f"{scan.root} has {len(scan.classes)} class folder(s); classification needs at "
            f"least two; {IMAGEFOLDER_EXPECTED}"
        )


def require_split_dirs(data_dir, dataset: str) -> Path:
    """DIR with train/ and val/ sub-folders, or a UserInputError naming what is missing."""
    root = require_dir(data_dir, dataset, IMAGEFOLDER_EXPECTED)
    for split in ("train", "val"):
        if not (root / split).is_dir():
            raise UserInputError(f"data directory {root} has no {split}/ folder; {IMAGEFOLDER_EXPECTED}")
    return root


def count_classes(data_dir, dataset: str) -> int:
    """Number of class folders under DIR/train (at least two)."""
    root = require_split_dirs(data_dir, dataset)
    classes = class_folders(root / "train")
    if not classes:
        raise UserInputError(f"{root / 'train'} has no class folders; {IMAGEFOLDER_EXPECTED}")
    if len(classes) < 2:
        raise UserInputError(
            f"{root / 'train'} has one class folder ({classes[0]}); classification needs at "
            f"least two; {IMAGEFOLDER_EXPECTED}"
        )
    return len(classes)


def probe_image_folder(data_dir, dataset: str) -> tuple[int, int]:
    """(number of classes, longer side of the first usable training image), reading headers only."""
    num_classes = count_classes(data_dir, dataset)
    train_dir = Path(data_dir).expanduser() / "train"
    for class_name in class_folders(train_dir):
        try:
            entries = sorted(os.scandir(train_dir / class_name), key=lambda e: e.name)
        except OSError:
            continue
        for entry in entries:
            if entry.name.startswith(".") or not entry.name.lower().endswith(IMAGE_EXTENSIONS):
                continue
            try:
                width, height = check_image_file(entry.path, decode=False)
            except BadImage:
                continue  # the scan names it when the data set is loaded
            return num_classes, max(width, height)
    raise UserInputError(f"{train_dir} holds no usable images; {IMAGEFOLDER_EXPECTED}")


# --- helpers -----------------------------------------------------------------------------------


def _require_dir_arg(data_dir, dataset: str, expected: str) -> Path:
    if data_dir is None or str(data_dir) == "":
        raise UserInputError(f"dataset {dataset} needs --data-dir DIR (where to download it); {expected}")
    path = Path(data_dir).expanduser()
    if path.exists() and not path.is_dir():
        raise UserInputError(f"data directory {path} is a file, not a folder; {expected}")
    return path


# Seconds to wait for a name lookup / connection before calling the machine offline, and for
# each read of a running download: a missing network must fail in seconds, not hang.
NETWORK_TIMEOUT_S = 15.0


def _offline_message(what: str, root: Path, reason: str) -> str:
    return (
        f"{what} is not in {root} and cannot be downloaded ({reason}); put it there, pass "
        f"--data-dir DIR holding it, or try offline with --preset tiny (or --dataset fashion-mini)"
    )


def _probe_network(url: str) -> str | None:
    """None when ``url``'s host answers a TCP connection, else why not (bounded in time)."""
    import socket
    import threading
    import urllib.parse
    import urllib.request

    if urllib.request.getproxies():
        return None  # behind a proxy a direct connection says nothing; the read timeout bounds it
    parsed = urllib.parse.urlsplit(url)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    outcome: list[str | None] = []

    def connect() -> None:
        try:
            socket.create_connection((parsed.hostname, port), timeout=NETWORK_TIMEOUT_S).close()
            outcome.append(None)
        except OSError as exc:
            outcome.append(f"no connection to {parsed.hostname}: {exc.strerror or exc}")

    # A daemon thread: the name lookup itself has no timeout of its own.
    worker = threading.Thread(target=connect, daemon=True)
    worker.start()
    worker.join(NETWORK_TIMEOUT_S + 1)
    return outcome[0] if outcome else f"no answer from {parsed.hostname} in {NETWORK_TIMEOUT_S:.0f} s"


def _download(fetch, what: str, root: Path, *, url: str | None = None) -> None:
    """Run ``fetch`` (a torchvision download); an unreachable network is bad input, naming the fixes."""
    import socket
    import urllib.error

    if url is not None:
        reason = _probe_network(url)
        if reason is not None:
            raise UserInputError(_offline_message(what, root, reason))
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(NETWORK_TIMEOUT_S)
    try:
        root.mkdir(parents=True, exist_ok=True)
        fetch()
    except (urllib.error.URLError, socket.timeout, ConnectionError) as exc:
        raise UserInputError(_offline_message(what, root, f"download failed: {exc}")) from None
    except (OSError, RuntimeError) as exc:
        # Anything else (disk full, a corrupted archive) is the run failing, not bad input.
        raise RunFailure(f"could not download {what} into {root}: {exc}") from None
    finally:
        socket.setdefaulttimeout(previous)
