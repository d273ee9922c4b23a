"""How alike the derived cells of several searches are (seeds of one study), against chance:
:func:`cell_similarity` per pair of genotypes and cell, :func:`chance_similarity` analytically."""

from __future__ import annotations

import itertools
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

from bats_cli.core.errors import UserInputError
from bats_cli.nas.search_health import CELLS, as_genotype_dict


def _node_choices(genotype: Mapping[str, Any], cell: str) -> list[Counter]:
    """Per node, the multiset of its (op, input) choices (their order, strongest first, is not
    part of the architecture)."""
    gene = genotype.get(cell, [])
    return [Counter((op, int(src)) for op, src in gene[i:i + 2]) for i in range(0, len(gene), 2)]


def _shared(a: Mapping[str, Any], b: Mapping[str, Any], cell: str) -> tuple[int, int]:
    """(identical choices, slots) of one cell of two genotypes, node by node."""
    na, nb = _node_choices(a, cell), _node_choices(b, cell)
    if len(na) != len(nb):
        raise UserInputError(f"{cell} cells with {len(na)} and {len(nb)} nodes cannot be compared")
    same = sum(sum((x & y).values()) for x, y in zip(na, nb))
    return same, sum(sum(x.values()) for x in na)


def chance_similarity(space: str, steps: int = 4) -> float:
    """The expected share of identical (op, input) choices of two independent random cells
    (``random_genotypes.random_genotype``: per node two distinct inputs of its ``n`` predecessors, each
    with one of the ``m`` ops other than ``none``), computed analytically: a choice of one cell
    is matched when the other picked the same input (2/n) with the same op (1/m), so a node's
    share is 2 / (n m) and the cell's the mean over nodes."""
    from bats_cli.core.spaces import get_space

    m = sum(op != "none" for op in get_space(space).candidates)
    return sum(2 / ((node + 2) * m) for node in range(steps)) / steps


def cell_similarity(genotypes: Sequence[Any]) -> dict[str, Any]:
    """Cross-seed similarity of derived cells.

    ``genotypes``: ``Genotype`` objects, genotype dicts or paths of genotype JSON files (same
    space and node count). Per pair of genotypes and per cell, the share of the cell's node slots
    (2 per node) whose (op, input) choice is identical, node by node (within a node the order of
    the two choices does not count). Returns ``names``, ``pairs`` (how many), ``normal``,
    ``reduce``, ``both`` (means over pairs; None for fewer than 2 genotypes), ``matrix`` (cell ->
    n × n per-pair shares, 1.0 on the diagonal) and ``chance`` (cell -> the same share for two
    uniformly random cells of the space, analytic, see :func:`chance_similarity`; ``method``).
    """
    docs = [as_genotype_dict(g) for g in genotypes]
    n = len(docs)
    spaces = {d.get("space", "bats") for d in docs}
    if len(spaces) > 1:
        raise UserInputError(f"genotypes of different spaces cannot be compared: {sorted(spaces)}")
    space = spaces.pop() if spaces else "bats"
    steps = len(docs[0].get("normal", [])) // 2 if docs else 4
    matrix: dict[str, list[list[float]]] = {k: [[1.0] * n for _ in range(n)] for k in (*CELLS, "both")}
    sums = dict.fromkeys((*CELLS, "both"), 0.0)
    pairs = list(itertools.combinations(range(n), 2))
    for i, j in pairs:
        counts = {cell: _shared(docs[i], docs[j], cell) for cell in CELLS}
        counts["both"] = (sum(c[0] for c in counts.values()), sum(c[1] for c in counts.values()))
        for key, (same, slots) in counts.items():
            share = same / slots if slots else math.nan
            matrix[key][i][j] = matrix[key][j][i] = share
            sums[key] += share
    chance = chance_similarity(space, steps)
    return {
        "names": [d.get("name", str(k)) for k, d in enumerate(docs)],
        "space": space,
        "pairs": len(pairs),
        **{key: (sums[key] / len(pairs) if pairs else None) for key in (*CELLS, "both")},
        "matrix": matrix,
        "chance": {"normal": chance, "reduce": chance, "both": chance,
                   "method": "analytic: mean over nodes of 2 / (inputs × ops other than none), "
                             "for random_genotypes.random_genotype cells"},
    }
