"""Up-front scan of an ImageFolder tree: every file is checked before the first epoch.

Policy (docs/reliability.md): files that cannot be used — dangling or looping symbolic links,
FIFOs / devices / sockets, unreadable, empty, not an image, truncated or corrupt, larger than
``MAX_IMAGE_PIXELS`` (decompression bombs) — are skipped with a warning naming each of them;
nothing is ever opened that is not a regular file, so a FIFO cannot block the run. A directory
reached twice (a symbolic-link loop) is walked once. The data set is refused (one error line)
when a split has no usable image, a training class folder has none, or fewer than two classes
remain. Small images are decoded completely during the scan; large ones (ImageNet) only have
their header read, and one that fails to decode later is replaced by the next readable image of
the split, with a warning naming it, instead of stopping the epoch.
"""

from __future__ import annotations

import errno
import os
import stat
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image
from torch.utils.data import Dataset

from bats_cli.core.errors import RunFailure, UserInputError
from bats_cli.core.names import safe_text

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
# Far above any photo a classifier is trained on (ImageNet's largest is ~ 20 Mpx), far below
# what a decompression bomb claims; PIL's own limit (89 Mpx warning, 179 Mpx error) is looser.
MAX_IMAGE_PIXELS = 64 * 1024 * 1024
# Images this small are decoded completely during the scan (as cheap as reading the header).
FULL_DECODE_PIXELS = 128 * 128
# Skipped files named one per line; the rest are counted.
MAX_WARNINGS = 20


class BadImage(Exception):
    """A file that is not a usable image; the message says why."""


@dataclass
class FolderScan:
    """What the scan of one split (``train/`` or ``val/``) found."""

    root: Path
    classes: list[str]
    samples: list[tuple[str, int]] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def count(self, class_index: int) -> int:
        return sum(1 for _, t in self.samples if t == class_index)


def class_folders(split_dir: Path) -> list[str]:
    """Sorted names of the class folders in ``split_dir`` (links to folders count, hidden do not)."""
    try:
        entries = list(os.scandir(split_dir))
    except OSError as exc:
        raise UserInputError(f"cannot read {split_dir}: {exc.strerror or exc}") from None
    names = []
    for entry in entries:
        if entry.name.startswith("."):
            continue
        try:
            if entry.is_dir(follow_symlinks=True):
                names.append(entry.name)
        except OSError:
            continue  # a looping link to nothing: not a class folder
    return sorted(names)


