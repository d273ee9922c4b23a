#!/usr/bin/env python3
"""Build bats_cli/data/fashion_mini.npz: a seeded, class-balanced subset of real Fashion-MNIST.

Source: the four IDX files of Fashion-MNIST (Xiao, Rasul, Vollgraf 2017; MIT licence), e.g. from
Debian's `apt-get install dataset-fashion-mnist` (/usr/share/datasets/fashion-mnist). The output is
byte-for-byte the same for the same source, counts and seed.

    python tools/make_fashion_mini.py [--source DIR] [--train-per-class 250] [--test-per-class 50]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bats_cli.data.idx import read_fashion_split  # noqa: E402
from bats_cli.data.spec import FASHION_CLASSES  # noqa: E402

DEFAULT_SOURCE = Path("/usr/share/datasets/fashion-mnist")
DEFAULT_OUT = REPO / "bats_cli" / "data" / "fashion_mini.npz"
PAD = 2  # 28 -> 32 px, the CIFAR network's input size
# A fixed timestamp inside the zip keeps the file byte-identical across runs.
ZIP_TIME = (1980, 1, 1, 0, 0, 0)


def pick_balanced(labels: np.ndarray, per_class: int, rng: np.random.Generator) -> np.ndarray:
    """per_class indices of every class, drawn without replacement, in source order."""
    chosen = [rng.choice(np.flatnonzero(labels == c), per_class, replace=False) for c in range(10)]
    return np.sort(np.concatenate(chosen))


def build_arrays(source: Path, train_per_class: int, test_per_class: int, seed: int) -> dict:
    """The arrays stored in the npz (uint8 images padded to 32x32, uint8 labels, source indices)."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, per_class in (("train", train_per_class), ("test", test_per_class)):
        images, labels = read_fashion_split(source, split)
        index = pick_balanced(labels, per_class, rng)
        arrays[f"{split}_images"] = np.pad(images[index], ((0, 0), (PAD, PAD), (PAD, PAD)))
        arrays[f"{split}_labels"] = labels[index].astype(np.uint8)
        arrays[f"{split}_source_index"] = index.astype(np.uint16)
    arrays["classes"] = np.array(FASHION_CLASSES)
    return arrays


def write_npz(path: Path, arrays: dict) -> None:
    """A deterministic compressed npz (readable by np.load(allow_pickle=False)), written atomically."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(fd)
    try:
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zf:
            for name, array in arrays.items():
                info = zipfile.ZipInfo(name + ".npy", date_time=ZIP_TIME)
                info.compress_type = zipfile.ZIP_DEFLATED
                with zf.open(info, "w") as fh:
                    np.lib.format.write_array(fh, np.ascontiguousarray(array), allow_pickle=False)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=DEFAULT_SOURCE, help="folder with the IDX files")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--train-per-class", type=int, default=250)
    parser.add_argument("--test-per-class", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    arrays = build_arrays(args.source, args.train_per_class, args.test_per_class, args.seed)
    write_npz(args.out, arrays)
    counts = {k: v.shape for k, v in arrays.items()}
    print(f"wrote {args.out} ({args.out.stat().st_size:,} bytes): {counts}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
