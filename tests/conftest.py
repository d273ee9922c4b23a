"""Shared fixtures. Data sets outside the repository are looked up beside it and skipped if absent."""

from __future__ import annotations

import os
from pathlib import Path

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


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module: with tiny convolutions a second only adds contention on a shared CPU.

    Use as ``pytestmark = pytest.mark.usefixtures("one_thread")``.
    """
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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
