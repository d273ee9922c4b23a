"""A study's statistics: which rows are compared with which, paired over seeds (bootstrap interval, t,
exact Wilcoxon, McNemar on per-image predictions: `bats_cli.studies.stats`), and the diagnosis of whether the
supernet's preference for a cell predicts its accuracy (Kendall τ). Arithmetic on finished jobs' records."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bats_cli.studies.catalog import REFERENCE
from bats_cli.studies.jobs import StudyOptions, read_json
from bats_cli.studies.stats import kendall_tau, mcnemar_exact, paired_comparison


def comparison_pairs(study: str, names: Sequence[str]) -> list[tuple[str, str]]:
    """(a, b) pairs compared seed for seed (a − b): a study's reference row against every other row; in
    the random study each searched arm against each random arm, and the two selections; in the
    recipe study each recipe against the paper's, and each addition to kd against kd."""
    if study == "random":
        pairs = [(a, b) for a in ("searched", "searched-perturbation")
                 for b in ("random", "random-matched", "random-search")]
        pairs.append(("searched-perturbation", "searched"))
    elif study == "proxy":
        pairs = [("searched-c12", "random"), ("searched", "random"), ("searched-c12", "searched")]
    elif study == "recipe":  # does a recipe help: each one minus the paper's, then what each adds to kd
        pairs = [(v, "paper") for v in names if v != "paper"] + [("kd+attention", "kd"), ("kd+rprelu", "kd")]
    else:
        ref = REFERENCE[study]
        pairs = [(ref, v) for v in names if v != ref]
    return [(a, b) for a, b in pairs if a in names and b in names]


def _load_predictions(root: Path, rel: str | None):
    if rel is None:
        return None
    path = root / rel
    try:
        arr = np.load(path, allow_pickle=False)
    except (OSError, ValueError):
        return None
    return arr if arr.ndim == 2 and arr.shape[0] == 2 else None


def _rerun_of(rec: Mapping[str, Any], other: str) -> bool:
    """``rec`` was derived from a re-run of ``other``'s search that did not reproduce it."""
    return rec.get("search_of") == other and bool(rec.get("own_search")) and not rec.get("search_reproduced")


def same_alpha_history(run: Path, recorded: Path) -> bool:
    """Whether a re-run search reproduced a recorded one: the same α history files, and in each the
    same α of both cells at every epoch (exact; later versions add diagnostics beside α, not compared)."""
    mine = sorted(p.name for p in run.glob("alphas/*.json"))
    if not mine or mine != sorted(p.name for p in recorded.glob("alphas/*.json")):
        return False
    for name in mine:
        a, b = read_json(run / "alphas" / name), read_json(recorded / "alphas" / name)
        if a is None or b is None or any(a.get(c) is None or a.get(c) != b.get(c) for c in ("normal", "reduce")):
            return False
    return True


def compare(study: str, names: Sequence[str], records: Sequence[Mapping[str, Any]], root: Path,
            metric: str = "binary_top1") -> list[dict[str, Any]]:
    """Paired statistics (bootstrap interval, t, exact Wilcoxon, wins, verdict) of every compared
    pair over the seeds both finished; with per-image predictions on the same images, an exact
    McNemar test per seed."""
    out = []
    for a, b in comparison_pairs(study, names):
        ra = {r["seed"]: r for r in records if r["variant"] == a and r.get(metric) is not None}
        rb = {r["seed"]: r for r in records if r["variant"] == b and r.get(metric) is not None}
        common = sorted(set(ra) & set(rb))
        # A row derived from the other row's search is compared with it only where both read the
        # same supernet: a re-run of that search counts only if it reproduced its α history.
        rerun = [s for s in common if _rerun_of(ra[s], b) or _rerun_of(rb[s], a)]
        seeds = [s for s in common if s not in rerun]
        if not seeds:
            continue
        res = paired_comparison([ra[s][metric] for s in seeds], [rb[s][metric] for s in seeds],
                                name_a=a, name_b=b, seed=0)
        res = {"metric": metric, "seeds": seeds, **res}
        if rerun:
            res["seeds_left_out"] = {"seeds": rerun, "why": "not the same search: the derived row's re-run of it "
                                                            "did not reproduce its α history"}
        if metric == "binary_top1":
            tests = []
            for s in seeds:
                if ra[s].get("images_sha256") is None or ra[s]["images_sha256"] != rb[s].get("images_sha256"):
                    continue
                pa = _load_predictions(root, ra[s].get("predictions"))
                pb = _load_predictions(root, rb[s].get("predictions"))
                if pa is None or pb is None or pa.shape != pb.shape:
                    continue
                tests.append({"seed": s, **mcnemar_exact(pa[0], pb[0], pa[1])})
            res["mcnemar"] = tests
        out.append(res)
    return out


