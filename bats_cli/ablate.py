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
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bats_cli.archs import RESNET18, model_key
from bats_cli.errors import Interrupted, RunFailure, UserInputError
from bats_cli.fileio import atomic_write_json, atomic_write_text

STUDIES = ("space", "temperature", "strategy", "random", "zoo")
# tiny: a smoke test of a study's commands (about a minute per job), not a result.
PRESETS = ("cpu", "paper", "tiny")
EVAL_NAME = "eval.json"
JOB_NAME = "job.json"  # the job's commands, which --reuse matches
REUSED_NAME = "REUSED.txt"
STEPS_NAME = "steps.json"
RESULTS_JSON = "results.json"
RESULTS_MD = "results.md"
RESULTS_PNG = "results.png"
# §6.1: the reduction cell's temperature is 0.15 / 0.2 = 0.75 of the normal cell's.
REDUCE_RATIO = 0.75


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


@dataclass(frozen=True)
class Step:
    name: str
    argv: tuple[str, ...]  # the command after `bats`
    done: Path  # exists once the step has finished

    def shell(self) -> str:
        return shlex.join(("bats", *self.argv))


@dataclass
class Job:
    variant: Variant
    seed: int
    dir: Path
    steps: list[Step] = field(default_factory=list)

    @property
    def name(self) -> str:
        return f"{self.variant.name}/seed{self.seed}"

    @property
    def result(self) -> Path:
        return self.dir / EVAL_NAME

    @property
    def finished(self) -> bool:
        return self.result.is_file()

    def shell(self) -> str:
        return " && ".join(step.shell() for step in self.steps)

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
    if study == "random":  # Table 5's random-search row, against a searched cell
        return [
            Variant("searched", "BATS search (this preset)", _search(optimizer), paper="93.7"),
            Variant("random", "random cell of the BATS space", random=True, paper="92.9"),
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

    def __post_init__(self) -> None:
        if self.study not in STUDIES:
            raise UserInputError(f"unknown study {self.study!r}; choose one of: {', '.join(STUDIES)}")
        if self.preset not in PRESETS:
            raise UserInputError(f"unknown --preset {self.preset!r}; choose one of: {', '.join(PRESETS)}")
        if self.seeds < 1 or self.jobs < 1:
            raise UserInputError("--seeds and --jobs must be at least 1")
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
            if variant.search is not None:
                job.steps.append(Step("search", ("search", *_data_flags(o), *variant.search, *common,
                                                 "--out", str(d / "search")), d / "search" / "result.json"))
                job.steps.append(Step("derive", ("derive", str(d / "search"), "--output", str(genotype_file),
                                                 "--force"), genotype_file))
                genotype = str(genotype_file)
            elif variant.random:
                job.steps.append(Step("derive", ("derive", "--random", "--seed", str(seed), "--space", "bats",
                                                 "--name", f"random_seed{seed}", "--output",
                                                 str(genotype_file), "--force"), genotype_file))
                genotype = str(genotype_file)
            else:
                genotype = str(variant.genotype)
            job.steps.append(Step("train", ("train", genotype, *_data_flags(o), *common, "--out", str(d / "train")),
                                  d / "train" / "result.json"))
            job.steps.append(Step("binarize", ("binarize", str(d / "train" / "last.safetensors"), "--preset",
                                               o.preset, *_threads(o), "--resume-or-start", "--quiet", "--out",
                                               str(d / "binarize")), d / "binarize" / "result.json"))
            job.steps.append(Step("eval", ("eval", str(d / "binarize" / "model.packed.safetensors"),
                                           *_data_flags(o), *_threads(o), "--output", str(job.result)),
                                  job.result))
            jobs.append(job)
    return jobs


def emit_lines(jobs: Sequence[Job]) -> list[str]:
    """One shell line per unfinished job."""
    return [job.shell() for job in jobs if not job.finished]


# --------------------------------------------------------------------------- running


Runner = Callable[[Step, Path], int]


def subprocess_runner(step: Step, log: Path) -> int:
    """Run ``bats <argv>`` with this interpreter; stdout and stderr go to ``log``."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a", encoding="utf-8") as fh:
        fh.write(f"$ {step.shell()}\n")
        fh.flush()
        return subprocess.run([sys.executable, "-m", "bats_cli", *step.argv], stdout=fh, stderr=fh,
                              check=False).returncode


def run_job(job: Job, runner: Runner = subprocess_runner) -> str:
    """Run the unfinished steps of ``job`` in order; 'done', 'failed' or 'interrupted'."""
    times_path = job.dir / STEPS_NAME
    times = json.loads(times_path.read_text(encoding="utf-8")) if times_path.is_file() else {}
    job.dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(job.dir / JOB_NAME, {"variant": job.variant.name, "seed": job.seed, "key": job.key()})
    for step in job.steps:
        if step.done.is_file():
            continue
        job.dir.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        code = runner(step, job.dir / "logs" / f"{step.name}.log")
        times[step.name] = round(times.get(step.name, 0.0) + time.perf_counter() - start, 1)
        atomic_write_json(times_path, times)
        if code == 130:
            return "interrupted"
        if code != 0 or not step.done.is_file():
            return "failed"
    return "done"


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


def run_study(o: StudyOptions, *, runner: Runner = subprocess_runner, log: Callable[[str], None] = print,
              reuse: Sequence[Path] = ()) -> dict:
    """Run every unfinished job (``o.jobs`` at a time), then write the summary; returns it.

    ``reuse``: other studies' directories whose finished jobs with the same commands are copied
    instead of being run again."""
    jobs = build_jobs(o)
    o.out.mkdir(parents=True, exist_ok=True)
    for job in jobs:
        job.dir.parent.mkdir(parents=True, exist_ok=True)
    reuse_jobs(jobs, reuse, log)
    pending = [j for j in jobs if not j.finished]
    log(f"ablate {o.study}: {len(jobs)} jobs, {len(jobs) - len(pending)} already finished, "
        f"{len(pending)} to run ({o.jobs} at a time) in {o.out}")
    status: dict[str, str] = {}

    def one(job: Job) -> None:
        if "interrupted" in status.values():
            return  # a step was interrupted (Ctrl-C / SIGTERM): start nothing new
        log(f"  start {job.name}")
        status[job.name] = run_job(job, runner)
        log(f"  {status[job.name]:<11} {job.name}" + (f" (logs: {job.dir / 'logs'})" if status[job.name] == "failed" else ""))

    try:
        with ThreadPoolExecutor(max_workers=o.jobs) as pool:
            for fut in [pool.submit(one, j) for j in pending]:
                fut.result()
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


def job_record(job: Job, status: str | None = None) -> dict[str, Any]:
    """What one job produced (read from its result files)."""
    from bats_cli.derive import parameter_free_share
    from bats_cli.genotype import resolve_genotype

    rec: dict[str, Any] = {"variant": job.variant.name, "seed": job.seed, "dir": str(job.dir),
                           "status": "done" if job.finished else (status or "pending"),
                           "command": job.shell()}
    ev, bz, tr = _read(job.result), _read(job.dir / "binarize" / "result.json"), _read(job.dir / "train" / "result.json")
    sr = _read(job.dir / "search" / "result.json")
    rec["binary_top1"] = ev["top1"] if ev else None
    rec["step1_top1"] = bz["step1_top1"] if bz else None
    rec["seconds"] = _read(job.dir / STEPS_NAME) or {}
    rec["reused_from"] = (_read(job.dir / JOB_NAME) or {}).get("reused_from")
    if sr is not None:
        rec["search_warnings"] = [w["message"] for w in sr.get("warnings", [])]
        rec["entropy_rel"] = _last_entropy(job.dir / "search")
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


def summarise(o: StudyOptions, jobs: Sequence[Job], status: Mapping[str, str] | None = None) -> dict[str, Any]:
    status = status or {}
    records = [job_record(j, status.get(j.name)) for j in jobs]
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
        variants.append(row)
    return {
        "study": o.study,
        "preset": o.preset,
        "dataset": o.dataset,
        "data_dir": o.data_dir,
        "seeds": o.seeds,
        "optimizer": o.optimizer,
        "complete": all(r["status"] == "done" for r in records),
        "variants": variants,
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
        "| variant | paper | n | binary top-1 | step-1 top-1 | params | ops (M) | param-free normal | "
        "entropy N/R (rel.) | time / job (min) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for v in s["variants"]:
        ent = "-" if v["entropy_normal_rel"] is None else f"{v['entropy_normal_rel']:.2f} / {v['entropy_reduce_rel']:.2f}"
        lines.append(
            f"| {v['label']} | {v['paper'] or '-'} | {v['n']} | "
            f"{_pm(v['binary_top1_mean'], v['binary_top1_std'], v['n'])} | "
            f"{_pm(v['step1_top1_mean'], v['step1_top1_std'], v['n'])} | "
            f"{_num(v['params'], ',.0f')} | {_num(None if v['ops'] is None else v['ops'] / 1e6, '.2f')} | "
            f"{_num(v['param_free_normal'], '.2f') if v.get('arch', 'cells') == 'cells' else 'not a cell network'} | "
            f"{ent} | "
            f"{_num(None if v['seconds_mean'] is None else v['seconds_mean'] / 60, '.1f')} |"
        )
    lines.append("")
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
                  warn: Callable[[str], None] | None = None) -> dict[str, Any]:
    summary = summarise(o, jobs, status)
    atomic_write_json(o.out / RESULTS_JSON, summary)
    atomic_write_text(o.out / RESULTS_MD, markdown(summary))
    if plot(summary, o.out / RESULTS_PNG) is None:
        (warn or (lambda m: print(f"warning: {m}", file=sys.stderr)))(
            "matplotlib is not installed: no results.png (pip install 'bats[report]')")
    return summary
