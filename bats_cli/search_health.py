"""Did the search learn? End-of-stage checks on α that turn a silent no-op search into a warning.

A search whose architecture weights got too few updates ends with near-uniform edges (relative
entropy ≈ 1) and a derived cell that changes every epoch: its genotype is noise. At the end of
every stage :func:`stage_warnings` checks both and returns warnings that name the settings giving
α more updates; the searcher prints them and records them in ``result.json``.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

# Mean relative edge entropy (entropy / log #ops, both cells) above which α has barely moved.
ENTROPY_WARN = 0.95
# Over the last STABLE_EPOCHS search epochs of a stage, at most this share of the derived cells'
# edges (op and input of every node, both cells) may change: one near-tie flipping is normal,
# a cell rewritten is not (measured on cifar10-mini, cpu-sized search with arch_lr 1e-2: 9-14 of
# 16 edges changed in a stage's first search epoch, 1, 5 and 3 over the last 2 epochs of stages 1-3).
STABLE_EPOCHS = 2
UNSTABLE_SHARE = 0.25

MORE_UPDATES = (
    "give α more updates: more search epochs (--epochs, fewer --warmup), more steps per epoch "
    "(a larger --subset or a smaller --batch-size) or a larger α learning rate (--arch-lr)"
)


def _edges(genotype: Mapping[str, Any]) -> Counter:
    """The chosen edges of both cells as a multiset of (cell, node, input, op)."""
    return Counter((cell, i // 2, int(src), op) for cell in ("normal", "reduce")
                   for i, (op, src) in enumerate(genotype.get(cell, [])))


def changed_edges(before: Mapping[str, Any], after: Mapping[str, Any]) -> int:
    """How many chosen edges of ``after`` were not chosen in ``before`` (op or input differs)."""
    return sum((_edges(after) - _edges(before)).values())


def cell_changes(genotypes: Sequence[Mapping[str, Any]]) -> int:
    """How many times the derived cell changed from one epoch's genotype to the next."""
    return sum(changed_edges(a, b) > 0 for a, b in zip(genotypes, genotypes[1:]))


def stage_warnings(
    *,
    stage: int,
    entropy_normal_rel: float,
    entropy_reduce_rel: float,
    search_genotypes: Sequence[Mapping[str, Any]],
    threshold: float = ENTROPY_WARN,
    stable_epochs: int = STABLE_EPOCHS,
    unstable_share: float = UNSTABLE_SHARE,
) -> list[dict[str, Any]]:
    """Warnings for a finished stage (empty when α learned).

    ``search_genotypes``: the genotypes derived at the end of each search (non-warm-up) epoch of
    the stage, in order; over the last ``stable_epochs`` of them at most ``unstable_share`` of
    the chosen edges may have changed.
    """
    out: list[dict[str, Any]] = []
    mean_rel = (entropy_normal_rel + entropy_reduce_rel) / 2
    if mean_rel > threshold:
        out.append({
            "stage": stage,
            "kind": "uniform",
            "entropy_rel": round(mean_rel, 4),
            "message": (
                f"stage {stage}: α is still nearly uniform (mean relative edge entropy "
                f"{mean_rel:.3f} > {threshold}); the derived cell is close to arbitrary; {MORE_UPDATES}"
            ),
        })
    tail = list(search_genotypes)[-(stable_epochs + 1):]
    if len(tail) >= 2:
        total = sum(_edges(tail[-1]).values())
        changed = changed_edges(tail[0], tail[-1])
        if total and changed > unstable_share * total:
            out.append({
                "stage": stage,
                "kind": "unstable",
                "changed_edges": changed,
                "edges": total,
                "epochs": len(tail) - 1,
                "message": (
                    f"stage {stage}: {changed} of the derived cells' {total} edges changed in the "
                    f"last {len(tail) - 1} epoch(s), so the cell has not settled; {MORE_UPDATES}"
                ),
            })
    return out


def read_epoch_genotypes(run_dir: Path, stage: int, epochs: Sequence[int], width: int) -> list[dict[str, Any]]:
    """The genotypes ``genotypes/stageK_epochNN.json`` the search wrote for ``epochs`` (those present)."""
    out = []
    for e in epochs:
        path = Path(run_dir) / "genotypes" / f"stage{stage}_epoch{e:0{width}d}.json"
        if path.is_file():
            out.append(json.loads(path.read_text(encoding="utf-8")))
    return out
