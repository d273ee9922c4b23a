"""What distillation costs per training step: the paper's step against the recipe study's rows.

    python bench/distill_step.py [--genotype bats_c10] [--layers 6] [--channels 12] [--image-size 16]
                                 [--batch 64] [--device cpu|cuda] [--reps 5] [--table]

Defaults are `train --preset cpu`'s network and batch (the recipe study's). Timed, interleaved in
one process so that machine load hits every variant alike (a training step = forward with the
auxiliary head + backward + Adam step, in the memory format ``bats train`` uses):

* ``paper``: the student (binary activations, real weights), cross-entropy;
* ``kd``: the same step with the frozen real-valued teacher's forward pass (eval mode, no
  gradients) and the KL loss of :class:`bats_cli.training.distill.Distill`;
* ``kd+attention``: plus attention matching at every cell output;
* ``teacher``: a training step of the real-valued teacher itself (what `train --real` costs).

The JSON reports the median step times and their ratios to ``paper``: ``kd_ratio`` is what one
distilled step costs, ``teacher_ratio`` what training the teacher costs per step.
"""

from __future__ import annotations

import argparse

import torch
from _common import add_common_args, emit, interleaved_medians, machine, make_step, median, setup

from bats_cli.core.zoo import resolve_genotype
from bats_cli.models.networks import build_network
from bats_cli.training.distill import Distill, capture, feature_modules
from bats_cli.utils.runtime import memory_format


def distilled_step(student, teacher, x, y, device, *, attention_weight: float, aux_weight: float = 0.4):
    """One training step of ``student`` distilled from ``teacher``, as ``TrainJob`` (training/fit.py) does it."""
    fmt = memory_format(device, student)
    student = student.to(device, memory_format=fmt).train()
    distill = Distill(teacher=teacher, path="-", sha256="-", attention_weight=attention_weight,
                      _features=feature_modules(teacher) if attention_weight > 0 else [])
    distill.to(device, fmt)
    features = feature_modules(student) if attention_weight > 0 else []
    x = x.contiguous(memory_format=fmt)
    optimizer = torch.optim.Adam(student.parameters(), lr=1e-3)

    def step() -> None:
        t_logits, t_feats = distill.forward(x)
        with capture(features) as s_feats:
            output = student(x)
        loss, _ = distill.loss(output, y, t_logits, aux_weight=aux_weight,
                               student_features=s_feats, teacher_features=t_feats)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser)
    parser.add_argument("--genotype", default="bats_c10", help="genotype file or bundled name")
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--channels", type=int, default=12)
    parser.add_argument("--image-size", type=int, default=16)
    parser.add_argument("--batch", type=int, default=64)
    args = parser.parse_args(argv)
    device = setup(args)

    genotype = resolve_genotype(args.genotype)
    x = torch.randn(args.batch, 3, args.image_size, args.image_size, device=device)
    y = torch.randint(0, 10, (args.batch,), device=device)

    def net(real: bool):
        torch.manual_seed(args.seed)
        return build_network(genotype, layers=args.layers, channels=args.channels, real=real)

    steps = {
        "paper": make_step(net(False), x, y, device),
        "kd": distilled_step(net(False), net(True), x, y, device, attention_weight=0.0),
        "kd+attention": distilled_step(net(False), net(True), x, y, device, attention_weight=1.0),
        "teacher": make_step(net(True), x, y, device),
    }
    times = interleaved_medians(steps, reps=args.reps, warmup=args.warmup, device=device)
    med = {k: median(v) for k, v in times.items()}
    result = {
        "genotype": genotype.name, "layers": args.layers, "channels": args.channels,
        "image_size": args.image_size, "batch": args.batch, "device": str(device),
        **{f"{k.replace('+', '_')}_step_s": v for k, v in med.items()},
        "kd_ratio": med["kd"] / med["paper"],
        "kd_attention_ratio": med["kd+attention"] / med["paper"],
        "teacher_ratio": med["teacher"] / med["paper"],
        "machine": machine(),
    }
    rows = [("step", "median (s)", "× paper")] + [(k, f"{v:.4f}", f"{v / med['paper']:.2f}") for k, v in med.items()]
    emit(result, rows, args.table)


if __name__ == "__main__":
    main()
