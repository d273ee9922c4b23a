"""Did the search learn? Measures of α that are not tempered by construction, end-of-stage checks.

The search ranks ops by softmax(α/T) with T = 0.2 / 0.15, so the *tempered* edge entropy falls
with T by construction (one α, stage 1 of a `--preset cpu` search: relative entropy 0.71 through
softmax(α/0.2), 0.988 through softmax(α)). Whether α learned is therefore judged on α itself:

* ``alpha_spread_<cell>``: max α − min α over an edge's candidates, mean over the cell's edges.
  α starts at 1e-3·N(0, 1) (spread ~3e-3) and Adam moves each α by about the learning rate per
  step whatever T is, so the spread says how far α travelled;
* ``entropy_<cell>_rel_t1``: the relative entropy of softmax(α) at T = 1 (entropy / log #ops);
* ``changed_edges``: how many derived edges (op or input of a node, both cells) changed over the
  last :data:`STABLE_EPOCHS` epochs.

:func:`alpha_measures` computes them from α, :func:`summarise_run` from a search directory's
``alphas/stageK_epochNN.json`` files (any version of the search wrote them), and
:func:`stage_warnings` turns a stage whose α did not move or whose cell kept changing into
warnings that name the settings giving α more updates (the searcher prints them and records them
in ``result.json``). Derived cells across seeds are compared in :mod:`bats_cli.nas.cell_similarity`.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from bats_cli.core.errors import UserInputError

# Mean α spread per edge below which α barely moved: measured at stage 1's end, 0.003-0.0075 (arch_lr 1e-9,
# tiny preset, 6 steps at 6e-4) vs 0.18 (6 steps at 2e-2) and 0.61-0.70 (`--preset cpu`, cifar10-large, seeds 0, 1).
ALPHA_SPREAD_WARN = 0.05
# The old check, on softmax(α/T)'s mean relative entropy: only for callers of the old signature.
LEGACY_ENTROPY_WARN = 0.95
# Over the last STABLE_EPOCHS search epochs of a stage, at most this share of the derived cells'
# edges (op and input of every node, both cells) may change: one near-tie flipping is normal,
# a cell rewritten is not (measured on cifar10-mini, cpu-sized search with arch_lr 1e-2: 9-14 of
# 16 edges changed in a stage's first search epoch, 1, 5 and 3 over the last 2 epochs of stages 1-3).
STABLE_EPOCHS = 2
UNSTABLE_SHARE = 0.25
CELLS = ("normal", "reduce")

MORE_UPDATES = (
    "give α more updates: more search epochs (--epochs, fewer --warmup), more steps per epoch "
    "(a larger --subset or a smaller --batch-size) or a larger α learning rate (--arch-lr)"
)

_ALPHAS_RE = re.compile(r"stage(\d+)_epoch(\d+)\.json")


# ---- measures of α -----------------------------------------------------------------------------


def softmax(row: Sequence[float], temperature: float = 1.0) -> list[float]:
    """softmax(row / temperature), computed stably."""
    scaled = [float(a) / temperature for a in row]
    top = max(scaled)
    exps = [math.exp(a - top) for a in scaled]
    total = sum(exps)
    return [e / total for e in exps]


def relative_entropy(weights: Sequence[float]) -> float:
    """Entropy of one edge's op distribution over log(#ops): 1 is uniform, 0 one op."""
    if len(weights) < 2:
        return 0.0
    h = -sum(w * math.log(w) for w in weights if w > 0)
    return h / math.log(len(weights))


def _rows(alpha: Any) -> list[list[float]]:
    """(edges, ops) α as nested lists (a tensor, an array or nested sequences)."""
    if hasattr(alpha, "tolist"):
        alpha = alpha.tolist()
    return [[float(a) for a in row] for row in alpha]


def cell_measures(alpha: Any) -> dict[str, float]:
    """Of one cell's (edges, ops) α: mean relative entropy of softmax(α) at T = 1, mean α spread."""
    rows = _rows(alpha)
    if not rows:
        return {"entropy_rel_t1": math.nan, "alpha_spread": math.nan}
    return {
        "entropy_rel_t1": sum(relative_entropy(softmax(r)) for r in rows) / len(rows),
        "alpha_spread": sum(max(r) - min(r) for r in rows) / len(rows),
    }


def alpha_measures(alpha_normal: Any, alpha_reduce: Any) -> dict[str, float]:
    """``entropy_normal_rel_t1``, ``entropy_reduce_rel_t1``, ``alpha_spread_normal``,
    ``alpha_spread_reduce`` of the raw α of both cells (no temperature anywhere)."""
    out: dict[str, float] = {}
    for cell, alpha in zip(CELLS, (alpha_normal, alpha_reduce)):
        m = cell_measures(alpha)
        out[f"entropy_{cell}_rel_t1"] = m["entropy_rel_t1"]
        out[f"alpha_spread_{cell}"] = m["alpha_spread"]
    return {k: out[k] for k in ("entropy_normal_rel_t1", "entropy_reduce_rel_t1",
                                "alpha_spread_normal", "alpha_spread_reduce")}


