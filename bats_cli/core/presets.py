"""Named settings of the long commands (``--preset``): paper defaults < preset < --config < flags.

Kept free of torch so that ``--help`` can show what each preset sets without loading it. Every
command that has presets accepts the same names: ``paper`` (the defaults, spelled out), ``tiny``
(about a minute on a CPU, on the embedded fashion-mini), ``small`` (a few minutes, for small
real data such as an ImageFolder copy of part of CIFAR-10) and ``cpu`` (the smallest settings in
which the search really learns on 2 CPU cores; `bats ablate --preset cpu`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

PRESET_NAMES = ("paper", "tiny", "small", "cpu")

SEARCH_PRESETS: dict[str, dict[str, Any]] = {
    # The paper's numbers (§6.1) are the defaults; "paper" only names them.
    "paper": {},
    # The whole 3-stage search on the embedded fashion-mini in about a minute on 2 CPU cores.
    # One thread: tiny tensors gain nothing from more, and lose a lot on a busy shared CPU.
    "tiny": {"dataset": "fashion-mini", "subset": 320, "image_size": 16, "batch_size": 32,
             "epochs": 2, "warmup": 1, "channels": 6, "layers": (3, 4, 5), "threads": 1},
    # About 5 minutes on 2 busy CPU cores: e.g. --dataset imagefolder --data-dir
    # ../shared/datasets/cifar10-mini (960 images at 16 px, 15 steps per epoch).
    "small": {"subset": 960, "image_size": 16, "batch_size": 32, "epochs": 4, "warmup": 1,
              "channels": 6, "layers": (5, 6, 8), "threads": 1},
    # The smallest settings in which α really learns on 2 CPU cores (measured in
    # docs/search.md): the whole 3-stage search on cifar10-mini in 12-26 minutes on a busy
    # 2-core machine. α moves: at the end of stage 1 the mean α spread per edge (max α - min α,
    # untempered) is 0.61-0.70 against 0.003 at the start (cifar10-large, seeds 0 and 1; later
    # stages not measured). The tempered entropies of softmax(α/T) in docs/search.md fall with T
    # by construction and are no evidence of learning on their own. Changes from the paper, and why:
    # * 16 px images, 6 channels (2 groups of the paper's 3 channels), 5/6/8 cells: a supernet
    #   step must take about half a second on one core;
    # * 2,000 training images (1,000 + 1,000: 31 steps per epoch), batch 32, 10 epochs per stage
    #   of which 2 warm-up: 248 architecture steps per stage instead of the paper's ~3,900;
    # * arch_lr 2e-2 instead of 6e-4: Adam moves each α by at most about lr per step, so with
    #   16x fewer steps α needs a much larger step (measured on cifar10-mini: 6 α steps leave a
    #   mean α spread of 0.0067 at 6e-4 and 0.18 at 2e-2; tests/test_search_health.py; 1e-2 over
    #   a whole search: α spread not measured).
    # Kept: the 3-stage 8/5/3-op schedule, temperatures 0.2 / 0.15, binary activations with
    # real weights, α's Adam betas and weight decay, the weights' Adam (lr 1e-3, wd 3e-4).
    "cpu": {"subset": 2000, "image_size": 16, "batch_size": 32, "epochs": 10, "warmup": 2,
            "channels": 6, "layers": (5, 6, 8), "arch_lr": 2e-2, "threads": 1},
}

TRAIN_PRESETS: dict[str, dict[str, Any]] = {
    # The paper's recipe (§6.2) is the default; "paper" only names it.
    "paper": {},
    # About a minute on a CPU: the smallest network (3 cells, 6 channels), 2 epochs of at most
    # 2,500 images (all of fashion-mini), lr 2e-3 (measured: 53.8 % top-1 vs 44.4 % at 1e-3).
    "tiny": {"dataset": "fashion-mini", "layers": 3, "channels": 6, "epochs": 2, "batch_size": 32,
             "subset": 2500, "lr": 2e-3, "threads": 1},
    # A step up from tiny for small real data (the same scale as search's small): 8 cells of
    # 12 channels, 10 epochs of at most 960 images at 16 px. Not tuned.
    "small": {"layers": 8, "channels": 12, "epochs": 10, "batch_size": 32, "subset": 960,
              "image_size": 16, "lr": 2e-3, "threads": 1},
    # A searched cell's network in 4.5-8 minutes on 2 busy CPU cores (measured in
    # docs/pipeline.md: 477 s, 40.7 % top-1 on cifar10-mini's 2,000 validation images): 16 px
    # images like `search --preset cpu`, 6 cells of C = 12 (4 groups of the paper's 3
    # channels), 4 epochs of batch 64 (624 steps). Kept: Adam 1e-3 with cosine decay, the
    # auxiliary tower (0.4), binary activations with real weights.
    "cpu": {"image_size": 16, "layers": 6, "channels": 12, "epochs": 4, "batch_size": 64,
            "threads": 1},
}

# `bats train resnet18` (Table 5's binary ResNet-18 baseline): the same names, sized for the
# ResNet. Cell-only settings (layers, groups, auxiliary tower) do not exist there; ``channels``
# is the base width (64 in the paper's ResNet-18; stages double it).
RESNET_TRAIN_PRESETS: dict[str, dict[str, Any]] = {
    # The paper's recipe for every Table 5 row (§6.2: Adam 1e-3, cosine, 600 epochs, batch 256,
    # CIFAR augmentation) at the standard width 64; "paper" only names it.
    "paper": {},
    # Seconds on a CPU (the cells' tiny settings, base width 4): for tests and smoke runs.
    "tiny": {"dataset": "fashion-mini", "channels": 4, "epochs": 2, "batch_size": 32,
             "subset": 2500, "lr": 2e-3, "threads": 1},
    # The cells' small settings at base width 16. Not tuned.
    "small": {"channels": 16, "epochs": 10, "batch_size": 32, "subset": 960, "image_size": 16,
              "lr": 2e-3, "threads": 1},
    # As long as the cells' `train --preset cpu`, so Table 5's rows compare at one budget: the
    # same 16 px images, 4 epochs of batch 64, Adam 1e-3 with cosine decay; the base width is
    # the one lever. Measured on cifar10-mini (2 cores shared with 3 other jobs, so timings
    # move): a training step at width 40 takes 1.06x the cells' (bench/resnet_width.py,
    # interleaved; 32: 0.68x, 48: 1.32x) and one epoch 63.8 s against the cells' 62.1 s.
    "cpu": {"image_size": 16, "channels": 40, "epochs": 4, "batch_size": 64, "threads": 1},
}


def train_presets(arch: str = "cells") -> dict[str, dict[str, Any]]:
    """``bats train``'s presets for a network kind (``arch``: "cells" or a fixed model)."""
    return {"cells": TRAIN_PRESETS, "resnet18": RESNET_TRAIN_PRESETS}[arch]


BINARIZE_PRESETS: dict[str, dict[str, Any]] = {
    # The paper's step 2 as this project reads it: fine-tuning for half the training run's epochs
    # (binarize.FINE_TUNE_SHARE, measured at CPU scale; 300 after the paper's 600).
    "paper": {},
    # The data, batch and seed come from the training run; only the run itself is lighter.
    "tiny": {"epochs": 1, "threads": 1},
    "small": {"epochs": 1, "threads": 1},
    # `bats ablate --preset cpu`: the default budget (2 epochs after `train --preset cpu`).
    "cpu": {"threads": 1},
}


def describe_presets(presets: Mapping[str, Mapping[str, Any]]) -> str:
    """``paper: the defaults; tiny: dataset=fashion-mini, layers=3, ...`` for --help."""
    parts = []
    for name in PRESET_NAMES:
        if name not in presets:
            continue
        values = presets[name]
        body = ", ".join(f"{k.replace('_', '-')}={_show(v)}" for k, v in values.items())
        parts.append(f"{name}: {body or 'the defaults'}")
    return "; ".join(parts)


def _show(value: Any) -> str:
    if isinstance(value, (tuple, list)):
        return ",".join(str(v) for v in value)
    return f"{value:g}" if isinstance(value, float) else str(value)
