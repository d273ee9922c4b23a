"""A study's jobs: every variant × seed is one job of ordinary ``bats`` commands (search where the
variant needs one -> derive -> train -> binarize -> eval), each with its own run directory under
``OUT/<variant>/seed<N>/``. A step is finished when its result file exists; a job when its
``eval.json`` does. Nothing here runs a command: ``--emit`` prints them (shell lines, a SLURM array)."""

from __future__ import annotations

import json
import math
import shlex
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bats_cli.core.errors import UserInputError
from bats_cli.core.genotype import Genotype
from bats_cli.studies.catalog import (
    CANDIDATE_EPOCHS,
    CANDIDATE_SEED_BASE,
    CANDIDATES,
    HOLDOUT,
    MATCH_TOLERANCE,
    PERTURB_IMAGES,
    PRESETS,
    STUDIES,
    Variant,
    study_variants,
)

# The files of a job's directory.
EVAL_NAME = "eval.json"
JOB_NAME = "job.json"  # the job's commands, which --reuse matches
REUSED_NAME = "REUSED.txt"
STEPS_NAME = "steps.json"
EXECUTED_NAME = "executed.json"  # the argv of every step as it was run (recorded, never regenerated)
MATCH_NAME = "match.json"  # a matched random cell's draw report (derive --random --match --json)


def read_json(path: Path) -> dict[str, Any] | None:
    """A result file's content; None when it is missing or unreadable (a job not finished yet)."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


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

    def row(self, variant: str) -> Path:
        """The directory of the same seed's job of another row of the study."""
        return self.dir.parent.parent / variant / self.dir.name

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
        if arg == "--quiet" or arg == "--force" and argv[0] == "eval":  # eval's --force: not in older keys
            continue
        out.append(arg.replace(str(job_dir), "{job}"))
    return out


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


def thread_flags(o: StudyOptions) -> tuple[str, ...]:
    return ("--threads", str(o.threads)) if o.threads else ()


# The options a study directory was made with: --summary, --evaluate-on and --publish read them
# back, so a study (or a published copy) is re-checked without repeating its flags.
STUDY_NAME = "study.json"
_RECORDED = ("study", "preset", "dataset", "data_dir", "seeds", "optimizer", "variants", "subset", "holdout",
             "candidates")


def study_record(o: StudyOptions, previous: dict[str, Any] | None = None) -> dict[str, Any]:
    """What ``out/study.json`` records. Given the ``previous`` record of the same directory, the study
    grows: the variants of both runs (none named = all of them) and the larger number of seeds, so a
    study run in parts (``--variants A`` then ``--variants B``) is summarised and published whole."""
    rec = {k: (list(v) if isinstance(v, tuple) else v) for k, v in ((k, getattr(o, k)) for k in _RECORDED)}
    if previous and previous.get("study") == o.study:
        before = previous.get("variants") or []
        if rec["variants"] and isinstance(before, list) and before:
            names = set(rec["variants"]) | {v for v in before if isinstance(v, str)}
            rec["variants"] = [v.name for v in study_variants(o.study, optimizer=o.optimizer) if v.name in names]
        else:
            rec["variants"] = []
        if isinstance(previous.get("seeds"), int):
            rec["seeds"] = max(rec["seeds"], previous["seeds"])
    return rec


def recorded_options(out: Path, study: str, *, seeds: int | None = None,
                     variants: Sequence[str] = ()) -> StudyOptions | None:
    """The options recorded in ``out/study.json`` (None if there is none); ``seeds`` / ``variants``
    given on the command line narrow or extend them."""
    rec = read_json(out / STUDY_NAME)
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


def _needs_own_search(job_dir: Path, shared: Path) -> bool:
    """Whether a job that derives from another row's search must run that search itself: it already
    started its own, or (unfinished) the other row's search finished but kept no checkpoint."""
    if (job_dir / "search").is_dir():
        return True
    if (job_dir / EVAL_NAME).is_file():
        return False
    return (shared / "result.json").is_file() and not (shared / "last.safetensors").is_file()


def build_jobs(o: StudyOptions) -> list[Job]:
    """Every variant × seed of the study with its steps (nothing is run)."""
    jobs = []
    # Seed-major: a study stopped early has every variant at its first seeds.
    for seed in range(o.seeds):
        for variant in o.selected():
            d = o.out / variant.name / f"seed{seed}"
            job = Job(variant, seed, d)
            genotype_file = d / "genotype.json"
            common = ("--preset", o.preset, "--seed", str(seed), *thread_flags(o), "--resume-or-start", "--quiet")
            derive_out = ("--output", str(genotype_file), "--force")
            if variant.search is not None:
                job.steps.append(Step("search", ("search", *_data_flags(o), *variant.search, *common,
                                                 "--out", str(d / "search")), d / "search" / "result.json"))
                job.steps.append(Step("derive", ("derive", str(d / "search"), *derive_out), genotype_file))
                genotype = str(genotype_file)
            elif variant.search_of is not None:
                search_dir = job.row(variant.search_of) / "search"
                if _needs_own_search(d, search_dir):
                    # The other row's search kept no checkpoint (a reused or published job): run the
                    # same search command here (compared with that row only if it reproduces its α).
                    source = next(v for v in study_variants(o.study, optimizer=o.optimizer)
                                  if v.name == variant.search_of)
                    search_dir = d / "search"
                    job.steps.append(Step("search", ("search", *_data_flags(o), *(source.search or ()), *common,
                                                     "--out", str(search_dir)), search_dir / "result.json"))
                else:
                    job.requires.append(search_dir / "result.json")
                images = PERTURB_IMAGES.get(o.preset)
                perturb = ("--perturb-images", str(images)) if images and variant.select == "perturbation" else ()
                job.steps.append(Step("derive", ("derive", str(search_dir), "--select", variant.select,
                                                 *perturb, *_data_flags(o), "--seed", str(seed), *thread_flags(o),
                                                 *derive_out), genotype_file))
                genotype = str(genotype_file)
            elif variant.match_of is not None:
                target = job.row(variant.match_of) / "genotype.json"
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
                teacher_dir = job.row(variant.teacher) / "teacher"
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
                                               o.preset, *thread_flags(o), *distill, *variant.binarize_flags,
                                               "--resume-or-start", "--quiet", "--out",
                                               str(d / "binarize")), d / "binarize" / "result.json"))
            job.steps.append(Step("eval", ("eval", str(job.packed), *_data_flags(o), *thread_flags(o),
                                           "--output", str(job.result), "--force"), job.result))
            jobs.append(job)
    return jobs


def best_of_runs(run_dirs: Sequence[Path]) -> dict[str, Any]:
    """The random-search selection: of finished `bats train --holdout` runs of cell networks, the one
    with the highest top-1 on its held-out training images (first on ties). Runs validated on the
    test split are refused: selecting on it would leak the reported split into the choice.

    Returns ``{"genotype": Genotype, "chosen": dir, "candidates": [{"run", "genotype", "holdout_top1"}]}``."""
    if not run_dirs:
        raise UserInputError("give at least one training run directory")
    rows = []
    for d in map(Path, run_dirs):
        res, cfg = read_json(d / "result.json"), read_json(d / "config.json")
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
