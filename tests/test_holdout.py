"""--holdout: validation images carved from the training split, so the test split is read once."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import cli

from bats_cli.core.errors import UserInputError
from bats_cli.data import build_datasets, targets_of


def _indices(ds):
    return np.asarray(ds.indices)


def test_holdout_is_disjoint_balanced_and_unaugmented():
    data = build_datasets("fashion-mini", subset=1000, holdout=200, seed=3)
    assert len(data.train) == 800 and len(data.val) == 200
    # Both index the same parent (the subset's images): disjoint, together the whole subset.
    train_parent = data.train.dataset.indices  # Subset(subset, keep).dataset = subset
    val_parent = data.val.dataset.indices
    assert train_parent == val_parent
    assert not set(_indices(data.train)) & set(_indices(data.val))
    assert sorted([*_indices(data.train), *_indices(data.val)]) == list(range(1000))
    counts = np.bincount(targets_of(data.val), minlength=10)
    assert counts.min() == counts.max() == 20  # class-balanced
    # Held-out images come with the evaluation transforms: the same image twice is the same tensor.
    a, _ = data.val[0]
    b, _ = data.val[0]
    assert torch.equal(a, b)
    # The test split is untouched by --holdout.
    assert len(data.test) == len(build_datasets("fashion-mini", subset=1000, seed=3).test)


def test_holdout_is_deterministic_and_seeded():
    one = _indices(build_datasets("fashion-mini", subset=500, holdout=50, seed=1).val)
    assert np.array_equal(one, _indices(build_datasets("fashion-mini", subset=500, holdout=50, seed=1).val))
    assert not np.array_equal(one, _indices(build_datasets("fashion-mini", subset=500, holdout=50, seed=2).val))


def test_holdout_larger_than_training_split_is_refused():
    with pytest.raises(UserInputError, match="--holdout"):
        build_datasets("fashion-mini", subset=100, holdout=100)


@pytest.mark.slow
def test_train_and_binarize_validate_on_the_holdout(tmp_path, capsys):
    out = tmp_path / "train"
    code, stdout, err = cli(["train", "bats_c10", "--preset", "tiny", "--subset", "600", "--holdout", "100",
                             "--epochs", "1", "--out", str(out), "--quiet", "--json"], capsys)
    assert code == 0, err
    res = json.loads(stdout)
    assert res["val_split"] == "holdout" and res["val_images"] == 100 and res["train_images"] == 500
    code, stdout, err = cli(["binarize", str(out / "last.safetensors"), "--preset", "tiny",
                             "--out", str(tmp_path / "bin"), "--quiet", "--json"], capsys)
    assert code == 0, err
    assert json.loads(stdout)["val_split"] == "holdout"
