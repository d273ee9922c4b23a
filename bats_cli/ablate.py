"""`bats ablate STUDY`: the paper's ablations (Tables 2-5) and a random-cell baseline, as jobs.

A study is a list of variants; every variant × seed is one *job*: search (where the variant
needs one) -> derive -> train -> binarize -> eval, each step an ordinary ``bats`` command with
its own run directory under ``OUT/<variant>/seed<N>/``. This module only builds and runs those
commands and summarises their result files; it never trains anything itself.

* A step is finished when its result file exists (search/train/binarize ``result.json``,
  ``genotype.json``, ``eval.json``); a job is finished when its ``eval.json`` exists. Rerunning a
  study skips finished jobs and steps, and long steps run with ``--resume-or-start``, so an interrupted
  study continues where it stopped.
* ``--emit`` prints each unfinished job as one shell line (its steps joined by ``&&``) for SLURM
  arrays or GNU parallel; rerunning the study afterwards only writes the summary.
* Outputs: ``OUT/results.json``, ``OUT/results.md`` (mean ± std beside the paper's numbers) and
  ``OUT/results.png`` (needs matplotlib, the ``report`` extra).
"""

from __future__ import annotations

import json
import math
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from bats_cli.archs import RESNET18, model_key
from bats_cli.errors import Interrupted, RunFailure, UserInputError
from bats_cli.fileio import atomic_write_json, atomic_write_text

STUDIES = ("space", "temperature", "strategy", "random", "zoo", "proxy", "recipe")
# tiny: a smoke test of a study's commands (about a minute per job), not a result.
PRESETS = ("cpu", "paper", "tiny")
EVAL_NAME = "eval.json"
JOB_NAME = "job.json"  # the job's commands, which --reuse matches
REUSED_NAME = "REUSED.txt"
STEPS_NAME = "steps.json"
EXECUTED_NAME = "executed.json"
MATCH_NAME = "match.json"  # a matched random cell's draw report (derive --random --match --json)  # the argv of every step as it was run (recorded, never regenerated)
RESULTS_JSON = "results.json"
RESULTS_MD = "results.md"
RESULTS_PNG = "results.png"
# §6.1: the reduction cell's temperature is 0.15 / 0.2 = 0.75 of the normal cell's.
REDUCE_RATIO = 0.75
# Budgets fixed per preset before any result is seen (docs/ablations.md):
# training images held out of every training run as its validation set (`train --holdout`), so
# that selection (best checkpoint, random search) never reads the test split, which `eval` reads once;
HOLDOUT = {"cpu": 1000, "paper": 5000, "tiny": 250}
# the random-search baseline's candidates (DARTS' random search trains several cells; 8 at paper
# scale, 4 at cpu scale) and their short training budget (cpu: 1 of the 4 epochs; paper: 60 of 600);
CANDIDATES = {"cpu": 4, "paper": 8, "tiny": 2}
CANDIDATE_EPOCHS = {"cpu": 1, "paper": 60, "tiny": 1}
# searched-perturbation's held-out images per preset; absent: derive's default (512). The tiny
# preset's supernet is a smoke test, so a few images show that the step runs.
PERTURB_IMAGES = {"tiny": 64}
# a matched random cell's size tolerance (±10 % of the searched cell's parameters);
MATCH_TOLERANCE = 0.1
# derive seeds of random-search candidates: disjoint from the `random` arm's seeds 0..N-1.
CANDIDATE_SEED_BASE = 1000
# The row every other row of a study is compared with, seed for seed (the paper's setting).
REFERENCE = {"space": "bats", "temperature": "T0.2", "strategy": "Wreal-Abinary", "random": "searched",
             "zoo": "bats_c10", "proxy": "searched-c12", "recipe": "paper"}
# The recipe study's attention-matching weight (Real-to-Binary's loss at this project's scale; not tuned).
RECIPE_ATTENTION_WEIGHT = 1.0


@dataclass(frozen=True)
class Variant:
    """One row of a study's table."""

    name: str
    label: str
    # Flags of `bats search` (None: no search; the genotype comes from ``genotype`` or --random).
    search: tuple[str, ...] | None = None
    genotype: str | None = None  # a bundled genotype name (zoo)
    random: bool = False  # `bats derive --random --seed SEED` (the random baseline)
    paper: str | None = None  # the paper's CIFAR-10 top-1 for this row, as printed there
    # Derive from the search of another variant of the same seed (no search of its own), with
    # this architecture-selection rule (`bats derive --select`).
    search_of: str | None = None
    select: str = "alpha"
    # A random cell whose size matches that seed's cell of this variant (`derive --random --match`).
    match_of: str | None = None
    # The random-search baseline: this many random cells, trained briefly, the best on held-out
    # training images kept (DARTS; Li & Talwalkar 2019).
    candidates: int = 0
    # Distillation (the recipe study): the variant of the same seed whose job trains the real-valued
    # teacher (`bats train GENOTYPE --real`; this variant's own name: it trains it), given as
    # `--teacher` to both steps; and extra flags of step 1 (`train`) and step 2 (`binarize`).
    teacher: str | None = None
    train_flags: tuple[str, ...] = ()
    binarize_flags: tuple[str, ...] = ()


@dataclass(frozen=True)
class Step:
    name: str
    argv: tuple[str, ...]  # the command after `bats`
    done: Path  # exists once the step has finished
    stdout: Path | None = None  # keep the command's stdout (its --json report) in this file

    def shell(self) -> str:
        return shlex.join(("bats", *self.argv))


@dataclass
class Job:
    variant: Variant
    seed: int
    dir: Path
    steps: list[Step] = field(default_factory=list)
    # Files of other jobs this one reads (another variant's search or genotype): it starts once
    # they exist.
    requires: list[Path] = field(default_factory=list)

    @property
    def ready(self) -> bool:
        return all(p.exists() for p in self.requires)

    @property
    def name(self) -> str:
        return f"{self.variant.name}/seed{self.seed}"

    @property
    def result(self) -> Path:
        return self.dir / EVAL_NAME

    @property
    def packed(self) -> Path:
        return self.dir / "binarize" / "model.packed.safetensors"

    @property
    def finished(self) -> bool:
        return self.result.is_file()

    def shell(self) -> str:
        """The job as one shell line; a job that reads another row's files first waits for them
        (the rows run as separate processes under GNU parallel or a SLURM array)."""
        wait = [f"until [ -e {shlex.quote(str(p))} ]; do sleep 60; done" for p in self.requires]
        return " && ".join([*wait, *(step.shell() for step in self.steps)])

    def key(self) -> list[list[str]]:
        """The job's commands without what does not change its result (its directory, threads, --quiet):
        two jobs with the same key and seed compute the same thing."""
        return [_normalised(step.argv, self.dir) for step in self.steps]


