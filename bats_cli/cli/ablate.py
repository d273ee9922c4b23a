"""`bats ablate STUDY`: the paper's ablations (Tables 2-5) and a random baseline, as bats jobs."""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Any, Mapping, Optional

import typer

from bats_cli.cli.app import app
from bats_cli.cli.options import (
    MAX_WORKERS,
    OUTPUT,
    RUN,
    DataDirOpt,
    DatasetOpt,
    JsonOpt,
    ThreadsOpt,
    opt,
    path_or_none,
    preset_option,
)
from bats_cli.cli.output import emit_result
from bats_cli.core.errors import UserInputError

STUDY = "Study"
# bats_cli.studies.catalog.PRESETS, in words (that module is not imported for --help).
ABLATE_PRESETS = {
    "cpu": "minutes per job on a CPU",
    "paper": "the paper's full settings, GPU",
    "tiny": "a one-minute smoke test of the commands, not a result",
}
AblatePresetOpt = preset_option(
    ABLATE_PRESETS, lead="Settings of every job of the study:", panel=STUDY,
    described="; ".join(f"{name}: {what}" for name, what in ABLATE_PRESETS.items()))


def result_table(summary: Mapping[str, Any]) -> Any:
    from rich.table import Table

    verdicts = [c["verdict"] for c in summary.get("comparisons") or []]
    t = Table(title=f"bats ablate {summary['study']} (preset {summary['preset']})",
              caption="\n".join(verdicts) or None, caption_justify="left")
    for col in ("variant", "paper", "n", "binary top-1", "step-1 top-1", "param-free normal"):
        t.add_column(col)
    def pm(v: dict, key: str) -> str:
        m, s = v[f"{key}_mean"], v[f"{key}_std"]
        return "-" if m is None else (f"{m:.1f} ± {s:.1f}" if v["n"] > 1 else f"{m:.1f}")

    for v in summary["variants"]:
        pf = "-" if v["param_free_normal"] is None else f"{v['param_free_normal']:.2f}"
        t.add_row(v["label"], v["paper"] or "-", str(v["n"]), pm(v, "binary_top1"), pm(v, "step1_top1"), pf)
    return t


