#!/usr/bin/env python3
"""Write the study sections of docs/ablations.md from the published studies' results.json.

Every figure between ``<!-- NAME-study:begin -->`` and ``<!-- NAME-study:end -->`` is read from
``docs/ablations/NAME/`` (its ``results.json`` and the published per-job files), so the prose
cannot drift from the data:

    python tools/study_docs.py            # rewrite the blocks
    python tools/study_docs.py --check    # exit 1 when a block differs from its data

A block whose study is not published is left as it is.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = "docs/ablations.md"


def _load(study: str) -> dict | None:
    path = ROOT / "docs" / "ablations" / study / "results.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def _seeds(seeds: list[int]) -> str:
    """[0, 5] -> '0 and 5'; [0, 1, 2] -> '0–2'."""
    if not seeds:
        return "none"
    if seeds == list(range(seeds[0], seeds[-1] + 1)) and len(seeds) > 2:
        return f"{seeds[0]}–{seeds[-1]}"
    return ", ".join(map(str, seeds[:-1])) + (" and " if len(seeds) > 1 else "") + str(seeds[-1])


def _pm(x: float) -> str:
    """+1.28 / −0.68: signed, with the typographic minus of the verdict lines."""
    return f"{x:+.2f}".replace("-", "−")


def _verdict(c: dict, ahead: str) -> str:
    mc = c.get("mcnemar") or []
    sig = sum(1 for m in mc if m["p"] < 0.05)
    return (f"{c['verdict']} (t = {c['t']:.2f}, Wilcoxon p = {c['wilcoxon_p']:.2f}, {ahead} ahead in "
            f"{c['wins']} of {c['n']} seeds; McNemar p < 0.05 for {sig} of {len(mc)} seed pairs)")


def _table(d: dict, arms: list[str], label=lambda a: a) -> tuple[list[str], dict, list[int]]:
    top = {(j["variant"], j["seed"]): j for j in d["jobs"] if j["status"] == "done"}
    seeds = sorted({s for _, s in top})
    var = {v["variant"]: v for v in d["variants"]}
    rows = ["| seed | " + " | ".join(label(a) for a in arms) + " |", "|---" * (len(arms) + 1) + "|"]
    for s in seeds:
        rows.append(f"| {s} | " + " | ".join(
            f"{top[(a, s)]['binary_top1']:.2f}" if (a, s) in top else "" for a in arms) + " |")
    rows.append("| mean ± sd | " + " | ".join(
        f"{var[a]['binary_top1_mean']:.1f} ± {var[a]['binary_top1_std']:.1f}" for a in arms) + " |")
    rows.append("| n | " + " | ".join(str(var[a]["n"]) for a in arms) + " |")
    return rows, top, seeds


def random_block(d: dict) -> str:
    """The random study (does the search beat chance?)."""
    # The baselines beside the searched arm, the perturbation arm (fewer seeds) last.
    arms = [v["variant"] for v in d["variants"] if v["variant"] != "searched-perturbation"] + ["searched-perturbation"]
    table, top, seeds = _table(d, arms)
    var = {v["variant"]: v for v in d["variants"]}
    cmp = {(c["a"], c["b"]): c for c in d["comparisons"]}
    cmp1 = {(c["a"], c["b"]): c for c in d["comparisons_step1"]}
    health: dict[int, list[dict]] = {}
    for s in seeds:
        j = top.get(("searched", s))
        for st in ((j or {}).get("search_health") or {}).get("stages", []):
            health.setdefault(st["stage"], []).append(st)

    def spread(stage: int, key: str) -> str:
        v = [st[key] for st in health.get(stage, [])]
        return f"{min(v):.2f}–{max(v):.2f}" if v else "n/a"

    ent = [st[k] for sts in health.values() for st in sts for k in ("entropy_normal_rel_t1", "entropy_reduce_rel_t1")]
    dg = d["diagnosis"]
    cs = var["searched"]["cell_similarity"]
    study = ROOT / "docs" / "ablations" / "random"
    draws = [json.loads((study / "random-matched" / f"seed{s}" / "match.json").read_text())["draws"]
             for s in seeds if (study / "random-matched" / f"seed{s}" / "match.json").is_file()]

    def params(a: str) -> list[int]:
        return [top[(a, s)]["params"] for s in seeds if (a, s) in top]

    def k(values: list[int]) -> str:
        return f"{min(values) / 1e3:.0f}–{max(values) / 1e3:.0f} k"

    ops_tau = f"{dg['ops']['tau']:+.2f}"
    pert_seeds = [s for s in seeds if ("searched-perturbation", s) in top]
    pert, rs = var["searched-perturbation"]["n"], var["random-search"]["n"]
    missing = [s for s in seeds if s not in pert_seeds]
    pert_note = f" ({_seeds(pert_seeds)})" if missing else ""
    finished = ("all five arms at seeds " + _seeds(seeds) if not missing and rs == len(seeds) else
                f"searched, random and random-matched at seeds {_seeds(seeds)}, random search at {rs} seeds, "
                f"searched-perturbation at {pert} seeds{pert_note}")
    own = {s: top[("searched-perturbation", s)].get("own_search") for s in pert_seeds}
    shared, rerun = [s for s in pert_seeds if not own[s]], [s for s in pert_seeds if own[s]]
    pvs = cmp[("searched-perturbation", "searched")]
    beats = [b for b in ("random", "random-matched", "random-search") if cmp[("searched", b)]["significant"]]
    verdict = ("at this scale the BATS search is not distinguishable from chance." if not beats else
               f"the BATS search is distinguishable from {', '.join(beats)} at this scale.")
    predicts = ("No detectable association between the supernet's preference and stand-alone accuracy "
                "(nor a positive one for size: both size τ are negative)."
                if dg["preference"]["p"] >= 0.05 else
                "The supernet's preference predicts stand-alone accuracy here (p < 0.05).")
    same = [s for s in rerun if top[("searched-perturbation", s)].get("search_reproduced")]
    differ = [s for s in rerun if s not in same]
    pert_env = f"at seeds {_seeds(shared)} it read the searched arm's own supernet"
    if rerun:
        pert_env += (f"""; at seeds {_seeds(rerun)} the study re-ran the same search command in the perturbation
  job's directory (`own_search`)""")
        pert_env += (f""". The re-runs of seeds {_seeds(same)} reproduced the searched arm's recorded α
  history exactly, at every one of its epochs (`search_reproduced`), so those cells come from the
  same search and are compared with the searched arm too""" if same else "")
        pert_env += (f""". Seeds {_seeds(differ)} did not, and are left out of the comparison with the searched
  arm (`seeds_left_out`)""" if differ else "")
    pert_env += "."
    def commit(a: str, s_: int) -> str:  # the code version a job ran from, as its config.json records it
        cfg = study / a / f"seed{s_}" / "train" / "config.json"
        return json.loads(cfg.read_text(encoding="utf-8"))["run"].get("git_commit", "?")[:7] if cfg.is_file() else "?"

    commit_of = {job: commit(*job) for job in sorted(top, key=lambda j: (arms.index(j[0]), j[1]))}
    commits: dict[str, list[tuple[str, int]]] = {}
    for job, c in commit_of.items():
        commits.setdefault(c, []).append(job)

    def jobs_of(pairs: list[tuple[str, int]]) -> str:
        by: dict[str, list[int]] = {}
        for a, s_ in pairs:
            by.setdefault(a, []).append(s_)
        return "; ".join(f"{a} {_seeds(v)}" for a, v in by.items())

    env = "\n".join(f"  - `{c}`: {jobs_of(v)}" for c, v in commits.items())
    # A matched draw that took 1 draw is the random arm's cell: those seeds' two rows are one cell.
    def cell(r: dict) -> str:  # a genotype without its name
        g = r.get("genotype") or {}
        return json.dumps([g.get(k) for k in ("space", "normal", "normal_concat", "reduce", "reduce_concat")])

    twins = [s_ for s_ in seeds if ("random", s_) in top and ("random-matched", s_) in top
             and cell(top[("random", s_)]) == cell(top[("random-matched", s_)])]
    twin_text = "; ".join(f"seed {s_}: {top[('random', s_)]['binary_top1']:.2f} and "
                          f"{top[('random-matched', s_)]['binary_top1']:.2f}" for s_ in twins)
    distinct = len({cell(r) for r in top.values() if r.get("genotype")})
    n_cmp = len(d["comparisons"]) + len(d["comparisons_step1"])
    same_v = [s_ for s_ in twins if commit_of[("random", s_)] == commit_of[("random-matched", s_)]]
    other_v = [s_ for s_ in twins if s_ not in same_v]
    twin_versions = ""
    if same_v and all(top[("random", s_)]["binary_top1"] == top[("random-matched", s_)]["binary_top1"]
                      for s_ in same_v):
        twin_versions += f" Trained by one version of the code (seed {_seeds(same_v)}), the two score the same."
    if other_v:
        twin_versions += (f" Trained by two versions (seed {_seeds(other_v)}), the gap between the two scores of one"
                          " cell is what a change of code version (or of machine: every run records the host"
                          " `vm`) alone did to one network, as large as most differences above.")
    twin_note = (f"""- At seeds {_seeds(twins)} the first matched draw was already within ±10 %, so random-matched
  trained the random arm's cell with the same seed; the two arms are one cell there, not two independent
  draws ({twin_text}).{twin_versions}
""" if twins else "")
    return f"""<!-- random-study:begin -->
The study ran with

```sh
bats ablate random --preset cpu --dataset imagefolder --data-dir ../shared/datasets/cifar10-large \\
    --subset 10000 --seeds {len(seeds)} --jobs 2 --out runs/verdict
bats ablate random --out runs/verdict --publish docs/ablations/random
```

(later jobs added `--threads 1`, which the presets set anyway; every job's `executed.json` has
its argv as it ran.)

Each network trains on a class-balanced 10,000 of cifar10-large's training images (1,000 of them
held out for validation and selection) and is scored once on its 10,000 `val/` images, none of
which are in cifar10-mini. Every finished job is published in
[docs/ablations/random/](ablations/random/) (genotype, 1-bit packed network, results, per-image
predictions, α history; [results.md](ablations/random/results.md)); every figure below is read
from its `results.json` (`python tools/study_docs.py` writes this section). Finished: {finished}.

Fully binary top-1 (%), each ± about 0.49 (the binomial standard error on 10,000 images):

""" + "\n".join(table) + f"""

**Verdict: {verdict}** Paired over seeds:

- {_verdict(cmp[('searched', 'random')], 'searched')}.
- {_verdict(cmp[('searched', 'random-matched')], 'searched')}.
- {_verdict(cmp[('searched', 'random-search')], 'searched')}.
- {_verdict(cmp[('searched-perturbation', 'random')], 'searched-perturbation')}.
- {_verdict(cmp[('searched-perturbation', 'random-matched')], 'searched-perturbation')}.
- {_verdict(cmp[('searched-perturbation', 'random-search')], 'searched-perturbation')}.
- Against the searched arm, on the seeds where both cells come from one supernet
  ({_seeds(pvs['seeds'])}): {_verdict(pvs, 'searched-perturbation')}.
- At step 1 (binary activations, real weights): {cmp1[('searched', 'random')]['verdict']};
  {cmp1[('searched', 'random-matched')]['verdict']}.

The McNemar test on the 10,000 images says, per seed, whether *these two networks* differ, not
whether the arms do: the networks of one seed often differ significantly, in both directions.
Each interval is a seeded bootstrap of the per-seed differences; with {len(seeds)} seeds the exact Wilcoxon
test can reach p = {2 / 2 ** len(seeds):.2f} at best, so "not distinguishable" here means differences of about a point
or less cannot be told apart, not that they are zero. The summary makes {n_cmp} comparisons
(the lines above and their step-1 counterparts) with no correction for multiplicity: one interval
that only just excludes 0 among them, with p ≥ 0.05, is what chance alone would give.

- Size: the searched cells have {k(params('searched'))} parameters, the one-draw random cells
  {k(params('random'))}; the matched random cells ({k(params('random-matched'))}) needed
  {min(draws)}–{max(draws)} draws to come within ±10 % of their seed's searched cell.
- The jobs ran with the same commands and presets from {len(commits)} versions of the code (the commit
  in each job's `train/config.json`):
{env}
{twin_note}- The perturbation arm derives from a search checkpoint, and the searched arm's
  checkpoints are not published: {pert_env}

Search health, untempered (each search's `search_health` in `results.json`, {len(health.get(1, []))} searches): the
α spread per edge of the normal cell ends stage 1 at {spread(1, 'alpha_spread_normal')} and stage 3 at
{spread(3, 'alpha_spread_normal')}, while the T = 1 relative entropy stays at {min(ent):.3f}–{max(ent):.3f} of
uniform in every stage and cell — α moves, but softmax(α) stays nearly flat. The {len(seeds)} searched
cells share {cs['both'] * 100:.1f} % of their (op, input) choices pairwise ({cs['pairs']} pairs of 16 choices),
against {cs['chance']['both'] * 100:.1f} % expected between two random cells: the derived cell depends on the
seed, not on a preference the searches agree on.

Diagnosis: Kendall τ between a score of each trained network's cell and its fully binary top-1,
over the {dg['cells']} networks ({distinct} distinct cells; the networks of one seed share that seed's
supernet and training seed, so the p-values, which assume independent pairs, are optimistic). The
supernet's preference for the cell (the sum over its edges of log softmax(α) of its choices, stage
1's final α of the same seed's search): τ = {dg['preference']['tau']:+.2f} (p = {dg['preference']['p']:.2f}); the
naive baselines, parameters τ = {dg['params']['tau']:+.2f} (p = {dg['params']['p']:.2f}) and OPs τ = {ops_tau}
(p = {dg['ops']['p']:.2f}). {predicts} Our reading of the CPU proxy: the search sees 2 groups of 3 channels at
16 px while the evaluated network has 4 groups, and 8 search epochs per stage (about 250 α updates, against
the paper's ~3,900; [search.md](search.md)) leave softmax(α) nearly flat,
so the choice between ops is close to the seed's noise. `bats ablate proxy` (searching at the
evaluated network's width) tests one change of the proxy; {_proxy_status()}
<!-- random-study:end -->"""