def _normalised(argv: Sequence[str], job_dir: Path) -> list[str]:
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg == "--threads":
            skip = True
            continue
        if arg == "--quiet":
            continue
        out.append(arg.replace(str(job_dir), "{job}"))
    return out


def _search(optimizer: str, *, space: str = "bats", temp_normal: float = 0.2, temp_reduce: float = 0.15,
            weights: str = "real", activations: str = "binary") -> tuple[str, ...]:
    """The flags of a variant's `bats search`: every studied setting is spelled out, so one setting
    is written the same way in every study (and a job of one study can be reused by another)."""
    return ("--space", space, "--temp-normal", f"{temp_normal:g}", "--temp-reduce", f"{temp_reduce:g}",
            "--weights", weights, "--activations", activations, "--optimizer", optimizer)


def study_variants(study: str, *, optimizer: str = "adam") -> list[Variant]:
    """The variants of ``study`` with the paper's numbers (CIFAR-10 top-1, fully binary)."""
    # Table 4 changes the search domain only: the weights' optimiser is named on every search.
    if study == "space":  # Table 2
        return [
            Variant("bats", "BATS space, T = 0.2 / 0.15", _search(optimizer), paper="93.7 ± 0.6"),
            Variant("darts", "DARTS space, T = 0.2 / 0.15", _search(optimizer, space="darts"), paper="51.0 ± 7.5"),
            Variant("bats-T1", "BATS space, T = 1 / 1 (DARTS)",
                    _search(optimizer, temp_normal=1.0, temp_reduce=1.0), paper="86.0 ± 2.0"),
        ]
    if study == "temperature":  # Table 3
        paper = {1.0: "86.0*", 0.5: "92.1", 0.2: "93.7", 0.05: "93.3"}
        # T = 1 is DARTS' softmax in both cells (Table 3: "T=1 was used in DARTS"; its 86.0 is Table 2's
        # T = 1 row); below 1 the reduction cell's temperature is 0.75 of the normal cell's (§6.1).
        temps = [(1.0, 1.0)] + [(t, t * REDUCE_RATIO) for t in (0.5, 0.2, 0.05)]
        return [
            Variant(f"T{tn:g}", f"T = {tn:g} (normal) / {tr:g} (reduce)",
                    _search(optimizer, temp_normal=tn, temp_reduce=tr), paper=paper[tn])
            for tn, tr in temps
        ]
    if study == "strategy":  # Table 4
        rows = [("real", "real", "88.4 ± 0.8"), ("binary", "binary", "84.6 ± 1.7"),
                ("binary", "real", "91.1 ± 1.7"), ("real", "binary", "93.7 ± 0.6")]
        return [
            Variant(f"W{w}-A{a}", f"search W {w} / A {a}", _search(optimizer, weights=w, activations=a), paper=p)
            for w, a, p in rows
        ]
    if study == "random":  # does the search beat chance? (Table 5's random-search row)
        return [
            Variant("searched", "BATS search (this preset), DARTS selection by α", _search(optimizer), paper="93.7"),
            # Wang et al. (ICLR 2021): the same search checkpoints, ops chosen by the supernet's
            # accuracy drop when each is removed.
            Variant("searched-perturbation", "BATS search, perturbation-based selection",
                    search_of="searched", select="perturbation"),
            Variant("random", "one random cell of the BATS space", random=True),
            Variant("random-matched", "one random cell, parameters within ±10 % of the searched cell's",
                    random=True, match_of="searched"),
            Variant("random-search", "random search: best of N random cells on held-out training images",
                    random=True, candidates=-1, paper="92.9"),
        ]
    if study == "proxy":  # is the CPU search a faithful proxy? one change of it, against the same baselines
        # The cpu preset's supernet has 6 channels (2 groups of 3) where the network it is judged
        # in has 12 (4 groups): the supernet's grouped convs see different fan-ins. This study
        # searches at the evaluation network's width; its searched and random rows are the random
        # study's jobs (`--reuse` that study: the same commands and seeds).
        return [
            Variant("searched-c12", "BATS search at C = 12 (4 groups, as the evaluation network)",
                    _search(optimizer) + ("--channels", "12")),
            Variant("searched", "BATS search (the cpu preset: C = 6, 2 groups)", _search(optimizer)),
            Variant("random", "one random cell of the BATS space", random=True),
        ]
    if study == "recipe":  # the training recipe on one cell: the paper's two steps against distillation
        g = "bats_c10"
        att = ("--attention-weight", f"{RECIPE_ATTENTION_WEIGHT:g}")
        return [
            Variant("paper", "two steps, cross-entropy (the paper)", genotype=g, paper="93.7"),
            Variant("kd", "KL to the real-valued teacher in both steps (ReActNet's loss)", genotype=g, teacher="kd"),
            Variant("kd+attention", "KL + attention matching of cell outputs (Real-to-Binary)", genotype=g,
                    teacher="kd", train_flags=att, binarize_flags=att),
            Variant("kd+rprelu", "KL + RPReLU activations (ReActNet)", genotype=g, teacher="kd",
                    train_flags=("--activation", "rprelu")),
        ]
    if study == "zoo":  # Table 5: published cells and the hand-designed ResNet-18, binarized as in §3
        zoo = [("bats_c10", "BATS (paper's cell)", "93.7"), ("darts_v1", "DARTS (first order)", "89.4"),
               ("darts_v2", "DARTS (second order)", "91.1"), ("pdarts", "P-DARTS", "89.5"),
               ("nasnet_a", "NASNet-A", "90.3"), ("amoebanet_a", "AmoebaNet-A", "91.5"),
               # A reserved model name where a genotype goes: `bats train resnet18`.
               (RESNET18, "binary ResNet-18 (XNOR-Net++)", "91.0")]
        return [Variant(g, label, genotype=g, paper=p) for g, label, p in zoo]
    raise UserInputError(f"unknown study {study!r}; choose one of: {', '.join(STUDIES)}")


