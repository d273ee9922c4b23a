"""Time and memory of one search step: the project's supernet vs the textbook DARTS one.

One search step, as ``bats search`` takes it (``bats_cli/nas/search.py``; §6.1, first-order DARTS):
an architecture step (architecture-half batch, gradient of the loss w.r.t. α only, Adam lr 6e-4,
betas (0.5, 0.999), wd 1e-3), then a weight step (weight-half batch, gradients of the weights
only, clipped to norm 5, Adam lr 1e-3, wd 3e-4). Both supernets are built from the same op
modules with the same weights; "reference" is ``SupernetConfig(mixed_op="reference")``: every
candidate its own module with its own BatchNorm and sign, summed in a Python loop, NCHW.

Time: median over interleaved repetitions in one process. Memory: peak RSS (CPU) or
``max_memory_allocated`` (CUDA) added by the steps, each variant in a fresh subprocess.

    python bench/search_step.py --config stage1 --batch 32 --table
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from _common import (
    add_common_args,
    emit,
    interleaved_medians,
    machine,
    measure_in_subprocess,
    median,
    peak_memory_of,
    setup,
)

from bats_cli.core.spaces import edge_count, get_space
from bats_cli.models.supernet import SuperNet, SupernetConfig

# §6.1: depth 5 -> 11 -> 17 cells while the candidates shrink 8 -> 5 -> 3 ops per edge; batch 96.
STAGES = {"stage1": (5, 8), "stage2": (11, 5), "stage3": (17, 3)}
PAPER_BATCH = 96
# `bats search`'s default width: DARTS' 16 cannot hold 3 channels per group (§4.1); 18 = 6 × 3.
DEFAULT_CHANNELS = 18
GRAD_CLIP = 5.0


def stage_candidates(space_name: str, ops: int, seed: int) -> tuple[list[list[str]], list[list[str]]]:
    """Deterministic candidates per edge: all ops, or a seeded ``ops``-subset with >= 2 convs.

    Stands in for what op dropping keeps after a stage (different ops on different edges); the
    subset always holds conv ops, as a low-temperature search keeps them (Fig. 2).
    """
    space = get_space(space_name)
    n_edges = edge_count(4)
    everything = list(space.candidates)
    if ops >= len(everything):
        return [everything[:] for _ in range(n_edges)], [everything[:] for _ in range(n_edges)]
    convs = [op for op in everything if op not in space.parameter_free]
    rng = random.Random(seed)

    def one_edge() -> list[str]:
        while True:
            chosen = rng.sample(everything, ops)
            if sum(op in convs for op in chosen) >= min(2, ops):
                return [op for op in everything if op in chosen]

    return [one_edge() for _ in range(n_edges)], [one_edge() for _ in range(n_edges)]


def build(args, mixed_op: str, device: torch.device) -> SuperNet:
    layers, ops = STAGES[args.config]
    normal, reduce = stage_candidates(args.space, ops, args.seed)
    config = SupernetConfig(space=args.space, channels=args.channels, layers=args.layers or layers,
                            mixed_op=mixed_op)
    torch.manual_seed(args.seed)
    net = SuperNet(config, candidates_normal=normal, candidates_reduce=reduce)
    return net.to(device)


class Searcher:
    """One supernet with its two optimizers and fixed batches."""

    def __init__(self, net: SuperNet, batches) -> None:
        self.net = net
        self.batches = batches
        self.w_opt = torch.optim.Adam(net.weight_parameters(), lr=1e-3, betas=(0.9, 0.999),
                                      weight_decay=3e-4)
        self.a_opt = torch.optim.Adam(net.arch_parameters(), lr=6e-4, betas=(0.5, 0.999),
                                      weight_decay=1e-3)
        self.losses: list[float] = []

    def step(self) -> None:
        (x_train, y_train), (x_val, y_val) = self.batches
        net = self.net
        net.train()
        # Architecture step, first order: d L_val / d alpha with the weights fixed.
        params = net.arch_parameters()
        loss = F.cross_entropy(net(x_val), y_val)
        for p, g in zip(params, torch.autograd.grad(loss, params)):
            p.grad = g
        self.a_opt.step()
        self.a_opt.zero_grad(set_to_none=True)
        # Weight step (alpha untouched).
        params = net.weight_parameters()
        self.w_opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(net(x_train), y_train)
        loss.backward(inputs=params)
        torch.nn.utils.clip_grad_norm_(params, GRAD_CLIP)
        self.w_opt.step()
        self.w_opt.zero_grad(set_to_none=True)
        self.losses.append(float(loss.detach()))


def make_batches(args, device: torch.device):
    gen = torch.Generator().manual_seed(args.seed + 1)
    out = []
    for _ in range(2):
        x = torch.randn(args.batch, 3, args.image_size, args.image_size, generator=gen)
        y = torch.randint(0, 10, (args.batch,), generator=gen)
        out.append((x.to(device), y.to(device)))
    return out


def make_pair(args, device: torch.device) -> dict[str, Searcher]:
    fast = build(args, "fast", device)
    reference = build(args, "reference", device)
    # Same weights in both (the state_dicts are interchangeable by construction).
    reference.load_state_dict(fast.state_dict())
    batches = make_batches(args, device)
    return {"fast": Searcher(fast, batches), "reference": Searcher(reference, batches)}


def memory_child(args) -> None:
    """Fresh-process memory measurement of one variant (internal)."""
    device = setup(args)
    net = build(args, args.memory_child, device)
    searcher = Searcher(net, make_batches(args, device))
    peak = peak_memory_of(searcher.step, warmup=1, steps=2, device=device)
    print(f'{{"peak_bytes": {peak}}}')


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=sorted(STAGES), default="stage1")
    parser.add_argument("--batch", type=int, default=PAPER_BATCH)
    parser.add_argument("--channels", type=int, default=DEFAULT_CHANNELS)
    parser.add_argument("--layers", type=int, default=None, help="override the stage's cell count")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--space", default="bats", choices=["bats", "darts"])
    parser.add_argument("--no-memory", action="store_true", help="skip the memory measurement")
    parser.add_argument("--memory-child", choices=["fast", "reference"], help=argparse.SUPPRESS)
    add_common_args(parser)
    args = parser.parse_args(argv)
    if args.memory_child:
        memory_child(args)
        return

    device = setup(args)
    layers, ops = STAGES[args.config]
    pair = make_pair(args, device)
    times = interleaved_medians({k: s.step for k, s in pair.items()}, reps=args.reps,
                                warmup=args.warmup, device=device)
    step_s, ref_s = median(times["fast"]), median(times["reference"])
    result = {
        "bench": "search_step",
        "config": args.config,
        "layers": args.layers or layers,
        "ops_per_edge": ops,
        "batch": args.batch,
        "channels": args.channels,
        "image_size": args.image_size,
        "space": args.space,
        "device": str(device),
        "step_s": round(step_s, 4),
        "reference_step_s": round(ref_s, 4),
        "step_ratio": round(step_s / ref_s, 3),
        "step_s_all": [round(t, 4) for t in times["fast"]],
        "reference_step_s_all": [round(t, 4) for t in times["reference"]],
        # Same weights, same batches: the first training losses agree up to float rounding
        # (a sign flip of a value within rounding of 0 can move them slightly in float32).
        "first_loss": round(pair["fast"].losses[0], 5),
        "reference_first_loss": round(pair["reference"].losses[0], 5),
    }
    del pair
    if not args.no_memory:
        child = [a for a in (argv if argv is not None else sys.argv[1:]) if a != "--table"]
        peaks = {
            variant: measure_in_subprocess(str(Path(__file__).resolve()),
                                           [*child, "--memory-child", variant])["peak_bytes"]
            for variant in ("fast", "reference")
        }
        result["peak_mb"] = round(peaks["fast"] / 2**20, 1)
        result["reference_peak_mb"] = round(peaks["reference"] / 2**20, 1)
        result["mem_ratio"] = round(peaks["fast"] / max(peaks["reference"], 1), 3)
        result["memory"] = "cuda max_memory_allocated" if device.type == "cuda" else "peak RSS delta"
    result.update(machine())
    rows = [("", "fast", "reference", "ratio"),
            ("step (s)", f"{step_s:.3f}", f"{ref_s:.3f}", f"{step_s / ref_s:.3f}")]
    if "peak_mb" in result:
        rows.append(("peak (MB)", f"{result['peak_mb']:.1f}", f"{result['reference_peak_mb']:.1f}",
                     f"{result['mem_ratio']:.3f}"))
    emit(result, rows, args.table)


if __name__ == "__main__":
    main()