def _proxy_status() -> str:
    """Where the proxy study stands, from its published results (if any)."""
    d = _load("proxy")
    if d is None:
        return "it has not been run."
    top = {(j["variant"], j["seed"]) for j in d["jobs"] if j["status"] == "done"}
    done = sorted(s for v, s in top if v == "searched-c12")
    c = next((c for c in d["comparisons"] if (c["a"], c["b"]) == ("searched-c12", "random")), None)
    where = "[docs/ablations/proxy/](ablations/proxy/results.md)"
    if not d.get("complete"):
        return (f"{len(done)} of its {d['seeds']} seeds have finished so far ({where}, partial"
                + (f": {c['verdict']}" if c else "") + "), too few for a verdict.")
    by = {(x["a"], x["b"]): x for x in d["comparisons"]}
    dg = d.get("diagnosis") or {}

    def tau(key: str) -> str:
        t = dg.get(key) or {}
        return "n/a" if t.get("tau") is None else f"τ = {t['tau']:+.2f} (p = {t['p']:.2f})"

    pairs = [x for x in (c, by.get(("searched-c12", "searched"))) if x]
    found = any(x["significant"] for x in pairs)
    return (f"its result over {len(done)} seeds ({where}): " + "; ".join(x["verdict"] for x in pairs) + ". "
            + ("Searching at the evaluated network's width is distinguishable here. " if found else
               "Searching at the evaluated network's width does not make the search distinguishable "
               "from chance at this scale either; with "
               f"{len(done)} seeds the exact Wilcoxon test cannot go below p = {2 / 2 ** len(done):.3f}, so under "
               "the rule above this study could show no gain, only how large one might be. Its searched and "
               f"random rows are the random study's jobs of seeds {_seeds(done)} (`--reuse`), not new "
               "evidence. ")
            + f"Over that study's {dg.get('cells', 0)} trained cells, the C = 12 supernet's preference "
            f"gives {tau('preference')}, parameters {tau('params')}, OPs {tau('ops')}. "
            + _proxy_health(d))


