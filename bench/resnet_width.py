"""Step time of the binary ResNet-18 at several base widths against the cells' `train --preset cpu`.

    python bench/resnet_width.py [--widths 8,12,16,24] [--genotype bats_c10] [--threads 1] [--table]

One training step = forward + backward + Adam step at the settings both cpu presets share (16 px
CIFAR-sized images, batch 64, binary activations with real weights), in the memory format `bats
train` uses; the cell network is the
cells' cpu preset (6 cells, C = 12, auxiliary tower at 0.4). All networks are timed in
interleaved repetitions in one process, so machine load hits them alike; ``ratio`` = ResNet step
/ cell step. The ResNet's cpu preset takes the width whose ratio is closest to 1 (same epochs,
batch and data, so the same run time).
"""

from __future__ import annotations

import argparse

import torch
from _common import add_common_args, emit, interleaved_medians, machine, make_step, median, setup

from bats_cli.core.presets import TRAIN_PRESETS
from bats_cli.core.zoo import resolve_genotype
from bats_cli.models.networks import build_network
from bats_cli.models.resnet import build_resnet


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser)
    parser.add_argument("--widths", default="8,12,16,24", help="ResNet base widths to time")
    parser.add_argument("--genotype", default="bats_c10")
    args = parser.parse_args(argv)
    device = setup(args)
    cpu = TRAIN_PRESETS["cpu"]
    size, batch = cpu["image_size"], cpu["batch_size"]
    x = torch.randn(batch, 3, size, size, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    cells = build_network(resolve_genotype(args.genotype), layers=cpu["layers"], channels=cpu["channels"])
    steps = {"cells": make_step(cells, x, y, device)}
    widths = [int(w) for w in args.widths.split(",")]
    for w in widths:
        steps[f"resnet{w}"] = make_step(build_resnet(channels=w), x, y, device)
    times = interleaved_medians(steps, reps=args.reps, warmup=args.warmup, device=device)
    cell_s = median(times["cells"])
    result = {"image_size": size, "batch": batch, "cells_step_s": cell_s,
              "resnet": {w: {"step_s": median(times[f"resnet{w}"]),
                             "ratio": median(times[f"resnet{w}"]) / cell_s} for w in widths},
              "machine": machine()}
    rows = [("network", "step (s)", "ratio to cells")]
    rows.append((f"cells ({cpu['layers']} cells, C={cpu['channels']})", f"{cell_s:.3f}", "1.00"))
    for w in widths:
        r = result["resnet"][w]
        rows.append((f"ResNet-18, base width {w}", f"{r['step_s']:.3f}", f"{r['ratio']:.2f}"))
    emit(result, rows, args.table)


if __name__ == "__main__":
    main()
