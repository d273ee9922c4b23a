"""From architecture weights to a genotype (DARTS rule), random genotypes, temperature diagnostics.

The DARTS rule (Liu et al., 2019, and P-DARTS after it): for every intermediate node keep the two
incoming edges whose strongest op other than ``none`` has the highest weight, and on each that
op. Weights are ``softmax(α / T)`` per edge, computed with the checkpoint's own temperatures and
per-edge candidate lists (after progressive op dropping, edges hold different ops), so a search
checkpoint is all :func:`derive_from_checkpoint` needs.

``max_skip`` is P-DARTS' post-processing cap on skip connections in the normal cell: while the
derived normal cell has more skips than allowed, the weakest chosen skip is removed from its edge
and the cell is derived again, so that edge falls back to its next-best op (or the node takes
another edge). The paper (§4.2) argues its temperature makes the cap unnecessary; it is off by
default.
"""

from __future__ import annotations

import json
import math
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from bats_cli.errors import UserInputError
from bats_cli.genotype import CELLS, Genotype
from bats_cli.spaces import edge_endpoints, get_space

NONE_OP = "none"
SKIP_OP = "skip_connect"
# Metadata key of search checkpoints holding space, steps, temperatures and candidate lists.
ARCH_STATE_KEY = "arch_state"

_NAME_RE = re.compile(r"[^A-Za-z0-9_.-]+")


def _as_matrix(weights: Any) -> list[list[float]]:
    if isinstance(weights, torch.Tensor):
        return weights.detach().float().cpu().tolist()
    return [[float(w) for w in row] for row in weights]


def _check_shapes(weights: list[list[float]], candidates: Sequence[Sequence[str]], steps: int,
                  cell: str) -> None:
    n_edges = len(edge_endpoints(steps))
    if len(weights) != n_edges or len(candidates) != n_edges:
        raise UserInputError(
            f"{cell} cell: {steps} nodes need {n_edges} edges, got {len(weights)} weight rows and "
            f"{len(candidates)} candidate lists"
        )
    for e, (row, ops) in enumerate(zip(weights, candidates)):
        if len(row) != len(ops):
            raise UserInputError(
                f"{cell} edge {e}: {len(row)} weights for {len(ops)} candidate ops"
            )


@dataclass(frozen=True)
class _Choice:
    edge: int
    input: int
    op: str
    weight: float


def _parse_cell(
    weights: list[list[float]],
    candidates: Sequence[Sequence[str]],
    steps: int,
    masked: set[tuple[int, str]],
    cell: str,
) -> list[_Choice]:
    """The DARTS ``_parse``: two strongest non-zero edges per node, strongest first."""
    chosen: list[_Choice] = []
    start = 0
    for node in range(steps):
        n_inputs = node + 2
        scored: list[tuple[float, _Choice | None]] = []
        for j in range(n_inputs):
            e = start + j
            best: _Choice | None = None
            for k, op in enumerate(candidates[e]):
                if op == NONE_OP or (e, op) in masked:
                    continue
                w = weights[e][k]
                if best is None or w > best.weight:
                    best = _Choice(edge=e, input=j, op=op, weight=w)
            scored.append((best.weight if best else -math.inf, best))
        # sorted is stable: on equal strength the lower input index wins, as in DARTS.
        top = sorted(scored, key=lambda s: -s[0])[:2]
        if any(choice is None for _, choice in top):
            raise UserInputError(
                f"cannot derive the {cell} cell: node {node + 2} has fewer than two incoming "
                "edges with an op other than 'none'"
            )
        chosen.extend(choice for _, choice in top)  # type: ignore[misc]
        start += n_inputs
    return chosen