def _proxy_health(d: dict) -> str:
    """The C = 12 searches' untempered health: is softmax(α) still flat at the evaluated width?"""
    stages = [st for j in d["jobs"] if j["variant"] == "searched-c12" and j.get("search_health")
              for st in j["search_health"]["stages"]]
    if not stages:
        return ""
    ent = [st[k] for st in stages for k in ("entropy_normal_rel_t1", "entropy_reduce_rel_t1")]
    cs = next((v.get("cell_similarity") for v in d["variants"] if v["variant"] == "searched-c12"), None)
    same = (f"; its {d['seeds']} cells share {cs['both'] * 100:.1f} % of their (op, input) choices pairwise "
            f"(chance {cs['chance']['both'] * 100:.1f} %)") if cs else ""
    return (f"At C = 12 softmax(α) stays as flat (T = 1 relative entropy {min(ent):.3f}–{max(ent):.3f} of "
            f"uniform in every stage){same}: widening the search to C = 12 alone did not make α commit "
            f"({len(stages) // 3} seeds); the search budget (α updates per stage) is the next suspect, "
            "untested here.")


def recipe_block(d: dict) -> str:
    """The recipe study (the paper's two steps against distillation from a real-valued teacher)."""
    arms = [v["variant"] for v in d["variants"]]  # the study's rows, the paper's first
    table, top, seeds = _table(d, arms)
    var = {v["variant"]: v for v in d["variants"]}
    cmp = {(c["a"], c["b"]): c for c in d["comparisons"]}
    cmp1 = {(c["a"], c["b"]): c for c in d["comparisons_step1"]}
    teacher = [top[("kd", s)]["teacher_val_top1"] for s in seeds if top.get(("kd", s), {}).get("teacher_val_top1")]
    table.insert(2 + len(seeds), "| step 1, mean | " + " | ".join(
        f"{var[a]['step1_top1_mean']:.1f}" for a in arms) + " |")
    bench_file = ROOT / "docs" / "ablations" / "recipe" / "distill_step.json"
    bench = json.loads(bench_file.read_text(encoding="utf-8"))
    kd, att, teach = bench["kd_ratio"], bench["kd_attention_ratio"], bench["teacher_ratio"]
    # Per seed, in paper steps: step 1 (4 epochs) and step 2 (2 epochs) of the same steps per epoch;
    # a distilled row runs both at kd's cost, and the seed's teacher trains for step 1's 4 epochs.
    total = (6 * kd + 4 * teach) / 6
    helped = [a for a in arms[1:] if cmp[(a, "paper")]["significant"]]
    if helped:
        answer = ("**Verdict: " + ", ".join(helped) + " beat" + ("s" if len(helped) == 1 else "")
                  + " the paper's recipe at this scale**: " + "; ".join(
                      f"{a} − paper = {_pm(cmp[(a, 'paper')]['paired_diff_mean'])} points "
                      f"[{_pm(cmp[(a, 'paper')]['ci95'][0])}, {_pm(cmp[(a, 'paper')]['ci95'][1])}], ahead in "
                      f"{cmp[(a, 'paper')]['wins']} of {cmp[(a, 'paper')]['n']} seeds, Wilcoxon p = "
                      f"{cmp[(a, 'paper')]['wilcoxon_p']:.3f}" for a in helped)
                  + f" (the smallest p {len(seeds)} seeds can give is {2 / 2 ** len(seeds):.3f}; one cell, one"
                  " budget, 2,000 test images).")
    adds = [(a, cmp[(a, "kd")]) for a in ("kd+attention", "kd+rprelu")]
    if all(not c["significant"] for _, c in adds):
        answer += (" Neither addition helps on top of kd: " + ", ".join(
            f"{a} − kd = {_pm(c['paired_diff_mean'])}" for a, c in adds) + " points, not distinguishable.")
    else:
        answer = ("**Verdict: at this scale no distillation recipe is distinguishable from the paper's two "
                  "steps** (the lines below give the differences and their intervals).")
    steady = [cmp[(a, "paper")] for a in arms[1:]
              if not cmp[(a, "paper")]["significant"] and cmp[(a, "paper")]["wins"] == cmp[(a, "paper")]["n"] >= 3]
    for c in steady:
        answer += (f" {c['a']} was ahead of the paper's recipe in every seed ({_pm(c['paired_diff_mean'])} points, "
                   f"paired t p = {c['t_p']:.3f}), a consistent gain that {c['n']} seeds cannot make significant "
                   "under the rule below.")
    lines = [f"- {_verdict(cmp[(a, 'paper')], a)}." for a in arms[1:]]
    lines += [f"- {_verdict(cmp[(a, 'kd')], a)}." for a in ("kd+attention", "kd+rprelu")]
    step1 = "; ".join(cmp1[(a, "paper")]["verdict"] for a in arms[1:])
    return f"""<!-- recipe-study:begin -->
The study ran with

```sh
bats ablate recipe --preset cpu --dataset imagefolder --data-dir ../shared/datasets/cifar10-mini \\
    --seeds {len(seeds)} --jobs 2 --threads 1 --out runs/ablate-recipe
bats ablate recipe --out runs/ablate-recipe --publish docs/ablations/recipe
```

One cell (the paper's `bats_c10`), the cpu preset's budgets in every row: 4 epochs of step 1 and
2 of fine-tuning on cifar10-mini's 10,000 training images (1,000 held out for validation), scored
once on its 2,000 `val/` images. Every job is published in [docs/ablations/recipe/](ablations/recipe/)
([results.md](ablations/recipe/results.md)); every figure below is read from its `results.json`
(`python tools/study_docs.py` writes this section).

Fully binary top-1 (%), each ± about {var['paper']['top1_se_mean']:.1f} (the binomial standard error on 2,000
images); the real-valued teacher (`bats train --real`, same cell, data and epochs) reaches
{min(teacher):.1f}–{max(teacher):.1f} % on the held-out images:

""" + "\n".join(table) + f"""

{answer} Paired over seeds:

""" + "\n".join(lines) + f"""
- At step 1 (binary activations, real weights): {step1}.

A row is called distinguishable only when its bootstrap interval excludes 0 and the exact Wilcoxon
p is below 0.05; with {len(seeds)} seeds that p cannot go below {2 / 2 ** len(seeds):.3f}, so the intervals, the
paired t and the wins say how consistent a difference is. McNemar tests each seed's two networks on
the same 2,000 images.

Cost, from `python bench/distill_step.py --threads 1 --reps 15 --warmup 2` (the recipe study's
network and batch, one thread, the variants interleaved in one run on otherwise idle cores;
[distill_step.json](ablations/recipe/distill_step.json)): a distilled training step costs {kd:.2f}× a
step of the paper's recipe ({att:.2f}× with attention matching: the teacher's forward pass, without
gradients), and a training step of the real-valued teacher {teach:.2f}× (no sign / straight-through
estimator in it). With the same epochs (4 in step 1, 2 in step 2) and a teacher trained for step
1's 4 epochs per seed, distilling one network costs about {total:.2f}× the paper's recipe, or
{kd:.2f}× when the teacher is shared by several students (as in this study, by three rows). The
jobs' own wall times are in `results.json` but ran two at a time beside other work, so they are not
a fair ratio.

The papers' gains are on ImageNet at full scale and on ResNet-18-type networks, not on BATS
cells: Real-to-Binary 65.4 % top-1 against about 60 % without its distillation chain, ReActNet
69.4 % (ReActNet-A). Here, at 4 epochs on 10,000 images, each network's top-1 on 2,000 test images
carries about 1.1 points of sampling noise, so no single seed can show a one-point gain (McNemar
finds none); only the consistency of the paired differences over seeds can.
<!-- recipe-study:end -->"""


BLOCKS = {"random": random_block, "recipe": recipe_block}


def render(text: str) -> str:
    """``text`` with every block whose study is published rewritten from its data."""
    for study, make in BLOCKS.items():
        begin, end = f"<!-- {study}-study:begin -->", f"<!-- {study}-study:end -->"
        data = _load(study)
        if data is None or begin not in text:
            continue
        a, b = text.index(begin), text.index(end) + len(end)
        text = text[:a] + make(data) + text[b:]
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 when a block is not what its data says")
    args = parser.parse_args(argv)
    path = ROOT / DOC
    text = path.read_text(encoding="utf-8")
    new = render(text)
    if new == text:
        return 0
    if args.check:
        print(f"{DOC}: a study section differs from its results.json; run `python tools/study_docs.py`",
              file=sys.stderr)
        return 1
    path.write_text(new, encoding="utf-8")
    print(f"rewrote the study sections of {DOC}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