@dataclass(frozen=True)
class StudyOptions:
    study: str
    out: Path
    preset: str = "cpu"
    dataset: str | None = None
    data_dir: str | None = None
    seeds: int = 1
    jobs: int = 1
    threads: int | None = None
    optimizer: str = "adam"
    variants: tuple[str, ...] = ()  # a subset of the study's rows (default: all)
    subset: int | None = None  # training images of every `bats train` (e.g. 10,000 of cifar10-large)
    holdout: int | None = None  # None: the preset's HOLDOUT
    candidates: int | None = None  # None: the preset's CANDIDATES

    @property
    def holdout_images(self) -> int:
        return self.holdout if self.holdout is not None else HOLDOUT[self.preset]

    @property
    def candidate_count(self) -> int:
        return self.candidates if self.candidates is not None else CANDIDATES[self.preset]

    def __post_init__(self) -> None:
        if self.study not in STUDIES:
            raise UserInputError(f"unknown study {self.study!r}; choose one of: {', '.join(STUDIES)}")
        if self.preset not in PRESETS:
            raise UserInputError(f"unknown --preset {self.preset!r}; choose one of: {', '.join(PRESETS)}")
        if self.seeds < 1 or self.jobs < 1:
            raise UserInputError("--seeds and --jobs must be at least 1")
        for flag, value in (("--subset", self.subset), ("--holdout", self.holdout), ("--candidates", self.candidates)):
            if value is not None and value < 1:
                raise UserInputError(f"{flag} must be at least 1, got {value}")
        if self.subset is not None and self.holdout_images >= self.subset:
            raise UserInputError(f"--holdout {self.holdout_images} leaves no training images of --subset "
                                 f"{self.subset}; lower --holdout or raise --subset")
        if self.optimizer not in ("adam", "sgd"):
            raise UserInputError(f"--optimizer must be adam or sgd, got {self.optimizer!r}")
        names = [v.name for v in study_variants(self.study)]
        unknown = [v for v in self.variants if v not in names]
        if unknown:
            raise UserInputError(f"unknown --variants {', '.join(unknown)} for study {self.study}; "
                                 f"choose from: {', '.join(names)}")

    def selected(self) -> list[Variant]:
        """The study's variants, or the ones --variants names (in the study's order)."""
        rows = study_variants(self.study, optimizer=self.optimizer)
        return [v for v in rows if not self.variants or v.name in self.variants]


def _data_flags(o: StudyOptions) -> tuple[str, ...]:
    flags: tuple[str, ...] = ()
    if o.dataset:
        flags += ("--dataset", o.dataset)
    if o.data_dir:
        flags += ("--data-dir", o.data_dir)
    return flags


def _threads(o: StudyOptions) -> tuple[str, ...]:
    return ("--threads", str(o.threads)) if o.threads else ()


# The options a study directory was made with: --summary, --evaluate-on and --publish read them
# back, so a study (or a published copy) is re-checked without repeating its flags.
STUDY_NAME = "study.json"
_RECORDED = ("study", "preset", "dataset", "data_dir", "seeds", "optimizer", "variants", "subset", "holdout",
             "candidates")


def study_record(o: StudyOptions) -> dict[str, Any]:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in ((k, getattr(o, k)) for k in _RECORDED)}


def recorded_options(out: Path, study: str, *, seeds: int | None = None,
                     variants: Sequence[str] = ()) -> StudyOptions | None:
    """The options recorded in ``out/study.json`` (None if there is none); ``seeds`` / ``variants``
    given on the command line narrow or extend them."""
    rec = _read(out / STUDY_NAME)
    if rec is None:
        return None
    if rec.get("study") != study:
        raise UserInputError(f"{out} holds a {rec.get('study')!r} study, not {study!r}")
    try:
        kw = {k: rec.get(k) for k in _RECORDED}
        kw["variants"] = tuple(variants) or tuple(kw.get("variants") or ())
        kw["seeds"] = seeds or int(kw.get("seeds") or 1)
        return StudyOptions(out=out, **{k: v for k, v in kw.items() if v is not None})
    except (TypeError, ValueError) as exc:
        raise UserInputError(f"{out / STUDY_NAME}: not a valid study record ({exc})") from None


def _train_flags(o: StudyOptions) -> tuple[str, ...]:
    """Data flags of every `bats train` of the study: the data, its training subset, the hold-out."""
    subset = ("--subset", str(o.subset)) if o.subset else ()
    return (*_data_flags(o), *subset, "--holdout", str(o.holdout_images))


