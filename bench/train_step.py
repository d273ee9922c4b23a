"""Training throughput (images/s) of the evaluation network: binary activations vs fully real.

    python bench/train_step.py [--genotype bats_c10] [--layers 20] [--channels 36] [--batch 64]
                               [--device cpu|cuda] [--reps 5] [--table]

One training step = forward (with the auxiliary head, weight 0.4) + backward + Adam step, in the
memory format ``bats train`` uses. Both networks are built in the same process and timed in
interleaved repetitions, so machine load hits both alike; the JSON reports the median step time,
images/s of each and ``speed_ratio`` = binary images/s / real images/s.
"""

from __future__ import annotations

import argparse

import torch
from _common import add_common_args, emit, interleaved_medians, machine, make_step, median, setup

from bats_cli.core.zoo import resolve_genotype
from bats_cli.models.networks import build_network


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser)
    parser.add_argument("--genotype", default="bats_c10", help="genotype file or bundled name")
    parser.add_argument("--layers", type=int, default=20)
    parser.add_argument("--channels", type=int, default=36)
    parser.add_argument("--batch", type=int, default=64)
    args = parser.parse_args(argv)
    device = setup(args)

    genotype = resolve_genotype(args.genotype)
    x = torch.randn(args.batch, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (args.batch,), device=device)
    steps = {}
    for name, real in (("binary", False), ("real", True)):
        model = build_network(genotype, layers=args.layers, channels=args.channels, real=real)
        steps[name] = make_step(model, x, y, device)
    times = interleaved_medians(steps, reps=args.reps, warmup=args.warmup, device=device)
    binary_s, real_s = median(times["binary"]), median(times["real"])
    result = {
        "genotype": genotype.name, "layers": args.layers, "channels": args.channels,
        "batch": args.batch, "device": str(device),
        "binary_step_s": binary_s, "real_step_s": real_s,
        "binary_images_per_s": args.batch / binary_s, "real_images_per_s": args.batch / real_s,
        "speed_ratio": real_s / binary_s,
        "machine": machine(),
    }
    rows = [("network", "step (s)", "images/s"),
            ("binary activations, real weights", f"{binary_s:.3f}", f"{args.batch / binary_s:.1f}"),
            ("fully real", f"{real_s:.3f}", f"{args.batch / real_s:.1f}")]
    emit(result, rows, args.table)


if __name__ == "__main__":
    main()
