"""A study's summary, read from its jobs' result files: one record per job (top-1, costs, the search's
health, what ran), one row per variant (mean ± std over seeds), the paired comparisons and the
diagnosis (`study_compare`); written as ``results.json``, ``results.md`` (beside the paper's numbers)
and ``results.png`` (needs matplotlib, the ``report`` extra)."""

from __future__ import annotations

import csv
import math
import statistics
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from bats_cli.core.archs import MODELS, model_key
from bats_cli.core.fileio import atomic_write_json, atomic_write_text
from bats_cli.core.zoo import resolve_genotype
from bats_cli.nas.cell_similarity import cell_similarity
from bats_cli.nas.search_health import summarise_run
from bats_cli.studies.compare import compare, diagnosis, same_alpha_history
from bats_cli.studies.jobs import (
    EVAL_NAME,
    EXECUTED_NAME,
    JOB_NAME,
    MATCH_NAME,
    STEPS_NAME,
    Job,
    StudyOptions,
    read_json,
)
from bats_cli.studies.stats import binomial_se


def _mean_std(values: Sequence[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _last_entropy(search_dir: Path) -> dict[str, float] | None:
    path = search_dir / "metrics.csv"
    if not path.is_file():
        return None
    with open(path, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    if not rows:
        return None
    return {k: float(rows[-1][k]) for k in ("entropy_normal_rel", "entropy_reduce_rel")}


def _cost(train_result: Mapping[str, Any], genotype) -> dict[str, float]:
    """Parameters and ops (FLOPs + BOPs/64) of the trained network at its input size
    (``genotype`` None: a fixed model, rebuilt from its settings alone)."""
    from bats_cli.models.counting import count_model  # torch: not loaded by --emit
    from bats_cli.models.modelio import build_from_settings

    net = train_result["network"]
    model = build_from_settings(genotype, net)
    size = int(net.get("image_size") or 32)
    report = count_model(model, (int(net["in_channels"]), size, size))
    return {"params": report.params, "ops": report.ops, "bops": report.bops, "flops": report.flops}


def job_record(job: Job, status: str | None = None, *, eval_name: str = EVAL_NAME,
               root: Path | None = None) -> dict[str, Any]:
    """What one job produced (read from its result files); ``eval_name``: which eval result of the
    job is its top-1 (``eval.json``, or one written by ``--evaluate-on``); paths relative to ``root``."""
    from bats_cli.nas.derive import parameter_free_share  # torch: not loaded by --emit

    ev = read_json(job.dir / eval_name)
    rec: dict[str, Any] = {"variant": job.variant.name, "seed": job.seed, "dir": _rel(job.dir, root),
                           "status": "done" if ev is not None else (status or "pending")}
    bz, tr = read_json(job.dir / "binarize" / "result.json"), read_json(job.dir / "train" / "result.json")
    sr = read_json(job.dir / "search" / "result.json")
    rec["binary_top1"] = ev["top1"] if ev else None
    rec["n_images"] = ev.get("n_images") if ev else None
    rec["top1_se"] = (ev.get("top1_se") if ev and ev.get("top1_se") is not None else
                      (binomial_se(ev["top1"], ev["n_images"]) if ev and ev.get("n_images") else None))
    rec["images_sha256"] = ev.get("images_sha256") if ev else None
    rec["predictions"] = (_rel(job.dir / ev["predictions"], root)
                          if ev and isinstance(ev.get("predictions"), str) else None)
    rec["step1_top1"] = bz["step1_top1"] if bz else None
    rec["seconds"] = read_json(job.dir / STEPS_NAME) or {}
    # The argv of every step as it ran (recorded by run_job), not regenerated from today's code.
    rec["executed"] = read_json(job.dir / EXECUTED_NAME) or {}
    rec["reused_from"] = (read_json(job.dir / JOB_NAME) or {}).get("reused_from")
    if job.variant.search_of:
        # Derived from the other row's supernet, or from a re-run of its search (when it kept no checkpoint).
        rec["search_of"] = job.variant.search_of
        rec["own_search"] = (job.dir / "search").is_dir()
        if rec["own_search"]:  # a re-run with the other row's α history at every epoch is the same search
            rec["search_reproduced"] = same_alpha_history(job.dir / "search", job.row(job.variant.search_of) / "search")
    if rec["status"] == "failed":
        rec["error"] = step_error(job)
    if sr is not None:
        rec["search_warnings"] = [w["message"] for w in sr.get("warnings", [])]
        rec["entropy_rel"] = _last_entropy(job.dir / "search")
        if (job.dir / "search" / "alphas").is_dir():
            health = summarise_run(job.dir / "search")
            rec["search_health"] = {**health, "search_dir": _rel(job.dir / "search", root)}
    if job.variant.candidates:
        rec["candidates"] = _candidates(job)
        rec["selection_seconds"] = round(sum(v for k, v in rec["seconds"].items() if k.startswith("candidate")), 1)
    if job.variant.match_of:
        rec["match"] = read_json(job.dir / MATCH_NAME)
    if job.variant.teacher is not None:
        # The teacher's cost (trained by the job of variant `teacher`, shared by the seed's other rows).
        te = read_json(job.row(job.variant.teacher) / "teacher" / "result.json")
        rec["teacher"] = job.variant.teacher
        rec["teacher_seconds"] = te.get("seconds") if te else None
        rec["teacher_val_top1"] = te.get("final_val_top1") if te else None
    geno_src = job.variant.genotype or str(job.dir / "genotype.json")
    if job.variant.genotype and model_key(job.variant.genotype):
        # Not a cell network: no genotype and no parameter-free share of its cells.
        rec["genotype"] = None
        rec["arch"] = model_key(job.variant.genotype)
        rec["param_free_normal"] = rec["param_free_reduce"] = None
        if tr is not None and "network" in tr:
            rec.update(_cost(tr, None))
    elif job.variant.genotype or (job.dir / "genotype.json").is_file():
        g = resolve_genotype(geno_src)
        rec["genotype"] = g.to_dict()
        share = parameter_free_share(g)
        rec["param_free_normal"], rec["param_free_reduce"] = share["normal"], share["reduce"]
        if tr is not None and "network" in tr:
            rec.update(_cost(tr, g))
    return rec


def _rel(path: Path, root: Path | None) -> str:
    """``path`` relative to the study directory (results files carry no machine paths)."""
    if root is not None:
        try:
            return path.relative_to(root).as_posix()
        except ValueError:
            pass
    return path.as_posix()


def _candidates(job: Job) -> list[dict[str, Any]]:
    """The random-search candidates of ``job``: genotype, held-out top-1, training seconds."""
    rows = []
    for cdir in sorted((job.dir / "candidates").glob("c*")):
        res, cfg = read_json(cdir / "train" / "result.json"), read_json(cdir / "train" / "config.json") or {}
        rows.append({"candidate": cdir.name, "genotype": (cfg.get("genotype") or {}).get("name"),
                     "holdout_top1": res.get("final_val_top1") if res else None,
                     "seconds": res.get("seconds") if res else None})
    chosen = read_json(job.dir / "genotype.json")
    for r in rows:
        r["chosen"] = chosen is not None and r["genotype"] == chosen.get("name")
    return rows


def step_error(job: Job) -> str | None:
    """The last `error:` line of the job's most recent step log (why it failed), if any."""
    logs = sorted((job.dir / "logs").glob("*.log"), key=lambda p: p.stat().st_mtime)
    for log in reversed(logs[-1:]):
        try:
            lines = log.read_text(encoding="utf-8", errors="replace").splitlines()
        except OSError:
            return None
        errors = [line.strip() for line in lines if line.startswith("error:")]
        if errors:
            return f"{log.stem}: {errors[-1]}"
    return None



def summarise(o: StudyOptions, jobs: Sequence[Job], status: Mapping[str, str] | None = None,
              *, eval_name: str = EVAL_NAME) -> dict[str, Any]:
    status = status or {}
    records = [job_record(j, status.get(j.name), eval_name=eval_name, root=o.out) for j in jobs]
    variants = []
    for v in o.selected():
        mine = [r for r in records if r["variant"] == v.name]
        done = [r for r in mine if r["status"] == "done"]
        row: dict[str, Any] = {"variant": v.name, "label": v.label, "paper": v.paper, "n": len(done),
                               "seeds": [r["seed"] for r in done],
                               "arch": (model_key(v.genotype) if v.genotype else None) or "cells"}
        for key in ("binary_top1", "step1_top1"):
            row[f"{key}_mean"], row[f"{key}_std"] = _mean_std([r[key] for r in done if r[key] is not None])
        for key in ("params", "ops", "param_free_normal", "param_free_reduce"):
            vals = [r[key] for r in done if r.get(key) is not None]
            row[key] = statistics.fmean(vals) if vals else None
        ent = [r["entropy_rel"] for r in done if r.get("entropy_rel")]
        row["entropy_normal_rel"] = statistics.fmean(e["entropy_normal_rel"] for e in ent) if ent else None
        row["entropy_reduce_rel"] = statistics.fmean(e["entropy_reduce_rel"] for e in ent) if ent else None
        row["search_warnings"] = sum(len(r.get("search_warnings", [])) for r in done)
        secs = [sum(r["seconds"].values()) for r in done if r["seconds"]]
        row["seconds_mean"] = statistics.fmean(secs) if secs else None
        ses = [r["top1_se"] for r in done if r.get("top1_se") is not None]
        row["top1_se_mean"] = statistics.fmean(ses) if ses else None
        if v.teacher is not None:
            tsecs = [r["teacher_seconds"] for r in done if r.get("teacher_seconds") is not None]
            row["teacher"] = v.teacher
            row["teacher_seconds_mean"] = statistics.fmean(tsecs) if tsecs else None
        searched = [r["genotype"] for r in done if r.get("genotype") and (v.search is not None or v.search_of)]
        if len(searched) > 1:
            row["cell_similarity"] = cell_similarity(searched)
        variants.append(row)
    names = [v.name for v in o.selected()]
    return {
        "study": o.study,
        "preset": o.preset,
        "dataset": o.dataset,
        "data_dir": o.data_dir,
        "seeds": o.seeds,
        "optimizer": o.optimizer,
        "subset": o.subset,
        "holdout": o.holdout_images,
        "test_results": eval_name,
        "complete": all(r["status"] == "done" for r in records),
        "variants": variants,
        "comparisons": compare(o.study, names, records, o.out),
        "comparisons_step1": compare(o.study, names, records, o.out, metric="step1_top1"),
        "diagnosis": diagnosis(o, records),
        "jobs": records,
    }


def _pm(mean: float | None, std: float | None, n: int) -> str:
    if mean is None:
        return "-"
    return f"{mean:.1f} ± {std:.1f}" if std is not None and n > 1 else f"{mean:.1f}"


def _num(x: float | None, fmt: str) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)


def markdown(summary: Mapping[str, Any]) -> str:
    s = summary
    data = s["dataset"] or "(default)"
    if s.get("data_dir"):
        data += f" ({s['data_dir']})"
    lines = [
        f"# bats ablate {s['study']}",
        "",
        f"Preset `{s['preset']}`, data {data}, seeds 0..{s['seeds'] - 1}, search optimiser "
        f"{s['optimizer']}. Top-1 (%) on the test split of fully binary networks (binary weights and "
        "activations, after `bats binarize`), mean ± std over the finished seeds; step 1 = binary "
        "activations, real weights. The paper's column is its CIFAR-10 result at full scale."
        + ("" if s["complete"] else " **Partial: some jobs have not finished.**"),
        "",
        "| variant | paper | n | binary top-1 | ± SE / job | step-1 top-1 | params | ops (M) | param-free normal | "
        "entropy N/R (rel.) | time / job (min) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for v in s["variants"]:
        ent = ("-" if v["entropy_normal_rel"] is None
               else f"{v['entropy_normal_rel']:.2f} / {v['entropy_reduce_rel']:.2f}")
        lines.append(
            f"| {v['label']} | {v['paper'] or '-'} | {v['n']} | "
            f"{_pm(v['binary_top1_mean'], v['binary_top1_std'], v['n'])} | "
            f"{_num(v.get('top1_se_mean'), '.2f')} | "
            f"{_pm(v['step1_top1_mean'], v['step1_top1_std'], v['n'])} | "
            f"{_num(v['params'], ',.0f')} | {_num(None if v['ops'] is None else v['ops'] / 1e6, '.2f')} | "
            f"{_num(v['param_free_normal'], '.2f') if v.get('arch') not in MODELS else 'not a cell network'} | "
            f"{ent} | "
            f"{_num(None if v['seconds_mean'] is None else v['seconds_mean'] / 60, '.1f')} |"
        )
    lines.append("")
    taught = [v for v in s["variants"] if v.get("teacher")]
    if taught:
        owner = taught[0]["teacher"]
        t = next((v["teacher_seconds_mean"] for v in taught if v.get("teacher_seconds_mean") is not None), None)
        lines += [f"Same budget in every row: the same epochs of step 1 and of the fine-tuning. The distillation "
                  f"rows add a real-valued teacher (`bats train --real`, the same cell, data, preset and "
                  f"epochs), trained once per seed by the `{owner}` row and shared by the others: "
                  f"{_num(None if t is None else t / 60, '.1f')} min per seed, counted in the time of the "
                  f"`{owner}` row only; each distilled step also runs the teacher's forward pass.", ""]
    failed = [j for j in s.get("jobs", []) if j.get("status") == "failed"]
    if failed:
        lines += ["Failed jobs (rerun the study to retry them):", ""]
        lines += [f"- {j['variant']}/seed{j['seed']}: {j.get('error') or 'see its logs/'}" for j in failed]
        lines.append("")
    if s.get("comparisons"):
        lines += ["## Paired comparisons (fully binary top-1, seed for seed)", "",
                  "Mean paired difference [seeded 95 % bootstrap interval], exact Wilcoxon signed-rank p, "
                  "paired t; a difference is called distinguishable only when the interval excludes 0 "
                  "and p < 0.05. McNemar: exact test per seed on the per-image predictions "
                  "(images only one of the two networks gets right).", ""]
        for c in s["comparisons"]:
            mc = c.get("mcnemar") or []
            sig = sum(1 for m in mc if m["p"] < 0.05)
            wilcoxon = f"; Wilcoxon p = {c['wilcoxon_p']:.3g}" if c.get("wilcoxon_p") is not None else ""
            t_test = wilcoxon + (f"; t = {c['t']}, t-test p = {c['t_p']}" if c.get("t") is not None else "")
            mcnemar = f"; McNemar p < 0.05 in {sig} of {len(mc)} seeds" if mc else ""
            out = c.get("seeds_left_out")
            left = (f"; {'seed' if len(out['seeds']) == 1 else 'seeds'} {', '.join(map(str, out['seeds']))} "
                    f"left out ({out['why']})" if out else "")
            lines.append(f"- {c['verdict']}{t_test}{mcnemar}{left}")
        lines.append("")
    if s.get("comparisons_step1"):
        lines += ["Step 1 (binary activations, real weights), the same pairs:", ""]
        lines += [f"- {c['verdict']}" for c in s["comparisons_step1"]]
        lines.append("")
    d = s.get("diagnosis")
    if d:
        def tau(x):
            return "-" if not x or x.get("tau") is None else f"τ = {x['tau']:+.3f} (p = {x['p']:.3g}, {x['method']})"
        lines += ["## Does the supernet's preference predict accuracy?", "",
                  f"Kendall τ over {d['cells']} trained cells between a score and the fully binary top-1 "
                  f"(preference: the sum over the cell's chosen edges of log softmax(α), {d['alpha']}):", "",
                  f"- supernet preference: {tau(d.get('preference'))}",
                  f"- parameters: {tau(d.get('params'))}",
                  f"- OPs: {tau(d.get('ops'))}", ""]
    return "\n".join(lines)


def plot(summary: Mapping[str, Any], path: Path) -> Path | None:
    """Accuracy per variant with error bars; None (and nothing written) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = [v for v in summary["variants"] if v["binary_top1_mean"] is not None]
    fig, ax = plt.subplots(figsize=(1.4 * max(3, len(rows)) + 1, 3.2))
    x = range(len(rows))
    ax.bar(x, [v["binary_top1_mean"] for v in rows], yerr=[v["binary_top1_std"] or 0 for v in rows],
           capsize=4, color="#4c72b0", label="fully binary")
    ax.errorbar(x, [v["step1_top1_mean"] if v["step1_top1_mean"] is not None else math.nan for v in rows],
                yerr=[v["step1_top1_std"] or 0 for v in rows], fmt="o", color="#dd8452", capsize=3,
                label="step 1 (binary A, real W)")
    for i, v in enumerate(rows):  # every seed's network
        tops = [j["binary_top1"] for j in summary["jobs"]
                if j["variant"] == v["variant"] and j["binary_top1"] is not None]
        ax.plot([i] * len(tops), tops, "k.", markersize=4)
    ax.set_xticks(list(x), [f"{v['variant']}\n(n={v['n']})" for v in rows], fontsize=8)
    ax.set_ylabel("top-1 (%)")
    ax.set_title(f"bats ablate {summary['study']} (preset {summary['preset']})", fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
    return path


def write_summary(o: StudyOptions, jobs: Sequence[Job], status: Mapping[str, str] | None = None,
                  warn: Callable[[str], None] | None = None, *, eval_name: str = EVAL_NAME,
                  stem: str = "results") -> dict[str, Any]:
    summary = summarise(o, jobs, status, eval_name=eval_name)
    atomic_write_json(o.out / f"{stem}.json", summary)
    atomic_write_text(o.out / f"{stem}.md", markdown(summary))
    if plot(summary, o.out / f"{stem}.png") is None:
        (warn or (lambda m: print(f"warning: {m}", file=sys.stderr)))(
            "matplotlib is not installed: no results.png (pip install 'bats[report]')")
    return summary