def build_jobs(o: StudyOptions) -> list[Job]:
    """Every variant × seed of the study with its steps (nothing is run)."""
    jobs = []
    # Seed-major: a study stopped early has every variant at its first seeds.
    for seed in range(o.seeds):
        for variant in o.selected():
            d = o.out / variant.name / f"seed{seed}"
            job = Job(variant, seed, d)
            genotype_file = d / "genotype.json"
            common = ("--preset", o.preset, "--seed", str(seed), *_threads(o), "--resume-or-start", "--quiet")
            derive_out = ("--output", str(genotype_file), "--force")
            if variant.search is not None:
                job.steps.append(Step("search", ("search", *_data_flags(o), *variant.search, *common,
                                                 "--out", str(d / "search")), d / "search" / "result.json"))
                job.steps.append(Step("derive", ("derive", str(d / "search"), *derive_out), genotype_file))
                genotype = str(genotype_file)
            elif variant.search_of is not None:
                search_dir = o.out / variant.search_of / f"seed{seed}" / "search"
                job.requires.append(search_dir / "result.json")
                images = PERTURB_IMAGES.get(o.preset)
                perturb = ("--perturb-images", str(images)) if images and variant.select == "perturbation" else ()
                job.steps.append(Step("derive", ("derive", str(search_dir), "--select", variant.select,
                                                 *perturb, *_data_flags(o), "--seed", str(seed), *_threads(o),
                                                 *derive_out), genotype_file))
                genotype = str(genotype_file)
            elif variant.match_of is not None:
                target = o.out / variant.match_of / f"seed{seed}" / "genotype.json"
                job.requires.append(target)
                # Sizes are counted in the network this study trains (the same preset).
                job.steps.append(Step("derive", ("derive", "--random", "--seed", str(seed), "--space", "bats",
                                                 "--match", str(target), "--match-by", "params",
                                                 "--tolerance", f"{MATCH_TOLERANCE:g}", "--preset", o.preset,
                                                 "--name", f"random_matched_seed{seed}", *derive_out, "--json"),
                                      genotype_file, stdout=d / MATCH_NAME))
                genotype = str(genotype_file)
            elif variant.candidates:
                runs = []
                for k in range(o.candidate_count):
                    cdir = d / "candidates" / f"c{k}"
                    cseed = CANDIDATE_SEED_BASE + 100 * seed + k
                    job.steps.append(Step(f"candidate{k}-derive", (
                        "derive", "--random", "--seed", str(cseed), "--space", "bats", "--name",
                        f"random_search_seed{seed}_c{k}", "--output", str(cdir / "genotype.json"), "--force"),
                        cdir / "genotype.json"))
                    job.steps.append(Step(f"candidate{k}-train", (
                        "train", str(cdir / "genotype.json"), *_train_flags(o), *common,
                        "--epochs", str(CANDIDATE_EPOCHS[o.preset]), "--out", str(cdir / "train")),
                        cdir / "train" / "result.json"))
                    runs.append(str(cdir / "train"))
                # The best by held-out training images (train --holdout); the test split is not read.
                job.steps.append(Step("select", ("genotype", "best", *runs, *derive_out), genotype_file))
                genotype = str(genotype_file)
            elif variant.random:
                job.steps.append(Step("derive", ("derive", "--random", "--seed", str(seed), "--space", "bats",
                                                 "--name", f"random_seed{seed}", *derive_out), genotype_file))
                genotype = str(genotype_file)
            else:
                genotype = str(variant.genotype)
            distill: tuple[str, ...] = ()
            if variant.teacher is not None:
                teacher_dir = o.out / variant.teacher / f"seed{seed}" / "teacher"
                if variant.teacher == variant.name:
                    # Same data, preset, seed and epochs as the student: only --real differs.
                    job.steps.append(Step("teacher", ("train", genotype, *_train_flags(o), *common, "--real",
                                                      "--out", str(teacher_dir)), teacher_dir / "result.json"))
                else:
                    job.requires.append(teacher_dir / "result.json")
                distill = ("--teacher", str(teacher_dir / "last.safetensors"))
            job.steps.append(Step("train", ("train", genotype, *_train_flags(o), *common, *distill,
                                            *variant.train_flags, "--out", str(d / "train")),
                                  d / "train" / "result.json"))
            job.steps.append(Step("binarize", ("binarize", str(d / "train" / "last.safetensors"), "--preset",
                                               o.preset, *_threads(o), *distill, *variant.binarize_flags,
                                               "--resume-or-start", "--quiet", "--out",
                                               str(d / "binarize")), d / "binarize" / "result.json"))
            job.steps.append(Step("eval", ("eval", str(job.packed), *_data_flags(o), *_threads(o),
                                           "--output", str(job.result)), job.result))
            jobs.append(job)
    return jobs


def best_of_runs(run_dirs: Sequence[Path]) -> dict[str, Any]:
    """The random-search selection: of finished `bats train --holdout` runs of cell networks, the one
    with the highest top-1 on its held-out training images (first on ties). Runs validated on the
    test split are refused: selecting on it would leak the reported split into the choice.

    Returns ``{"genotype": Genotype, "chosen": dir, "candidates": [{"run", "genotype", "holdout_top1"}]}``."""
    from bats_cli.genotype import Genotype

    if not run_dirs:
        raise UserInputError("give at least one training run directory")
    rows = []
    for d in map(Path, run_dirs):
        res, cfg = _read(d / "result.json"), _read(d / "config.json")
        if res is None or cfg is None:
            raise UserInputError(f"{d}: not a finished `bats train` run directory (no result.json / config.json)")
        if res.get("command") != "train" or not isinstance(cfg.get("genotype"), dict):
            raise UserInputError(f"{d}: not a `bats train` run of a cell network")
        if res.get("val_split") != "holdout":
            raise UserInputError(f"{d} was validated on the test split; selection needs runs trained with "
                                 "`bats train --holdout N` (held-out training images)")
        top1 = res.get("final_val_top1")
        if not isinstance(top1, (int, float)) or not math.isfinite(top1):
            raise UserInputError(f"{d}/result.json: no final validation top-1")
        g = Genotype.model_validate(cfg["genotype"])
        rows.append({"run": str(d), "genotype": g.name, "holdout_top1": float(top1), "_g": g})
    best = max(range(len(rows)), key=lambda i: (rows[i]["holdout_top1"], -i))
    chosen = rows[best]
    return {"genotype": chosen["_g"], "chosen": chosen["run"],
            "candidates": [{k: v for k, v in r.items() if k != "_g"} for r in rows]}


EMIT_FORMATS = ("shell", "slurm")
# SLURM sends SIGTERM this many seconds before a task's time limit: every long step saves a
# resumable checkpoint on SIGTERM and exits 130, and the task requeues itself to continue.
SLURM_TERM_MARGIN_S = 300


def emit_lines(jobs: Sequence[Job]) -> list[str]:
    """One shell line per unfinished job."""
    return [job.shell() for job in jobs if not job.finished]


