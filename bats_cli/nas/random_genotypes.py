"""Random genotypes: the random-search baseline (Table 5 / DARTS), and random cells matched in
parameters or OPs to a genotype in one evaluation network (``bats derive --random [--match]``;
docs/derive.md).
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from bats_cli.core.errors import UserInputError
from bats_cli.core.genotype import CELLS, Genotype
from bats_cli.core.spaces import get_space
from bats_cli.nas.derive import NONE_OP


def _random_cells(rng: random.Random, ops: Sequence[str], steps: int) -> dict[str, list[list[Any]]]:
    """Both cells of one random draw: per node two distinct inputs, each with a random op."""
    cells = {}
    for cell in CELLS:
        gene = []
        for node in range(steps):
            for src in rng.sample(range(node + 2), 2):
                gene.append([rng.choice(ops), src])
        cells[cell] = gene
    return cells


def _random_ops(space: str, steps: int) -> list[str]:
    from bats_cli.core.genotype import MAX_CELL_NODES

    sp = get_space(space)
    if steps < 1:
        raise UserInputError(f"a cell needs at least 1 intermediate node, got {steps}")
    if steps > MAX_CELL_NODES:
        raise UserInputError(f"--nodes {steps}: a cell has at most {MAX_CELL_NODES} intermediate nodes")
    return [op for op in sp.candidates if op != NONE_OP]


def _genotype_of(cells: dict[str, list[list[Any]]], *, name: str, space: str, steps: int,
                 source: str, notes: str, origin: str) -> Genotype:
    concat = list(range(2, steps + 2))
    return Genotype.from_dict(
        {
            "name": name,
            "space": space,
            "normal": cells["normal"],
            "normal_concat": concat,
            "reduce": cells["reduce"],
            "reduce_concat": concat,
            "source": source,
            "notes": notes,
        },
        origin=origin,
    )


_RANDOM_NOTES = (
    "Random-search baseline (Table 5): two distinct inputs per node and a uniformly drawn non-zero "
    "op per edge."
)


def random_genotype(space: str, seed: int, steps: int = 4, *, name: str | None = None) -> Genotype:
    """A uniformly random valid genotype (the random-search baseline of Table 5 / DARTS).

    Every node takes two distinct inputs drawn uniformly from its predecessors, each with an op
    drawn uniformly from the space's candidates other than ``none``; the same seed gives the
    same genotype.
    """
    ops = _random_ops(space, steps)
    return _genotype_of(
        _random_cells(random.Random(seed), ops, steps),
        name=name or f"random_{space}_seed{seed}", space=space, steps=steps,
        source=f"bats derive --random --space {space} --seed {seed}", notes=_RANDOM_NOTES,
        origin="random genotype",
    )


# ---- random cells matched in size to a genotype ------------------------------------------------

MATCH_BY = ("params", "ops")
DEFAULT_MATCH_PRESET = "cpu"
DEFAULT_TOLERANCE = 0.1
DEFAULT_MAX_DRAWS = 10_000
# `bats train`'s data set when its preset names none (TrainConfig's default).
_TRAIN_DATASET = "cifar10"


@dataclass(frozen=True)
class MatchNetwork:
    """The evaluation network both cells are counted in: the one ``bats train GENOTYPE --preset
    NAME`` builds (its data set's input, image size, cells and channels; binary activations, real
    weights, every other setting at its default), with ``layers`` / ``channels`` overriding."""

    preset: str | None
    dataset: str
    image_size: int
    in_channels: int
    num_classes: int
    kind: str
    layers: int | None
    channels: int | None

    def to_dict(self) -> dict[str, Any]:
        return {"preset": self.preset, "dataset": self.dataset, "image_size": self.image_size,
                "layers": self.layers, "channels": self.channels}

    def describe(self) -> str:
        from bats_cli.models.networks import PAPER_DEFAULTS

        layers = self.layers or PAPER_DEFAULTS[self.kind]["layers"]
        channels = f"C = {self.channels}" if self.channels else "width 1x"
        where = f"`bats train --preset {self.preset}` network" if self.preset else "network"
        return f"{where}: {layers} cells, {channels}, {self.image_size} px {self.dataset}"


def match_network(preset: str | None = DEFAULT_MATCH_PRESET, *, layers: int | None = None,
                  channels: int | None = None) -> MatchNetwork:
    """The network of ``bats train GENOTYPE --preset PRESET [--layers N] [--channels C]``."""
    from bats_cli.core.presets import TRAIN_PRESETS
    from bats_cli.models.counting import dataset_shape

    if preset is None:
        preset = "paper"
    if preset not in TRAIN_PRESETS:
        raise UserInputError(f"--preset {preset!r}: choose one of {', '.join(TRAIN_PRESETS)}")
    for flag, value in (("--layers", layers), ("--channels", channels)):
        if value is not None and value < 1:
            raise UserInputError(f"{flag} must be a positive integer, got {value}")
    values = TRAIN_PRESETS[preset]
    shape = dataset_shape(values.get("dataset", _TRAIN_DATASET))
    size = int(values.get("image_size") or shape.image_size)
    return MatchNetwork(
        preset=preset, dataset=shape.name, image_size=size, in_channels=shape.in_channels,
        num_classes=shape.num_classes, kind=shape.kind,
        layers=layers if layers is not None else values.get("layers"),
        channels=channels if channels is not None else values.get("channels"),
    )


def network_cost(genotype: Genotype, network: MatchNetwork, by: str | None = None) -> dict[str, Any]:
    """Parameters and OPs (FLOPs + BOPs/64) of ``genotype``'s network, as `bats flops` counts them
    (``by="params"``: the parameters alone, without building real weights or a forward pass)."""

    from bats_cli.models.counting import count_model
    from bats_cli.models.networks import build_network

    def build():
        # The auxiliary tower is not counted (count_model drops it): not building it is faster.
        return build_network(
            genotype, kind=network.kind, num_classes=network.num_classes,
            in_channels=network.in_channels, layers=network.layers, channels=network.channels,
            auxiliary=False,
        )

    if by == "params":
        # Shapes only: a meta-device network has the same parameters as `bats flops` counts
        # (every one, the auxiliary tower not built) at no cost for initialising weights.
        with torch.device("meta"):
            model = build()
        return {"params": sum(p.numel() for p in model.parameters())}
    model = build()
    report = count_model(model, (network.in_channels, network.image_size, network.image_size), meta=False)
    return {"params": int(report.params), "ops": float(report.ops)}


@dataclass(frozen=True)
class MatchedRandom:
    """A random genotype whose network is within ``tolerance`` of the target's ``by`` count."""

    genotype: Genotype
    target_name: str
    by: str
    target: float  # an int for params
    value: float
    draws: int
    tolerance: float
    max_draws: int
    seed: int
    network: MatchNetwork

    def to_dict(self) -> dict[str, Any]:
        """What ``bats derive --random --match ... --json`` adds to its result (top level)."""
        return {
            "target_genotype": self.target_name,
            "match_by": self.by,
            "target": self.target,
            "value": self.value,
            "ratio": self.value / self.target if self.target else None,
            "tolerance": self.tolerance,
            "draws": self.draws,
            "max_draws": self.max_draws,
            "seed": self.seed,
            "match_network": self.network.to_dict(),
        }


