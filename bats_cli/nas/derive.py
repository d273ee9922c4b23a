"""From architecture weights to a genotype (DARTS rule), temperature diagnostics, search checkpoints.

Random genotypes (the baseline, and cells matched in size) are in :mod:`bats_cli.nas.random_genotypes`.

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
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from bats_cli.core.errors import UserInputError
from bats_cli.core.genotype import CELLS, Genotype
from bats_cli.core.names import safe_name
from bats_cli.core.spaces import edge_endpoints, get_space

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
    from bats_cli.storage.checkpoint import load_checkpoint

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
        name=name or safe_name(snap.run_name or snap.path.parent.name, default="searched"),
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