def derive_genotype(
    weights_normal: Any,
    weights_reduce: Any,
    candidates_normal: Sequence[Sequence[str]],
    candidates_reduce: Sequence[Sequence[str]],
    *,
    steps: int = 4,
    space: str,
    max_skip: int | None = None,
    name: str = "derived",
    source: str | None = None,
    notes: str | None = None,
) -> Genotype:
    """The DARTS rule on per-edge op weights (rows follow ``edge_endpoints(steps)``).

    ``weights_*`` are (edges, candidates) softmax weights (a tensor or nested lists) and
    ``candidates_*`` the op names of each edge's columns. Ops must belong to ``space``.
    """
    sp = get_space(space)
    if max_skip is not None and max_skip < 0:
        raise UserInputError(f"--max-skip must be 0 or more, got {max_skip}")
    cells: dict[str, list[_Choice]] = {}
    for cell, weights, candidates in (
        ("normal", weights_normal, candidates_normal),
        ("reduce", weights_reduce, candidates_reduce),
    ):
        w = _as_matrix(weights)
        _check_shapes(w, candidates, steps, cell)
        for e, ops in enumerate(candidates):
            unknown = [op for op in ops if op not in sp.candidates]
            if unknown:
                raise UserInputError(
                    f"{cell} edge {e}: ops {unknown} are not candidates of the {space!r} space"
                )
        masked: set[tuple[int, str]] = set()
        while True:
            chosen = _parse_cell(w, candidates, steps, masked, cell)
            skips = [c for c in chosen if c.op == SKIP_OP]
            # P-DARTS caps skips in the normal cell only (a reduction "skip" is a strided conv).
            if cell != "normal" or max_skip is None or len(skips) <= max_skip:
                break
            weakest = min(skips, key=lambda c: (c.weight, -c.edge))
            masked.add((weakest.edge, SKIP_OP))
        cells[cell] = chosen
    concat = list(range(2, steps + 2))
    data: dict[str, Any] = {
        "name": name,
        "space": space,
        "normal": [[c.op, c.input] for c in cells["normal"]],
        "normal_concat": concat,
        "reduce": [[c.op, c.input] for c in cells["reduce"]],
        "reduce_concat": concat,
    }
    if source is not None:
        data["source"] = source
    if notes is not None:
        data["notes"] = notes
    return Genotype.from_dict(data, origin="derived genotype")


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
    from bats_cli.genotype import MAX_CELL_NODES

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
        from bats_cli.networks import PAPER_DEFAULTS

        layers = self.layers or PAPER_DEFAULTS[self.kind]["layers"]
        channels = f"C = {self.channels}" if self.channels else "width 1x"
        where = f"`bats train --preset {self.preset}` network" if self.preset else "network"
        return f"{where}: {layers} cells, {channels}, {self.image_size} px {self.dataset}"


def match_network(preset: str | None = DEFAULT_MATCH_PRESET, *, layers: int | None = None,
                  channels: int | None = None) -> MatchNetwork:
    """The network of ``bats train GENOTYPE --preset PRESET [--layers N] [--channels C]``."""
    from bats_cli.counting import dataset_shape
    from bats_cli.presets import TRAIN_PRESETS

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
    import torch

    from bats_cli.counting import count_model
    from bats_cli.networks import build_network

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


# ---- diagnostics (Fig. 1, Fig. 2, Table 3) -----------------------------------------------------


