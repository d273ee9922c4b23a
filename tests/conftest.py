"""Shared fixtures. Data sets outside the repository are looked up beside it and skipped if absent."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import NamedTuple

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def cifar10_mini_dir() -> Path:
    """../shared/datasets/cifar10-mini next to the repository (or $BATS_CIFAR10_MINI); skip if absent."""
    override = os.environ.get("BATS_CIFAR10_MINI")
    path = Path(override) if override else REPO.parent / "shared" / "datasets" / "cifar10-mini"
    if not (path / "train").is_dir() or not (path / "val").is_dir():
        pytest.skip(f"cifar10-mini not found at {path}")
    return path


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread per test module: with tiny convolutions a second only adds contention on a shared CPU."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class TinyRun(NamedTuple):
    """A tiny step-1 training run and its binarization: run directories under root, their results."""

    root: Path
    train: dict
    binarize: dict


# The smallest train -> binarize run of each architecture, as `bats` commands: (train, binarize) flags.
TINY_RUNS = {
    # 3 cells of 6 channels on 128 fashion-mini images: 4 steps per epoch.
    "cells": (["bats_c10", "--dataset", "fashion-mini", "--layers", "3", "--channels", "6", "--batch-size", "32",
               "--subset", "128", "--epochs", "1"],
              ["--epochs", "1", "--calibration-batches", "2"]),
    "resnet18": (["resnet18", "--preset", "tiny", "--epochs", "1", "--subset", "256"],
                 ["--preset", "tiny", "--subset", "256"]),
}


def _tiny_run(arch: str, root: Path) -> TinyRun:
    from bats_cli.cli import main

    train_flags, binarize_flags = TINY_RUNS[arch]
    common = ["--device", "cpu", "--threads", "1", "--quiet", "--json"]
    for argv in (["train", *train_flags, "--out", str(root / "train"), *common],
                 ["binarize", str(root / "train" / "last.safetensors"), *binarize_flags, "--out",
                  str(root / "binarize"), "-o", str(root / "tiny.packed.safetensors"), *common]):
        try:
            main(argv)
        except SystemExit as exc:
            assert exc.code in (0, None), argv
    return TinyRun(root, *(json.loads((root / run / "result.json").read_text()) for run in ("train", "binarize")))


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """Factory: ``tiny_checkpoint(arch)`` trains and binarizes the tiny run of ``arch`` once per session.

    Tests may write new directories under its ``root`` but must not change the runs in it.
    """
    import torch

    runs: dict[str, TinyRun] = {}

    def make(arch: str) -> TinyRun:
        if arch not in TINY_RUNS:
            raise KeyError(f"no tiny run for {arch!r}; known: {sorted(TINY_RUNS)}")
        if arch not in runs:
            threads = torch.get_num_threads()  # a session fixture: leave the calling module's setting as it was
            runs[arch] = _tiny_run(arch, tmp_path_factory.mktemp(f"tiny-{arch}"))
            torch.set_num_threads(threads)
        return runs[arch]

    return make


# Fuzz tests (tests/test_fuzz.py) scale their example counts with max_examples: the default
# profile keeps the suite within about a minute, `--hypothesis-profile=nightly` runs 25 times more.
try:
    from hypothesis import settings as _hypothesis_settings

    _hypothesis_settings.register_profile("nightly", max_examples=2500, deadline=None)
except ImportError:  # pragma: no cover - hypothesis is a dev dependency
    pass


def pytest_collection_modifyitems(config, items):
    """Modules with a `slow` test first (order kept otherwise): with one module per xdist worker,
    the longest modules start at once instead of ending the run on one busy worker."""
    slow_modules = {item.module.__name__ for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.module.__name__ not in slow_modules)