def _stage1_alpha(search_dir: Path) -> dict[str, dict[tuple[int, int], dict[str, float]]] | None:
    """α of the last stage-1 epoch (every op of the space on every edge), keyed by (node, input)."""
    files = sorted(search_dir.glob("alphas/stage1_epoch*.json"))
    doc = read_json(files[-1]) if files else None
    if doc is None:
        return None
    out = {}
    for cell in ("normal", "reduce"):
        edges = doc.get(cell)
        if not isinstance(edges, list) or not all(
                isinstance(e, dict) and isinstance(e.get("alpha"), dict) for e in edges):
            return None
        out[cell] = {(int(e["node"]), int(e["input"])): {k: float(v) for k, v in e["alpha"].items()} for e in edges}
    return out


def supernet_preference(alpha: Mapping[str, Mapping[tuple[int, int], Mapping[str, float]]],
                        genotype: Mapping[str, Any]) -> float | None:
    """How much a supernet prefers a cell: the sum over its chosen edges (both cells) of
    log softmax(α) (T = 1) of the chosen op on that edge. None if an op is not on the edge."""
    total = 0.0
    for cell in ("normal", "reduce"):
        for i, (op, src) in enumerate(genotype.get(cell, [])):
            row = alpha[cell].get((i // 2 + 2, int(src)))
            if row is None or op not in row:
                return None
            m = max(row.values())
            log_z = m + math.log(sum(math.exp(v - m) for v in row.values()))
            total += row[op] - log_z
    return total


def diagnosis(o: StudyOptions, records: Sequence[Mapping[str, Any]]) -> dict[str, Any] | None:
    """Does the supernet's preference predict stand-alone accuracy? Kendall τ between each trained
    cell's preference under its seed's supernet (stage 1's final α: all ops on all edges) and its
    fully binary top-1, beside the naive predictors (parameters, OPs). Arithmetic on finished jobs."""
    ref = REFERENCE.get(o.study)
    alphas = {s: _stage1_alpha(o.out / ref / f"seed{s}" / "search") for s in {r["seed"] for r in records}}
    rows = []
    for r in records:
        a = alphas.get(r["seed"])
        if r.get("binary_top1") is None or not r.get("genotype") or a is None:
            continue
        pref = supernet_preference(a, r["genotype"])
        if pref is not None:
            rows.append({"variant": r["variant"], "seed": r["seed"], "preference": round(pref, 4),
                         "binary_top1": r["binary_top1"], "params": r.get("params"), "ops": r.get("ops")})
    if len(rows) < 3:
        return None
    top1 = [x["binary_top1"] for x in rows]
    out = {"cells": len(rows), "alpha": "stage 1's final α (T = 1) of the same seed's search", "rows": rows,
           "preference": kendall_tau([x["preference"] for x in rows], top1)}
    for key in ("params", "ops"):
        if all(x[key] is not None for x in rows):
            out[key] = kendall_tau([x[key] for x in rows], top1)
    return out