def matched_random_genotype(
    target: Genotype,
    seed: int,
    *,
    by: str = "params",
    tolerance: float = DEFAULT_TOLERANCE,
    max_draws: int = DEFAULT_MAX_DRAWS,
    network: MatchNetwork | None = None,
    name: str | None = None,
) -> MatchedRandom:
    """Random cells of ``target``'s space (and node count) drawn until the network built from
    them has a ``by`` count (``"params"`` or ``"ops"``) within ``±tolerance`` of ``target``'s in the
    same ``network``: seeded rejection sampling.

    Draws follow one ``random.Random(seed)`` stream, so the first draw is ``random_genotype(space,
    seed)`` and the result depends on the seed alone. UserInputError after ``max_draws`` misses.
    """
    if by not in MATCH_BY:
        raise UserInputError(f"--match-by {by!r}: choose one of {', '.join(MATCH_BY)}")
    if not (tolerance >= 0 and math.isfinite(tolerance)):
        raise UserInputError(f"--tolerance must be 0 or more, got {tolerance}")
    if max_draws < 1:
        raise UserInputError(f"--max-draws must be at least 1, got {max_draws}")
    network = network or match_network()
    space = target.space
    steps = len(target.normal) // 2
    if len(target.reduce) // 2 != steps or len(target.normal_concat) != steps or len(target.reduce_concat) != steps:
        raise UserInputError(
            f"{target.name}: --match needs a genotype whose cells both have the same number of "
            "nodes, all concatenated (the shape random cells have)"
        )
    ops = _random_ops(space, steps)
    goal = network_cost(target, network, by)[by]
    rng = random.Random(seed)
    closest: float | None = None
    for draw in range(1, max_draws + 1):  # noqa: B007 (the count of draws is reported)
        cells = _random_cells(rng, ops, steps)
        candidate = _genotype_of(cells, name="draw", space=space, steps=steps, source="-", notes="-",
                                 origin="random genotype")
        value = network_cost(candidate, network, by)[by]
        if closest is None or abs(value - goal) < abs(closest - goal):
            closest = value
        if abs(value - goal) <= tolerance * goal:
            break
    else:
        raise UserInputError(
            f"no random {space} cell within ±{tolerance:g} of {target.name}'s {by} ({goal:.6g}) in "
            f"{max_draws} draws (seed {seed}; closest {closest:.6g}); raise --tolerance or --max-draws"
        )
    source = (f"bats derive --random --seed {seed} --match {target.name} --match-by {by} "
              f"--tolerance {tolerance:g} --preset {network.preset}"
              + (f" --layers {network.layers}" if network.layers is not None else "")
              + (f" --channels {network.channels}" if network.channels is not None else ""))
    notes = (
        f"{_RANDOM_NOTES} Matched to {target.name} by {by}: {value:.6g} against {goal:.6g} "
        f"(±{tolerance:g}) in the {network.describe()}; accepted at draw {draw}."
    )
    genotype = _genotype_of(cells, name=name or f"random_{space}_seed{seed}_{by}_matched",
                            space=space, steps=steps, source=source, notes=notes,
                            origin="random genotype")
    return MatchedRandom(genotype=genotype, target_name=target.name, by=by, target=goal, value=value,
                         draws=draw, tolerance=tolerance, max_draws=max_draws, seed=seed,
                         network=network)