def edge_entropy(weights: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) of every edge's op distribution; ``weights`` is (edges, ops), rows sum to 1.

    Lower means sharper (a more discriminative choice); log(#ops) is uniform.
    """
    w = torch.as_tensor(weights, dtype=torch.float64)
    return -torch.special.xlogy(w, w).sum(dim=-1)


def parameter_free_share(genotype: Genotype) -> dict[str, float]:
    """Per cell, the share of edges whose op has no parameters (skip, pooling): the real-valued path.

    Counted by op name (a stride-2 skip of a reduction cell is a factorized-reduce conv in the
    network, but it is the op the search picked as "skip").
    """
    free = set(get_space(genotype.space).parameter_free)
    out = {}
    for cell in CELLS:
        ops = [op for op, _ in genotype.cell(cell)]
        out[cell] = sum(op in free for op in ops) / len(ops) if ops else 0.0
    return out


def skip_count(genotype: Genotype) -> dict[str, int]:
    return {cell: sum(op == SKIP_OP for op, _ in genotype.cell(cell)) for cell in CELLS}


def genotype_summary(genotype: Genotype) -> str:
    """One line: ``normal: op<in op<in | ... ; reduce: ...`` (for progress output)."""
    abbrev = {
        "max_pool_3x3": "max3",
        "avg_pool_3x3": "avg3",
        "skip_connect": "skip",
        "group_conv_3x3": "g3",
        "group_conv_5x5": "g5",
        "dil_group_conv_3x3": "dg3",
        "dil_group_conv_5x5": "dg5",
        "sep_conv_3x3": "sep3",
        "sep_conv_5x5": "sep5",
        "sep_conv_7x7": "sep7",
        "dil_conv_3x3": "dil3",
        "dil_conv_5x5": "dil5",
        "conv_7x1_1x7": "c7x1",
    }
    parts = []
    for cell in CELLS:
        edges = genotype.cell(cell)
        nodes = [
            " ".join(f"{abbrev.get(op, op)}<{src}" for op, src in edges[i : i + 2])
            for i in range(0, len(edges), 2)
        ]
        parts.append(f"{cell}: " + " | ".join(nodes))
    return "; ".join(parts)


# ---- search checkpoints ------------------------------------------------------------------------


@dataclass
class ArchSnapshot:
    """What a search checkpoint says about the architecture at the moment it was saved."""

    path: Path
    space: str
    steps: int
    temperature_normal: float
    temperature_reduce: float
    candidates_normal: list[list[str]]
    candidates_reduce: list[list[str]]
    alpha_normal: torch.Tensor
    alpha_reduce: torch.Tensor
    stage: int | None = None
    epoch: int = 0
    step: int = 0
    config: dict[str, Any] = field(default_factory=dict)
    run_name: str | None = None

    def weights(self, cell: str) -> torch.Tensor:
        """softmax(α / T) per edge with this checkpoint's temperature."""
        if cell == "normal":
            return torch.softmax(self.alpha_normal.double() / self.temperature_normal, dim=-1)
        return torch.softmax(self.alpha_reduce.double() / self.temperature_reduce, dim=-1)


def resolve_checkpoint_path(path: str | Path) -> Path:
    """A checkpoint file, or a run directory (then its ``last.safetensors``)."""
    p = Path(path)
    if p.is_dir():
        last = p / "last.safetensors"
        if not last.is_file():
            raise UserInputError(f"{p} is a directory without last.safetensors; give a search checkpoint")
        return last
    if p.suffix.lower() == ".json" and p.is_file():
        raise UserInputError(
            f"{p} is a JSON file (a genotype?); `bats derive` needs a search checkpoint "
            "(.safetensors) or a search run directory"
        )
    return p


def load_arch_snapshot(path: str | Path, *, command: str | None = "derive") -> ArchSnapshot:
    """Read α, temperatures and candidate lists from a search checkpoint (UserInputError if not one)."""
    from bats_cli.checkpoint import load_checkpoint

    p = resolve_checkpoint_path(path)
    tensors, meta = load_checkpoint(p, expect_kind="search", command=command)
    raw = meta.extra.get(ARCH_STATE_KEY)
    try:
        state = json.loads(raw) if raw else None
        if not isinstance(state, dict):
            raise ValueError("missing")
        snap = ArchSnapshot(
            path=p,
            space=str(state["space"]),
            steps=int(state["steps"]),
            temperature_normal=float(state["temperature_normal"]),
            temperature_reduce=float(state["temperature_reduce"]),
            candidates_normal=[list(map(str, ops)) for ops in state["candidates_normal"]],
            candidates_reduce=[list(map(str, ops)) for ops in state["candidates_reduce"]],
            alpha_normal=tensors["model.alpha_normal"],
            alpha_reduce=tensors["model.alpha_reduce"],
            stage=state.get("stage"),
            epoch=meta.epoch,
            step=meta.step,
            config=meta.config,
            run_name=state.get("run_name"),
        )
    except (ValueError, KeyError, TypeError) as exc:
        raise UserInputError(
            f"{p}: search checkpoint without usable architecture state ({exc})"
        ) from None
    for cell, alpha, cands in (
        ("normal", snap.alpha_normal, snap.candidates_normal),
        ("reduce", snap.alpha_reduce, snap.candidates_reduce),
    ):
        if alpha.dim() != 2 or alpha.shape[0] != len(cands) or any(
            len(ops) != alpha.shape[1] for ops in cands
        ):
            raise UserInputError(
                f"{p}: {cell} architecture weights {tuple(alpha.shape)} do not match the "
                "candidate lists stored with them"
            )
    if snap.temperature_normal <= 0 or snap.temperature_reduce <= 0:
        raise UserInputError(f"{p}: temperatures must be positive")
    return snap


def safe_name(text: str, default: str = "searched") -> str:
    from bats_cli.names import safe_name as _safe

    return _safe(text, default=default)


def derive_from_checkpoint(
    path: str | Path,
    *,
    max_skip: int | None = None,
    name: str | None = None,
    source: str | None = None,
    notes: str | None = None,
) -> Genotype:
    """The DARTS-rule genotype of a search checkpoint, with no other input needed."""
    snap = load_arch_snapshot(path)
    stage = f"stage {snap.stage + 1}, " if isinstance(snap.stage, int) else ""
    default_source = f"bats derive {snap.path} ({stage}{snap.epoch} epochs done, step {snap.step})"
    default_notes = (
        f"DARTS rule on softmax(alpha/T), T_normal={snap.temperature_normal:g}, "
        f"T_reduce={snap.temperature_reduce:g}"
        + (f"; skips in the normal cell capped at {max_skip} (P-DARTS)" if max_skip is not None else "")
    )
    return derive_genotype(
        snap.weights("normal"),
        snap.weights("reduce"),
        snap.candidates_normal,
        snap.candidates_reduce,
        steps=snap.steps,
        space=snap.space,
        max_skip=max_skip,
        name=name or safe_name(snap.run_name or snap.path.parent.name),
        source=source or default_source,
        notes=notes or default_notes,
    )


def edge_report(snap_weights: torch.Tensor, candidates: Sequence[Sequence[str]], steps: int,
                alpha: torch.Tensor | None = None) -> list[dict[str, Any]]:
    """Per edge: endpoints, op -> softmax weight (and raw α), entropy; for the alphas JSON."""
    ent = edge_entropy(snap_weights)
    rows = []
    for e, ((src, dst), ops) in enumerate(zip(edge_endpoints(steps), candidates)):
        row: dict[str, Any] = {
            "edge": e,
            "input": src,
            "node": dst,
            "weights": {op: float(snap_weights[e, k]) for k, op in enumerate(ops)},
            "entropy": float(ent[e]),
            "entropy_max": math.log(len(ops)),
        }
        if alpha is not None:
            row["alpha"] = {op: float(alpha[e, k]) for k, op in enumerate(ops)}
        rows.append(row)
    return rows
