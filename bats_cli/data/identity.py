"""Which images, in which order: a hash of an evaluated image list (``images_sha256`` in eval.json).

Two per-image prediction files can be compared image by image (a McNemar test) only when they
are on the same images in the same order; equal hashes say so. The hash covers

* ImageFolder trees (``imagefolder``, ``imagenet``): each image's path relative to the data root
  (``val/<class>/<file>``, POSIX separators, so the same tree elsewhere hashes the same), the
  class list and the labels, in evaluation order;
* fixed data sets (``fashion-mini``, ``fashion-mnist``, ``cifar10``, ``cifar100``): the data set's
  name, the split, each image's index in the stored split and the labels, in evaluation order.

``--subset`` (and the seed it is drawn with) changes the list, and so the hash.
"""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np
from torch.utils.data import Dataset, Subset

from bats_cli.data.loader import SeededView, targets_of

# Bumped if what the hash covers ever changes: old and new hashes then never agree by accident.
IDENTITY_FORMAT = 1


def base_and_indices(dataset: Dataset) -> tuple[Dataset, np.ndarray]:
    """The stored data set under any subsets / views, and the index in it of each sample."""
    indices: np.ndarray | None = None
    while True:
        if isinstance(dataset, Subset):
            own = np.asarray(dataset.indices, dtype=np.int64)
            indices = own if indices is None else own[indices]
            dataset = dataset.dataset
        elif isinstance(dataset, SeededView):
            dataset = dataset.dataset
        else:
            break
    if indices is None:
        indices = np.arange(len(dataset), dtype=np.int64)
    return dataset, indices


def _folder_paths(base: Dataset, indices: np.ndarray) -> list[str] | None:
    """Paths relative to the data root (the parent of the split folder), or None if not a folder."""
    root = getattr(base, "root", None)
    samples = getattr(base, "samples", None)
    if root is None or samples is None:
        return None
    data_root = os.path.dirname(os.path.abspath(os.fspath(root)))
    paths = []
    for i in indices.tolist():
        rel = os.path.relpath(os.path.abspath(samples[i][0]), data_root)
        paths.append(rel.replace(os.sep, "/"))
    return paths


def image_list(dataset: Dataset, *, name: str, split: str = "test") -> dict:
    """The JSON-ready description of the image list that :func:`images_sha256` hashes."""
    base, indices = base_and_indices(dataset)
    labels = targets_of(dataset)
    doc: dict = {"format": IDENTITY_FORMAT, "split": split}
    paths = _folder_paths(base, indices)
    if paths is not None:
        doc.update(kind="files", classes=[str(c) for c in getattr(base, "classes", [])], images=paths)
    else:
        doc.update(kind="indices", dataset=name, images=indices.tolist())
    doc["labels"] = None if labels is None else [int(t) for t in labels]
    return doc


def images_sha256(dataset: Dataset, *, name: str, split: str = "test") -> str:
    """SHA-256 (hex) of :func:`image_list`: equal for the same images in the same order."""
    text = json.dumps(image_list(dataset, name=name, split=split), separators=(",", ":"),
                      ensure_ascii=False)
    # surrogateescape: a file name that is not UTF-8 still hashes (by its bytes).
    return hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()


__all__ = ["IDENTITY_FORMAT", "base_and_indices", "image_list", "images_sha256"]