def _regular_file(path: str) -> None:
    """BadImage unless ``path`` is (a link to) a non-empty regular file; never opens it."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise BadImage(
            "dangling symbolic link" if os.path.islink(path) else "file vanished"
        ) from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise BadImage("symbolic link loop") from None
        raise BadImage(exc.strerror or str(exc)) from None
    if not stat.S_ISREG(st.st_mode):
        kind = "a FIFO" if stat.S_ISFIFO(st.st_mode) else "a device or socket"
        raise BadImage(f"not a regular file ({kind}); never opened")
    if st.st_size == 0:
        raise BadImage("empty file")


def _open_checked(path: str, use) -> object:
    """``use(image)`` on the opened image after the size check; every failure is BadImage."""
    _regular_file(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                width, height = image.size
                if width * height > MAX_IMAGE_PIXELS:
                    raise BadImage(
                        f"{width}x{height} pixels exceeds the limit of {MAX_IMAGE_PIXELS:,} "
                        "(a decompression bomb?)"
                    )
                return use(image)
    except BadImage:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise BadImage(f"decompression bomb ({exc})") from None
    except PermissionError:
        raise BadImage("permission denied") from None
    except Exception as exc:  # PIL raises many types (OSError, SyntaxError, ValueError, ...)
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise BadImage(f"not a readable image ({reason})") from None


def check_image_file(path: str, *, decode: bool | None = None) -> tuple[int, int]:
    """(width, height) of a usable image, or BadImage saying why it is not usable.

    ``decode=None`` decodes small images completely and reads only the header of large ones.
    """

    def inspect(image):
        width, height = image.size
        if decode or (decode is None and width * height <= FULL_DECODE_PIXELS):
            image.load()
        return width, height

    return _open_checked(path, inspect)


def load_rgb(path: str) -> Image.Image:
    """The image as RGB (as torchvision's loader), with the scan's checks; BadImage otherwise."""
    return _open_checked(path, lambda image: image.convert("RGB"))


def scan_split(split_dir: Path, classes: list[str] | None = None) -> FolderScan:
    """Every usable image of ``split_dir/<class>/**`` with its class index, and what was skipped."""
    classes = class_folders(split_dir) if classes is None else list(classes)
    scan = FolderScan(root=split_dir, classes=classes)
    # Shared by every class: a folder or image reached twice (through links) counts once.
    visited: set[tuple[int, int]] = set()
    seen_files: set[str] = set()
    for index, name in enumerate(classes):
        class_dir = split_dir / name
        if not class_dir.is_dir():
            continue  # a val/ split may lack a class
        _walk(class_dir, index, scan, visited=visited, seen_files=seen_files)
    return scan


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def _walk(top: Path, index: int, scan: FolderScan, visited: set[tuple[int, int]],
          seen_files: set[str]) -> None:
    root = os.path.realpath(top)
    stack = [str(top)]
    while stack:
        folder = stack.pop()
        try:
            st = os.stat(folder)
        except OSError as exc:
            scan.skipped.append((folder, exc.strerror or str(exc)))
            continue
        real = os.path.realpath(folder)
        if not _inside(real, root):
            # A folder link out of its class would label another class's (or split's) images
            # with this class.
            scan.skipped.append((folder, f"a link that leads out of its class folder (to {real})"))
            continue
        key = (st.st_dev, st.st_ino)
        if key in visited:
            scan.skipped.append((folder, "folder already walked (a symbolic-link loop or a second link)"))
            continue
        visited.add(key)
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as exc:
            scan.skipped.append((folder, f"cannot list it ({exc.strerror or exc})"))
            continue
        subfolders = []
        for entry in entries:
            if entry.name.startswith("."):
                continue
            try:
                is_dir = entry.is_dir(follow_symlinks=True)
            except OSError:
                is_dir = False
            if is_dir:
                subfolders.append(entry.path)
                continue
            if not entry.name.lower().endswith(IMAGE_EXTENSIONS):
                continue  # README.txt and the like are not part of the data set
            real = os.path.realpath(entry.path)
            if real in seen_files:
                scan.skipped.append((entry.path, "the same image file as one already used (a link)"))
                continue
            try:
                check_image_file(entry.path)
            except BadImage as exc:
                scan.skipped.append((entry.path, str(exc)))
                continue
            seen_files.add(real)
            scan.samples.append((entry.path, index))
        # Reversed so that the stack walks subfolders in name order.
        stack.extend(reversed(subfolders))


def warn_skipped(scan: FolderScan, stream=None) -> None:
    """One warning per skipped file (the first MAX_WARNINGS), then a count."""
    if not scan.skipped:
        return
    stream = stream if stream is not None else sys.stderr
    for path, reason in scan.skipped[:MAX_WARNINGS]:
        print(f"warning: skipped {safe_text(path)}: {safe_text(reason)}", file=stream)
    more = len(scan.skipped) - MAX_WARNINGS
    tail = f" ({more} more not listed)" if more > 0 else ""
    print(
        f"warning: {safe_text(scan.root)}: {len(scan.skipped)} file(s) skipped{tail}; "
        f"{len(scan.samples)} images used",
        file=stream,
        flush=True,
    )


class FolderImages(Dataset):
    """The images a scan found, loaded as RGB like torchvision's ImageFolder.

    ``samples``, ``targets``, ``classes`` and ``class_to_idx`` as in ImageFolder. An image that
    fails to load although the scan passed it (a large one, or changed since) is replaced by
    the next readable one, with a warning naming it, so an epoch never stops half-way.
    """

    def __init__(self, scan: FolderScan, transform=None) -> None:
        self.root = str(scan.root)
        self.classes = list(scan.classes)
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        self.samples = list(scan.samples)
        self.imgs = self.samples
        self.targets = [t for _, t in self.samples]
        self.transform = transform
        self._warned: set[str] = set()

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        n = len(self.samples)
        for offset in range(n):
            path, target = self.samples[(index + offset) % n]
            try:
                image = load_rgb(path)
            except BadImage as exc:
                if path not in self._warned:
                    self._warned.add(path)
                    print(
                        f"warning: skipped {safe_text(path)}: {safe_text(exc)}; "
                        "using the next image of the split in its place",
                        file=sys.stderr,
                        flush=True,
                    )
                continue
            if self.transform is not None:
                image = self.transform(image)
            return image, target
        raise RunFailure(f"{self.root}: no image of the split can be read any more")
