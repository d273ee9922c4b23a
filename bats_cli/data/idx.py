"""Reader for the IDX files of (Fashion-)MNIST, plain or gzipped, with numpy only."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

from bats_cli.core.errors import UserInputError

# Fashion-MNIST file stems; each may also be stored gzipped (".gz").
FASHION_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
# IDX magic numbers of unsigned-byte arrays with 3 (images) and 1 (labels) dimensions.
_MAGIC = {3: 0x00000803, 1: 0x00000801}
# Fashion-MNIST's largest file is 47 MB; four times that is still far from a bomb.
MAX_IDX_BYTES = 200 * 1024 * 1024


def find_idx_file(folder: Path, stem: str) -> Path | None:
    """The plain or gzipped file ``stem`` in ``folder``, or None."""
    for name in (stem, stem + ".gz"):
        if (folder / name).is_file():
            return folder / name
    return None


def read_idx(path: Path, *, ndim: int) -> np.ndarray:
    """A uint8 array from an IDX file; a malformed file is a UserInputError naming it."""
    if not path.is_file():
        raise UserInputError(f"{path} is not a regular file (a FIFO or device?); expected an IDX file")
    try:
        with (gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")) as fh:
            # Bounded by bytes actually read: a gzip bomb stops here, not in memory.
            raw = fh.read(MAX_IDX_BYTES + 1)
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise UserInputError(f"cannot read {path}: {exc}") from None
    if len(raw) > MAX_IDX_BYTES:
        raise UserInputError(f"{path} holds more than {MAX_IDX_BYTES:,} bytes; not a (Fashion-)MNIST file")
    header = 4 + 4 * ndim
    if len(raw) < header or int.from_bytes(raw[:4], "big") != _MAGIC[ndim]:
        raise UserInputError(f"{path} is not an IDX file of {ndim}-d unsigned bytes")
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    if len(raw) != header + int(np.prod(shape)):
        raise UserInputError(f"{path} is truncated: its header says shape {shape}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def read_fashion_split(folder: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(images N×28×28, labels N) of one split from a folder holding the four IDX files."""
    image_stem, label_stem = FASHION_FILES[split]
    images = read_idx(find_idx_file(folder, image_stem), ndim=3)
    labels = read_idx(find_idx_file(folder, label_stem), ndim=1)
    if len(images) != len(labels):
        raise UserInputError(f"{folder}: {len(images)} {split} images but {len(labels)} labels")
    if len(labels) and int(labels.max()) >= 10:
        raise UserInputError(
            f"{find_idx_file(folder, label_stem)}: label {int(labels.max())} is not a Fashion-MNIST "
            "class (0-9)"
        )
    return images, labels