@app.command("ablate")
def ablate_command(
    study: Annotated[str, typer.Argument(
        metavar="STUDY",
        help="space (Table 2), temperature (Table 3), strategy (Table 4), random (searched vs random cells), "
             "zoo (Table 5's cells), proxy (the CPU search's width) or recipe (the paper's two steps vs "
             "distillation from a real-valued teacher: kd, kd+attention, kd+rprelu).")],
    out: Annotated[Optional[Path], opt(
        "--out", panel=OUTPUT, file_okay=False,
        help="Study directory (one run directory per job; results.json/.md/.png). Default runs/ablate-STUDY; rerun to "
             "resume.")] = None,
    preset: AblatePresetOpt = "cpu",
    dataset: DatasetOpt = None,
    data_dir: DataDirOpt = None,
    variants: Annotated[Optional[str], opt(
        "--variants", panel=STUDY, metavar="A,B",
        help="Run only these rows of the study, comma-separated (e.g. --variants T0.2,T0.05).")] = None,
    seeds: Annotated[Optional[int], opt(
        "--seeds", panel=STUDY, min=1,
        help="Seeds per variant (0..N-1). Default 1; with --summary / --evaluate-on / --publish, the study's recorded "
             "number.")] = None,
    jobs: Annotated[int, opt(
        "--jobs", panel=RUN, min=1, max=MAX_WORKERS,
        help="Jobs run at the same time (local subprocesses).")] = 1,
    threads: ThreadsOpt = None,
    reuse: Annotated[Optional[list[Path]], opt(
        "--reuse", panel=RUN, file_okay=False, metavar="DIR",
        help="Another study's directory (repeatable): its finished jobs with the same commands and seed are copied "
             "instead of run (e.g. space's BATS row = temperature's T = 0.2 row).")] = None,
    subset: Annotated[Optional[int], opt(
        "--subset", panel=STUDY, min=1, metavar="N",
        help="Training images of every `bats train` of the study (class-balanced, per seed), e.g. 10000 of "
             "cifar10-large; searches keep their preset's.")] = None,
    holdout: Annotated[Optional[int], opt(
        "--holdout", panel=STUDY, min=1, metavar="N",
        help="Training images held out of every training run as its validation set (selection never reads the test "
             "split). Default: cpu 1000, paper 5000, tiny 250.")] = None,
    candidates: Annotated[Optional[int], opt(
        "--candidates", panel=STUDY, min=1, metavar="N",
        help="random-search arm: random cells trained briefly before the best on the held-out images is kept. Default: "
             "cpu 4, paper 8, tiny 2.")] = None,
    evaluate_on: Annotated[Optional[Path], opt(
        "--evaluate-on", panel=OUTPUT, file_okay=False, metavar="DATA_DIR",
        help="Re-evaluate every finished job's packed network on DATA_DIR/val, DATA_DIR/test or DATA_DIR itself (an "
             "ImageFolder test split; class folders in the training data's sorted order) and write "
             "results-<name>.json/.md with the same statistics; trains nothing.")] = None,
    publish: Annotated[Optional[Path], opt(
        "--publish", panel=OUTPUT, file_okay=False, metavar="DIR",
        help="Copy every finished job's genotype, packed network, results and predictions (no checkpoints) and the "
             "summary into DIR, a study directory others can re-check.")] = None,
    optimizer: Annotated[str, opt(
        "--optimizer", panel=STUDY,
        help="Weights optimiser of every search: adam (default, §6.1); the same for every variant.")] = "adam",
    emit: Annotated[Optional[str], opt(
        "--emit", panel=OUTPUT, metavar="shell|slurm",
        help="Run nothing; print the unfinished jobs: shell = one shell line of `bats` commands per job (GNU "
             "parallel), slurm = a SLURM array script, one task per job, that requeues itself at its time "
             "limit.")] = None,
    summary: Annotated[bool, opt(
        "--summary", panel=OUTPUT,
        help="Only write results.json/.md/.png from the jobs finished so far (e.g. while --emit's jobs run elsewhere); "
             "run nothing.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Run an ablation study: every variant x seed is search -> derive -> train -> binarize -> eval.

    Finished jobs (OUT/VARIANT/seedN/eval.json) are skipped, so rerunning resumes a study. With
    --emit shell|slurm the jobs are printed for GNU parallel / a SLURM array; collect with --summary.

    Example: bats ablate random --dataset imagefolder --data-dir ../shared/datasets/cifar10-mini
    --seeds 2 --out runs/ablate-random

    Example: bats ablate temperature --emit shell | parallel -j 4

    Example: bats ablate random --emit slurm > random.sbatch && sbatch random.sbatch

    Example: bats ablate space --reuse runs/ablate-temperature (the BATS rows are not run twice)
    """
    from bats_cli.studies.jobs import StudyOptions, build_jobs, emit_lines
    from bats_cli.studies.results import write_summary
    from bats_cli.studies.runner import run_study

    o = StudyOptions(study=study, out=out or Path("runs") / f"ablate-{study}", preset=preset,
                     dataset=dataset, data_dir=path_or_none(data_dir), seeds=seeds or 1, jobs=jobs,
                     threads=threads, optimizer=optimizer, subset=subset, holdout=holdout, candidates=candidates,
                     variants=tuple(v.strip() for v in (variants or "").split(",") if v.strip()))
    if sum(map(bool, (emit, summary, evaluate_on, publish))) > 1:
        raise UserInputError("give at most one of --emit, --summary, --evaluate-on, --publish")
    if reuse and (emit or summary or evaluate_on or publish):
        raise UserInputError("--reuse copies finished jobs into the study; run without --emit / --summary / "
                             "--evaluate-on / --publish to use it")
    if (evaluate_on or publish or summary) and not o.out.is_dir():
        raise UserInputError(f"--out {o.out}: no study there yet")
    if evaluate_on or publish or summary:
        from bats_cli.studies.jobs import recorded_options

        # A study directory records its options: re-checking it needs only --out.
        o = replace(recorded_options(o.out, study, seeds=seeds, variants=o.variants) or o, jobs=jobs, threads=threads)
    if evaluate_on:
        from bats_cli.studies.publish import evaluate_on as reevaluate

        log = (lambda m: print(m, file=sys.stderr, flush=True))
        emit_result(reevaluate(o, evaluate_on, log=log), as_json=as_json, table_fn=result_table)
        return
    if publish:
        from bats_cli.studies.publish import publish as publish_study

        log = (lambda m: print(m, file=sys.stderr, flush=True))
        emit_result(publish_study(o, publish, log=log), as_json=as_json, table_fn=result_table)
        return
    if emit:
        from bats_cli.studies.jobs import EMIT_FORMATS, slurm_script

        if emit not in EMIT_FORMATS:
            raise UserInputError(f"--emit {emit!r}: choose one of {', '.join(EMIT_FORMATS)}")
        if emit == "slurm":
            sys.stdout.write(slurm_script(o, build_jobs(o)))
            return
        for line in emit_lines(build_jobs(o)):
            sys.stdout.write(line + "\n")
        return
    if summary:
        emit_result(write_summary(o, build_jobs(o)), as_json=as_json, table_fn=result_table)
        return
    if o.dataset == "imagefolder" and not o.data_dir:
        raise UserInputError("--dataset imagefolder needs --data-dir")
    log = (lambda m: print(m, file=sys.stderr, flush=True))
    summary = run_study(o, log=log, reuse=list(reuse or []))
    emit_result(summary, as_json=as_json, table_fn=result_table)