# ---- derived cells -------------------------------------------------------------------------------


def as_genotype_dict(genotype: Any) -> Mapping[str, Any]:
    """A genotype as its dict: from a ``Genotype``, a dict, or the path of a genotype JSON file."""
    if hasattr(genotype, "to_dict"):
        return genotype.to_dict()
    if isinstance(genotype, (str, Path)):
        return json.loads(Path(genotype).read_text(encoding="utf-8"))
    return genotype


def _edges(genotype: Mapping[str, Any]) -> Counter:
    """The chosen edges of both cells as a multiset of (cell, node, input, op)."""
    return Counter((cell, i // 2, int(src), op) for cell in CELLS
                   for i, (op, src) in enumerate(genotype.get(cell, [])))


def changed_edges(before: Mapping[str, Any], after: Mapping[str, Any]) -> int:
    """How many chosen edges of ``after`` were not chosen in ``before`` (op or input differs)."""
    return sum((_edges(as_genotype_dict(after)) - _edges(as_genotype_dict(before))).values())


def cell_changes(genotypes: Sequence[Mapping[str, Any]]) -> int:
    """How many times the derived cell changed from one epoch's genotype to the next."""
    return sum(changed_edges(a, b) > 0 for a, b in zip(genotypes, genotypes[1:]))


# ---- end-of-stage checks -----------------------------------------------------------------------


def stage_warnings(
    *,
    stage: int,
    search_genotypes: Sequence[Mapping[str, Any]],
    alpha_spread_normal: float | None = None,
    alpha_spread_reduce: float | None = None,
    entropy_normal_rel_t1: float | None = None,
    entropy_reduce_rel_t1: float | None = None,
    entropy_normal_rel: float | None = None,
    entropy_reduce_rel: float | None = None,
    threshold: float = ALPHA_SPREAD_WARN,
    stable_epochs: int = STABLE_EPOCHS,
    unstable_share: float = UNSTABLE_SHARE,
) -> list[dict[str, Any]]:
    """Warnings for a finished stage (empty when α learned).

    ``uniform``: the mean α spread per edge of both cells is below ``threshold`` (α has not
    moved far from its initial noise; measured on α itself, so the search's temperatures do not
    make it look sharp). ``search_genotypes``: the genotypes derived at the end of each search
    (non-warm-up) epoch of the stage, in order; ``unstable``: over the last ``stable_epochs`` of
    them more than ``unstable_share`` of the chosen edges changed. The T = 1 entropies, when given,
    are recorded in the warning. ``entropy_normal_rel`` / ``entropy_reduce_rel`` (softmax(α/T)) are
    for callers of the older signature only: without the spreads they get the old, tempered check
    (a search process started before this version imports this module at its first stage's end).
    """
    out: list[dict[str, Any]] = []
    if alpha_spread_normal is None or alpha_spread_reduce is None:
        if entropy_normal_rel is None or entropy_reduce_rel is None:
            raise TypeError("stage_warnings needs alpha_spread_normal and alpha_spread_reduce")
        mean_rel = (entropy_normal_rel + entropy_reduce_rel) / 2
        if mean_rel > LEGACY_ENTROPY_WARN:
            out.append({
                "stage": stage, "kind": "uniform", "entropy_rel": round(mean_rel, 4),
                "message": (f"stage {stage}: α is still nearly uniform (mean relative edge entropy "
                            f"{mean_rel:.3f} > {LEGACY_ENTROPY_WARN}); the derived cell is close to "
                            f"arbitrary; {MORE_UPDATES}"),
            })
        return out + _unstable(stage, search_genotypes, stable_epochs, unstable_share)
    spread = (alpha_spread_normal + alpha_spread_reduce) / 2
    if spread < threshold:
        warning: dict[str, Any] = {
            "stage": stage,
            "kind": "uniform",
            "alpha_spread": round(spread, 6),
            "threshold": threshold,
        }
        if entropy_normal_rel_t1 is not None and entropy_reduce_rel_t1 is not None:
            warning["entropy_rel_t1"] = round((entropy_normal_rel_t1 + entropy_reduce_rel_t1) / 2, 6)
        warning["message"] = (
            f"stage {stage}: α has barely moved (mean spread max α - min α per edge {spread:.4f} "
            f"< {threshold}); the derived cell is close to arbitrary; {MORE_UPDATES}"
        )
        out.append(warning)
    return out + _unstable(stage, search_genotypes, stable_epochs, unstable_share)


def _unstable(stage: int, search_genotypes: Sequence[Mapping[str, Any]], stable_epochs: int,
              unstable_share: float) -> list[dict[str, Any]]:
    """The ``unstable`` warning of :func:`stage_warnings` (a list of at most one)."""
    out: list[dict[str, Any]] = []
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


# ---- a search directory, post hoc --------------------------------------------------------------


def _alphas_files(search_dir: Path) -> dict[int, dict[int, Path]]:
    """stage -> epoch -> ``alphas/stageK_epochNN.json``."""
    out: dict[int, dict[int, Path]] = {}
    for path in (Path(search_dir) / "alphas").glob("stage*_epoch*.json"):
        m = _ALPHAS_RE.fullmatch(path.name)
        if m:
            out.setdefault(int(m.group(1)), {})[int(m.group(2))] = path
    return out


def doc_alpha(doc: Mapping[str, Any], cell: str) -> list[list[float]] | None:
    """Raw α of one cell of an alphas document, in each edge's candidate order.

    Every version of the search recorded ``alpha`` per edge; for a file without it, α is
    recovered up to a constant per edge from the tempered weights (α = T log w), which leaves
    spreads and softmax(α) unchanged. None when neither is there.
    """
    temp = doc.get(f"temperature_{cell}")
    rows = []
    for edge in doc.get(cell, []):
        if isinstance(edge.get("alpha"), Mapping):
            rows.append([float(a) for a in edge["alpha"].values()])
        elif isinstance(edge.get("weights"), Mapping) and temp:
            rows.append([float(temp) * math.log(max(float(w), 1e-300)) for w in edge["weights"].values()])
        else:
            return None
    return rows


def _tempered_rel(doc: Mapping[str, Any], cell: str) -> float:
    """Mean relative entropy of the recorded softmax(α/T) of one cell (the search's measure)."""
    vals = []
    for edge in doc.get(cell, []):
        weights = [float(w) for w in edge.get("weights", {}).values()]
        vals.append(relative_entropy(weights))
    return sum(vals) / len(vals) if vals else math.nan


def doc_measures(doc: Mapping[str, Any]) -> dict[str, float | None]:
    """Tempered and untempered measures of one alphas document (one epoch)."""
    out: dict[str, float | None] = {
        "entropy_normal_rel": _tempered_rel(doc, "normal"),
        "entropy_reduce_rel": _tempered_rel(doc, "reduce"),
    }
    an, ar = doc_alpha(doc, "normal"), doc_alpha(doc, "reduce")
    if an is None or ar is None:
        out.update(dict.fromkeys(("entropy_normal_rel_t1", "entropy_reduce_rel_t1",
                                  "alpha_spread_normal", "alpha_spread_reduce")))
    else:
        out.update(alpha_measures(an, ar))
    return out


def read_alphas(search_dir: Path, stage: int, epoch: int) -> dict[str, Any] | None:
    """``alphas/stageK_epochNN.json`` of one epoch (any zero padding), or None."""
    path = _alphas_files(search_dir).get(stage, {}).get(epoch)
    return json.loads(path.read_text(encoding="utf-8")) if path else None


def _stage_docs(search_dir: Path, stage: int) -> list[tuple[int, dict[str, Any]]]:
    """(epoch, alphas document) of one stage, in epoch order."""
    files = _alphas_files(search_dir).get(stage, {})
    return [(e, json.loads(files[e].read_text(encoding="utf-8"))) for e in sorted(files)]


def _round(v: Any) -> Any:
    return round(v, 6) if isinstance(v, float) and math.isfinite(v) else v


def summarise_stage(search_dir: str | Path, stage: int, *, stable_epochs: int = STABLE_EPOCHS) -> dict[str, Any] | None:
    """The health of one stage of a search directory from its alphas files (None without any).

    Keys: ``stage``, ``finished`` (``genotypes/stageK.json`` exists), ``last_epoch``,
    ``search_epochs``, ``ops_per_edge``, ``layers``, ``temperature_normal`` / ``_reduce``; at
    the last epoch ``entropy_normal_rel`` / ``entropy_reduce_rel`` (softmax(α/T), tempered),
    ``entropy_normal_rel_t1`` / ``entropy_reduce_rel_t1`` (softmax(α)), ``alpha_spread_normal``
    / ``alpha_spread_reduce``; ``changed_edges`` of ``edges`` over the last ``changed_epochs``
    search epochs (the ``unstable`` warning's count; None with fewer than 2 search epochs),
    ``cell_changes`` (epochs whose cell differed from the previous search epoch's),
    ``genotype`` (the stage's final cell) and ``per_epoch`` (every epoch's measures and
    ``changed_edges_last``, as in ``metrics.csv``).
    """
    search_dir = Path(search_dir)
    docs = _stage_docs(search_dir, stage)
    if not docs:
        return None
    last_epoch, last = docs[-1]
    by_epoch = dict(docs)
    per_epoch = []
    for e, doc in docs:
        # As metrics.csv's changed_edges_last: against the stage's epoch e - stable_epochs (0: initial α).
        before = by_epoch.get(max(e - stable_epochs, 0), {}).get("genotype")
        per_epoch.append({"epoch": e, "phase": doc.get("phase"),
                          **{k: _round(v) for k, v in doc_measures(doc).items()},
                          "changed_edges_last": (changed_edges(before, doc["genotype"])
                                                 if before and doc.get("genotype") else None)})
    search = [doc.get("genotype") for e, doc in docs if doc.get("phase") == "search" and doc.get("genotype")]
    tail = search[-(stable_epochs + 1):]
    gpath = search_dir / "genotypes" / f"stage{stage}.json"
    genotype = json.loads(gpath.read_text(encoding="utf-8")) if gpath.is_file() else last.get("genotype")
    return {
        "stage": stage,
        # A published run keeps no genotypes/ files; its result.json means every stage finished.
        "finished": gpath.is_file() or (search_dir / "result.json").is_file(),
        "last_epoch": last_epoch,
        "search_epochs": sum(doc.get("phase") == "search" for _, doc in docs),
        "ops_per_edge": last.get("ops_per_edge"),
        "layers": last.get("layers"),
        "temperature_normal": last.get("temperature_normal"),
        "temperature_reduce": last.get("temperature_reduce"),
        **{k: v for k, v in per_epoch[-1].items() if k not in ("epoch", "phase", "changed_edges_last")},
        "changed_edges": changed_edges(tail[0], tail[-1]) if len(tail) >= 2 else None,
        "changed_epochs": len(tail) - 1 if len(tail) >= 2 else 0,
        "edges": sum(_edges(genotype).values()) if genotype else None,
        "cell_changes": cell_changes(search),
        "genotype": genotype,
        "per_epoch": per_epoch,
    }


def summarise_run(search_dir: str | Path, *, stable_epochs: int = STABLE_EPOCHS) -> dict[str, Any]:
    """The health of every stage of a search directory, post hoc, from ``alphas/*.json``.

    Works on run directories of any version of ``bats search`` and on unfinished runs (stages
    with alphas files so far). Returns ``search_dir``, ``stable_epochs``, ``stages`` (one
    :func:`summarise_stage` dict per stage, in order), ``warnings`` (:func:`stage_warnings` of
    every finished stage, with today's thresholds), ``genotype`` (``genotype.json``, None until
    the search finished) and ``finished``.
    """
    search_dir = Path(search_dir)
    if not (search_dir / "alphas").is_dir():
        raise UserInputError(f"{search_dir}: no alphas/ directory; is it a `bats search` run directory?")
    stages = [s for s in (summarise_stage(search_dir, k, stable_epochs=stable_epochs)
                          for k in sorted(_alphas_files(search_dir))) if s is not None]
    warnings: list[dict[str, Any]] = []
    for s in stages:
        if not s["finished"] or s["alpha_spread_normal"] is None:
            continue
        docs = _stage_docs(search_dir, s["stage"])
        # The unrounded measures of the last epoch, as the search judged them.
        measures = alpha_measures(doc_alpha(docs[-1][1], "normal"), doc_alpha(docs[-1][1], "reduce"))
        warnings += stage_warnings(
            stage=s["stage"], **measures, stable_epochs=stable_epochs,
            search_genotypes=[d["genotype"] for _, d in docs if d.get("phase") == "search" and d.get("genotype")],
        )
    gpath = search_dir / "genotype.json"
    return {
        "search_dir": str(search_dir),
        "stable_epochs": stable_epochs,
        "stages": stages,
        "warnings": warnings,
        "genotype": json.loads(gpath.read_text(encoding="utf-8")) if gpath.is_file() else None,
        "finished": gpath.is_file(),
    }


def stage_line(summary: Mapping[str, Any]) -> str:
    """One line of a stage's health for progress output."""
    parts = []
    sn, sr = summary.get("alpha_spread_normal"), summary.get("alpha_spread_reduce")
    if sn is not None and sr is not None:
        parts.append(f"α spread {sn:.3f}/{sr:.3f}")
    tn, tr = summary.get("entropy_normal_rel_t1"), summary.get("entropy_reduce_rel_t1")
    if tn is not None and tr is not None:
        parts.append(f"H(T=1) {tn:.4f}/{tr:.4f}")
    parts.append(f"H(T) {summary['entropy_normal_rel']:.3f}/{summary['entropy_reduce_rel']:.3f}")
    if summary.get("changed_edges") is not None:
        parts.append(f"{summary['changed_edges']}/{summary['edges']} edges changed in the last "
                     f"{summary['changed_epochs']} epoch(s)")
    return ", ".join(parts)