def slurm_script(o: StudyOptions, jobs: Sequence[Job]) -> str:
    """A SLURM array script with one task per unfinished job (`sbatch` it from the directory the
    study's paths are relative to); a task stopped at its time limit requeues itself and resumes
    (every step runs with --resume-or-start). Collect with `bats ablate ... --summary`."""
    lines = emit_lines(jobs)
    if not lines:
        raise UserInputError(f"every job of the study in {o.out} has finished; nothing to submit "
                             "(`--summary` writes the results)")
    body = "\n".join(f"  {shlex.quote(line)}" for line in lines)
    return f"""#!/bin/bash
# bats ablate {o.study}: {len(lines)} unfinished job(s), one array task each.
# Submit from the directory the study was planned in:  sbatch THIS_FILE
# Then collect:  bats ablate {o.study} --out {shlex.quote(str(o.out))} --summary
#SBATCH --job-name=bats-ablate-{o.study}
#SBATCH --array=0-{len(lines) - 1}
#SBATCH --requeue
#SBATCH --signal=B:TERM@{SLURM_TERM_MARGIN_S}
#SBATCH --output=bats-ablate-{o.study}-%A_%a.log
set -uo pipefail
cd "${{SLURM_SUBMIT_DIR:-.}}"
jobs=(
{body}
)
requeue() {{
  # Time limit near: the running step saves a resumable checkpoint (exit 130); run again later.
  kill -TERM "$child" 2>/dev/null
  wait "$child"
  scontrol requeue "${{SLURM_ARRAY_JOB_ID}}_${{SLURM_ARRAY_TASK_ID}}"
  exit 0
}}
trap requeue TERM
bash -c "${{jobs[$SLURM_ARRAY_TASK_ID]}}" &
child=$!
wait "$child"
"""


# --------------------------------------------------------------------------- running


Runner = Callable[[Step, Path], int]


def subprocess_runner(step: Step, log: Path) -> int:
    """Run ``bats <argv>`` with this interpreter; stdout and stderr go to ``log``."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a", encoding="utf-8") as fh:
        fh.write(f"$ {step.shell()}\n")
        fh.flush()
        if step.stdout is None:
            return subprocess.run([sys.executable, "-m", "bats_cli", *step.argv], stdout=fh, stderr=fh,
                                  check=False).returncode
        tmp = step.stdout.with_name(step.stdout.name + ".tmp")
        with open(tmp, "w", encoding="utf-8") as out:
            code = subprocess.run([sys.executable, "-m", "bats_cli", *step.argv], stdout=out, stderr=fh,
                                  check=False).returncode
        if code == 0:
            tmp.replace(step.stdout)
        else:
            tmp.unlink(missing_ok=True)
        return code


def run_job(job: Job, runner: Runner = subprocess_runner, running: dict[str, Step] | None = None) -> str:
    """Run the unfinished steps of ``job`` in order; 'done', 'failed' or 'interrupted'.
    ``running``: updated with the step each job is at (for progress lines)."""
    times_path = job.dir / STEPS_NAME
    times = json.loads(times_path.read_text(encoding="utf-8")) if times_path.is_file() else {}
    job.dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(job.dir / JOB_NAME, {"variant": job.variant.name, "seed": job.seed, "key": job.key()})
    for step in job.steps:
        if step.done.is_file():
            continue
        job.dir.mkdir(parents=True, exist_ok=True)
        if running is not None:
            running[job.name] = step
        start = time.perf_counter()
        code = runner(step, job.dir / "logs" / f"{step.name}.log")
        times[step.name] = round(times.get(step.name, 0.0) + time.perf_counter() - start, 1)
        atomic_write_json(times_path, times)
        record_executed(job.dir, step, code)
        if code == 130:
            return "interrupted"
        if code != 0 or not step.done.is_file():
            return "failed"
    return "done"


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


def step_progress(job: Job, step: Step) -> str:
    """Where a running step is, from its run directory's metrics.csv: 'search stage 2/3, epoch 14'."""
    import csv

    run_dir = step.done.parent
    row: dict[str, str] = {}
    try:
        with open(run_dir / "metrics.csv", newline="", encoding="utf-8") as fh:
            for row in csv.DictReader(fh):  # noqa: B007 (the last row is wanted)
                pass
    except (OSError, csv.Error, UnicodeDecodeError):
        return f"{step.name} (starting)"
    if not row:
        return f"{step.name} (first epoch)"
    if step.name == "search" and row.get("stage"):
        return f"search stage {row['stage']}/3, epoch {row.get('epoch', '?')} done"
    return f"{step.name} epoch {row.get('epoch', '?')} done"


def record_executed(job_dir: Path, step: Step, code: int) -> None:
    """Append ``step``'s argv and exit code to the job's executed.json (a resumed step has one entry
    per attempt): what ran, as it ran, not regenerated from today's code."""
    path = job_dir / EXECUTED_NAME
    runs = _read(path) or {}
    runs.setdefault(step.name, []).append({"argv": ["bats", *step.argv], "exit": code,
                                           "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    atomic_write_json(path, runs)


def finished_jobs(study_dir: Path) -> dict[tuple[str, int], Path]:
    """The finished jobs of a study directory, by (their commands, seed)."""
    found: dict[tuple[str, int], Path] = {}
    for record in sorted(study_dir.glob(f"*/seed*/{JOB_NAME}")):
        info = _read(record)
        if info is None or not (record.parent / EVAL_NAME).is_file():
            continue
        found.setdefault((json.dumps(info.get("key")), int(info.get("seed", -1))), record.parent)
    return found


def reuse_jobs(jobs: Sequence[Job], sources: Sequence[Path], log: Callable[[str], None] = print) -> list[Job]:
    """Copy into each unstarted job the finished job of another study with the same commands and seed
    (e.g. `space`'s BATS row is `temperature`'s T = 0.2 row); returns the jobs that were filled."""
    import shutil

    index: dict[tuple[str, int], Path] = {}
    for src in sources:
        if not src.is_dir():
            raise UserInputError(f"--reuse {src}: not a study directory")
        for k, v in finished_jobs(src).items():
            index.setdefault(k, v)
    filled = []
    for job in jobs:
        src = index.get((json.dumps(job.key()), job.seed))
        # A started job keeps its own partial run: mixing two runs' files would be neither.
        if src is None or job.finished or job.dir.exists():
            continue
        tmp = job.dir.with_name(job.dir.name + ".reuse-tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(src, tmp, symlinks=True)
        atomic_write_text(tmp / REUSED_NAME, f"copied from {src}: a finished job with the same commands and seed\n")
        atomic_write_json(tmp / JOB_NAME, {"variant": job.variant.name, "seed": job.seed, "key": job.key(),
                                           "reused_from": str(src)})
        tmp.rename(job.dir)
        log(f"  reused      {job.name} (from {src})")
        filled.append(job)
    return filled


def _schedule(pending: Sequence[Job], workers: int, runner: Runner, status: dict[str, str],
              log: Callable[[str], None], poll: float = 1.0, progress_every: float = 120.0) -> None:
    """Run ``pending`` jobs ``workers`` at a time, each once the files it requires exist (another
    variant's search or genotype); a job whose requirement can no longer appear fails at once."""
    import threading

    lock = threading.Condition()
    queue = list(pending)
    producers = {str(p): j for j in pending for p in _outputs(j)}

    def take() -> Job | None:
        with lock:
            while queue and "interrupted" not in status.values():
                for job in queue:
                    if job.ready:
                        queue.remove(job)
                        return job
                    missing = [p for p in job.requires if not p.exists()]
                    # Blocked for good: nobody queued or running will write the missing file.
                    if all(_dead(producers.get(str(p)), status, queue) for p in missing):
                        queue.remove(job)
                        status[job.name] = "failed"
                        log(f"  failed      {job.name}: needs {', '.join(map(str, missing))}, which no job "
                            "of this run will write (run the variant it comes from first, e.g. without --variants)")
                        break
                else:
                    lock.wait(poll)
            return None

    running: dict[str, Step] = {}
    by_name = {j.name: j for j in pending}

    def worker() -> None:
        while (job := take()) is not None:
            log(f"  start {job.name}")
            result = run_job(job, runner, running)
            with lock:
                running.pop(job.name, None)
                status[job.name] = result
                lock.notify_all()
            why = step_error(job) if result == "failed" else None
            log(f"  {result:<11} {job.name}" + (f": {why}" if why else "")
                + (f" (logs: {job.dir / 'logs'})" if result == "failed" else ""))

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(max(1, min(workers, len(queue))))]
    for t in threads:
        t.start()
    last = time.monotonic()
    for t in threads:
        while t.is_alive():
            t.join(0.5)  # a timed join keeps the main thread responsive to Ctrl-C
            if progress_every and time.monotonic() - last >= progress_every:
                last = time.monotonic()
                for name, step in list(running.items()):
                    log(f"  running     {name}: {step_progress(by_name[name], step)}")


def _outputs(job: Job) -> list[Path]:
    return [step.done for step in job.steps] + [job.dir / "search" / "result.json", job.dir / "genotype.json"]


def _dead(producer: Job | None, status: Mapping[str, str], queue: Sequence[Job]) -> bool:
    """True when ``producer`` (None: not part of this run) will not write anything more."""
    return producer is None or (producer not in queue and producer.name in status)


def check_data(o: StudyOptions) -> None:
    """Refuse a study whose data no job could read, before the first job starts (one error line
    instead of every job failing in its log)."""
    from bats_cli.data import describe_spec
    from bats_cli.data.sources import require_split_dirs

    if o.dataset is None:
        return  # each preset's own data (the embedded fashion-mini at tiny; CIFAR-10 otherwise)
    if o.dataset == "imagefolder":
        if not o.data_dir:
            raise UserInputError("--dataset imagefolder needs --data-dir")
        require_split_dirs(o.data_dir, "imagefolder")
    describe_spec(o.dataset, o.data_dir)


def run_study(o: StudyOptions, *, runner: Runner = subprocess_runner, log: Callable[[str], None] = print,
              reuse: Sequence[Path] = ()) -> dict:
    """Run every unfinished job (``o.jobs`` at a time), then write the summary; returns it.

    ``reuse``: other studies' directories whose finished jobs with the same commands are copied
    instead of being run again."""
    jobs = build_jobs(o)
    if any(not j.finished for j in jobs):
        check_data(o)
    o.out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(o.out / STUDY_NAME, study_record(o))
    for job in jobs:
        job.dir.parent.mkdir(parents=True, exist_ok=True)
    reuse_jobs(jobs, reuse, log)
    pending = [j for j in jobs if not j.finished]
    log(f"ablate {o.study}: {len(jobs)} jobs, {len(jobs) - len(pending)} already finished, "
        f"{len(pending)} to run ({o.jobs} at a time) in {o.out}")
    status: dict[str, str] = {}
    try:
        _schedule(pending, o.jobs, runner, status, log)
    except KeyboardInterrupt:
        # The children got the signal too: each saves its checkpoint; rerun to resume.
        write_summary(o, jobs, status)
        raise Interrupted(f"ablate {o.study} interrupted; rerun the same command to resume") from None
    summary = write_summary(o, jobs, status)
    if "interrupted" in status.values():
        raise Interrupted(f"ablate {o.study} interrupted; rerun the same command to resume")
    failed = [name for name, s in status.items() if s == "failed"]
    if failed:
        raise RunFailure(f"{len(failed)} job(s) failed: {', '.join(failed)} (see their logs/); "
                         "rerun the same command to retry them")
    return summary


# --------------------------------------------------------------------------- re-checking

# What a published study keeps of each job: enough to re-evaluate its network on other images
# and to recompute every statistic, not the checkpoints (MBs each) a reader does not need.
PUBLISHED = ("job.json", "executed.json", "steps.json", "REUSED.txt", "match.json", "genotype.json",
             "eval.json", "eval.predictions.npy", "search/result.json", "search/metrics.csv",
             "search/alphas/*.json", "train/result.json", "train/config.json", "train/metrics.csv",
             "candidates/*/genotype.json", "candidates/*/train/result.json", "candidates/*/train/config.json",
             "binarize/result.json", "binarize/metrics.csv", "binarize/model.packed.safetensors",
             "teacher/result.json", "teacher/config.json", "teacher/metrics.csv")


def publish(o: StudyOptions, dest: Path, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Copy every finished job's light files (genotype, packed artifact, results, per-image
    predictions, the search's α history) and the summary into ``dest``, laid out as a study
    directory: `bats ablate STUDY --out DEST --summary` / `--evaluate-on DIR` work on the copy."""
    import shutil

    if dest.resolve() == o.out.resolve():
        raise UserInputError("--publish needs another directory than --out")
    copied = 0
    for job in build_jobs(o):
        if not job.finished:
            continue
        rel = job.dir.relative_to(o.out)
        for pattern in PUBLISHED:
            for src in sorted(job.dir.glob(pattern)):
                target = dest / rel / src.relative_to(job.dir)
                target.parent.mkdir(parents=True, exist_ok=True)
                tmp = target.with_name(target.name + ".tmp")
                shutil.copyfile(src, tmp)
                tmp.replace(target)
                copied += 1
    atomic_write_json(dest / STUDY_NAME, study_record(o))
    summary = write_summary(replace(o, out=dest), build_jobs(replace(o, out=dest)))
    log(f"published {copied} files of {sum(1 for j in build_jobs(o) if j.finished)} finished jobs to {dest}")
    return summary


def _test_layout(data_dir: Path, dataset: str) -> Path:
    """A directory `bats eval --data-dir` reads (train/ + val/, test images in val/) for a test split
    given as DIR with val/ (train/ optional: only its class folder names are read) or as a folder of
    class folders; links in a temporary directory stand in for what is missing."""
    import tempfile

    if not data_dir.is_dir():
        raise UserInputError(f"--evaluate-on {data_dir}: no such directory")
    if (data_dir / "train").is_dir() and (data_dir / "val").is_dir():
        return data_dir
    split = data_dir / "val" if (data_dir / "val").is_dir() else data_dir
    if not any(p.is_dir() for p in split.iterdir()):
        raise UserInputError(f"--evaluate-on {data_dir}: expected DIR/val/<class>/*.jpg (or DIR/<class>/*.jpg)")
    tmp = Path(tempfile.mkdtemp(prefix="bats-evaluate-on-"))
    for name in ("train", "val"):
        (tmp / name).symlink_to(split.resolve(), target_is_directory=True)
    return tmp


def data_slug(data_dir: str | Path) -> str:
    """``eval-<slug>.json``: the data directory's name as one harmless file-name component."""
    from bats_cli.names import safe_name

    name = Path(str(data_dir).rstrip("/\\")).name or "data"
    return safe_name(name)


def evaluate_on(o: StudyOptions, data_dir: str | Path, *, dataset: str = "imagefolder",
                runner: Runner = subprocess_runner, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Re-evaluate every finished job's packed network on another test split (``DATA_DIR/val``),
    as ``eval-<slug>.json`` + predictions beside each job's ``eval.json``, then write
    ``results-<slug>.json/.md`` with the same statistics. No training: minutes for a study."""
    slug = data_slug(data_dir)
    eval_name = f"eval-{slug}.json"
    layout = _test_layout(Path(data_dir), dataset)
    jobs = build_jobs(o)
    done = [j for j in jobs if j.finished and j.packed.is_file()]
    if not done:
        raise UserInputError(f"{o.out}: no finished job with a packed network (binarize/model.packed.safetensors) "
                             "to re-evaluate; is it a study directory of this study?")
    log(f"ablate {o.study}: re-evaluating {len(done)} networks on {data_dir} -> {eval_name}")
    try:
        failed = _evaluate_jobs(o, done, layout, slug, dataset, runner, log)
    finally:
        if layout != Path(data_dir):  # the temporary links only; the images are untouched
            import shutil

            shutil.rmtree(layout, ignore_errors=True)
    summary = write_summary(o, jobs, eval_name=eval_name, stem=f"results-{slug}")
    if failed:
        raise RunFailure(f"{len(failed)} job(s) could not be evaluated on {data_dir}: {', '.join(failed)}")
    return summary


def _evaluate_jobs(o: StudyOptions, done: Sequence[Job], layout: Path, slug: str, dataset: str,
                   runner: Runner, log: Callable[[str], None]) -> list[str]:
    eval_name = f"eval-{slug}.json"
    failed = []
    for job in done:
        step = Step(f"eval-{slug}", ("eval", str(job.packed), "--dataset", dataset, "--data-dir", str(layout),
                                     *_threads(o), "--output", str(job.dir / eval_name)), job.dir / eval_name)
        code = runner(step, job.dir / "logs" / f"{step.name}.log")
        record_executed(job.dir, step, code)
        if code == 130:
            raise Interrupted(f"ablate {o.study} --evaluate-on interrupted; rerun to continue")
        if code != 0 or not step.done.is_file():
            failed.append(job.name)
            log(f"  failed      {job.name} (log: {job.dir / 'logs' / (step.name + '.log')})")
        else:
            log(f"  evaluated   {job.name}")
    return failed


# --------------------------------------------------------------------------- summary


def _read(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _mean_std(values: Sequence[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _last_entropy(search_dir: Path) -> dict[str, float] | None:
    import csv

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
    from bats_cli.counting import count_model
    from bats_cli.modelio import build_from_settings

    net = train_result["network"]
    model = build_from_settings(genotype, net)
    size = int(net.get("image_size") or 32)
    report = count_model(model, (int(net["in_channels"]), size, size))
    return {"params": report.params, "ops": report.ops, "bops": report.bops, "flops": report.flops}


def job_record(job: Job, status: str | None = None, *, eval_name: str = EVAL_NAME,
               root: Path | None = None) -> dict[str, Any]:
    """What one job produced (read from its result files); ``eval_name``: which eval result of the
    job is its top-1 (``eval.json``, or one written by ``--evaluate-on``); paths relative to ``root``."""
    from bats_cli.derive import parameter_free_share
    from bats_cli.stats import binomial_se
    from bats_cli.zoo import resolve_genotype

    ev = _read(job.dir / eval_name)
    rec: dict[str, Any] = {"variant": job.variant.name, "seed": job.seed, "dir": _rel(job.dir, root),
                           "status": "done" if ev is not None else (status or "pending")}
    bz, tr = _read(job.dir / "binarize" / "result.json"), _read(job.dir / "train" / "result.json")
    sr = _read(job.dir / "search" / "result.json")
    rec["binary_top1"] = ev["top1"] if ev else None
    rec["n_images"] = ev.get("n_images") if ev else None
    rec["top1_se"] = (ev.get("top1_se") if ev and ev.get("top1_se") is not None else
                      (binomial_se(ev["top1"], ev["n_images"]) if ev and ev.get("n_images") else None))
    rec["images_sha256"] = ev.get("images_sha256") if ev else None
    rec["predictions"] = (_rel(job.dir / ev["predictions"], root)
                          if ev and isinstance(ev.get("predictions"), str) else None)
    rec["step1_top1"] = bz["step1_top1"] if bz else None
    rec["seconds"] = _read(job.dir / STEPS_NAME) or {}
    # The argv of every step as it ran (recorded by run_job), not regenerated from today's code.
    rec["executed"] = _read(job.dir / EXECUTED_NAME) or {}
    rec["reused_from"] = (_read(job.dir / JOB_NAME) or {}).get("reused_from")
    if rec["status"] == "failed":
        rec["error"] = step_error(job)
    if sr is not None:
        from bats_cli.search_health import summarise_run

        rec["search_warnings"] = [w["message"] for w in sr.get("warnings", [])]
        rec["entropy_rel"] = _last_entropy(job.dir / "search")
        if (job.dir / "search" / "alphas").is_dir():
            health = summarise_run(job.dir / "search")
            rec["search_health"] = {**health, "search_dir": _rel(job.dir / "search", root)}
    if job.variant.candidates:
        rec["candidates"] = _candidates(job)
        rec["selection_seconds"] = round(sum(v for k, v in rec["seconds"].items() if k.startswith("candidate")), 1)
    if job.variant.match_of:
        rec["match"] = _read(job.dir / MATCH_NAME)
    if job.variant.teacher is not None:
        # The teacher's cost (trained by the job of variant `teacher`, shared by the seed's other rows).
        te = _read(job.dir.parent.parent / job.variant.teacher / job.dir.name / "teacher" / "result.json")
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
        res, cfg = _read(cdir / "train" / "result.json"), _read(cdir / "train" / "config.json") or {}
        rows.append({"candidate": cdir.name, "genotype": (cfg.get("genotype") or {}).get("name"),
                     "holdout_top1": res.get("final_val_top1") if res else None,
                     "seconds": res.get("seconds") if res else None})
    chosen = _read(job.dir / "genotype.json")
    for r in rows:
        r["chosen"] = chosen is not None and r["genotype"] == chosen.get("name")
    return rows


def comparison_pairs(study: str, names: Sequence[str]) -> list[tuple[str, str]]:
    """(a, b) pairs compared seed for seed: a study's reference row against every other row; in
    the random study each searched arm against each random arm, and the two selections."""
    if study == "random":
        pairs = [(a, b) for a in ("searched", "searched-perturbation")
                 for b in ("random", "random-matched", "random-search")]
        pairs.append(("searched-perturbation", "searched"))
    elif study == "proxy":
        pairs = [("searched-c12", "random"), ("searched", "random"), ("searched-c12", "searched")]
    else:
        ref = REFERENCE[study]
        pairs = [(ref, v) for v in names if v != ref]
    return [(a, b) for a, b in pairs if a in names and b in names]


def _load_predictions(root: Path, rel: str | None):
    import numpy as np

    if rel is None:
        return None
    path = root / rel
    try:
        arr = np.load(path, allow_pickle=False)
    except (OSError, ValueError):
        return None
    return arr if arr.ndim == 2 and arr.shape[0] == 2 else None


def compare(study: str, names: Sequence[str], records: Sequence[Mapping[str, Any]], root: Path,
            metric: str = "binary_top1") -> list[dict[str, Any]]:
    """Paired statistics (bootstrap interval, t, exact Wilcoxon, wins, verdict) of every compared
    pair over the seeds both finished; with per-image predictions on the same images, an exact
    McNemar test per seed."""
    from bats_cli.stats import mcnemar_exact, paired_comparison

    out = []
    for a, b in comparison_pairs(study, names):
        ra = {r["seed"]: r for r in records if r["variant"] == a and r.get(metric) is not None}
        rb = {r["seed"]: r for r in records if r["variant"] == b and r.get(metric) is not None}
        seeds = sorted(set(ra) & set(rb))
        if not seeds:
            continue
        res = paired_comparison([ra[s][metric] for s in seeds], [rb[s][metric] for s in seeds],
                                name_a=a, name_b=b, seed=0)
        res = {"metric": metric, "seeds": seeds, **res}
        if metric == "binary_top1":
            tests = []
            for s in seeds:
                if ra[s].get("images_sha256") is None or ra[s]["images_sha256"] != rb[s].get("images_sha256"):
                    continue
                pa, pb = _load_predictions(root, ra[s].get("predictions")), _load_predictions(root, rb[s].get("predictions"))
                if pa is None or pb is None or pa.shape != pb.shape:
                    continue
                tests.append({"seed": s, **mcnemar_exact(pa[0], pb[0], pa[1])})
            res["mcnemar"] = tests
        out.append(res)
    return out


def _stage1_alpha(search_dir: Path) -> dict[str, dict[tuple[int, int], dict[str, float]]] | None:
    """α of the last stage-1 epoch (every op of the space on every edge), keyed by (node, input)."""
    files = sorted(search_dir.glob("alphas/stage1_epoch*.json"))
    doc = _read(files[-1]) if files else None
    if doc is None:
        return None
    out = {}
    for cell in ("normal", "reduce"):
        edges = doc.get(cell)
        if not isinstance(edges, list) or not all(isinstance(e, dict) and isinstance(e.get("alpha"), dict) for e in edges):
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
    from bats_cli.stats import kendall_tau

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
            from bats_cli.cell_similarity import cell_similarity

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
        ent = "-" if v["entropy_normal_rel"] is None else f"{v['entropy_normal_rel']:.2f} / {v['entropy_reduce_rel']:.2f}"
        lines.append(
            f"| {v['label']} | {v['paper'] or '-'} | {v['n']} | "
            f"{_pm(v['binary_top1_mean'], v['binary_top1_std'], v['n'])} | "
            f"{_num(v.get('top1_se_mean'), '.2f')} | "
            f"{_pm(v['step1_top1_mean'], v['step1_top1_std'], v['n'])} | "
            f"{_num(v['params'], ',.0f')} | {_num(None if v['ops'] is None else v['ops'] / 1e6, '.2f')} | "
            f"{_num(v['param_free_normal'], '.2f') if v.get('arch', 'cells') == 'cells' else 'not a cell network'} | "
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
            lines.append(f"- {c['verdict']}" + (f"; t = {c['t']}, t-test p = {c['t_p']}" if c.get("t") is not None else "")
                         + (f"; McNemar p < 0.05 in {sig} of {len(mc)} seeds" if mc else ""))
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
