"""Re-checking a finished study: ``--publish DEST`` copies every finished job's light files (genotype,
packed network, results, per-image predictions, the search's α history) as a study directory that
``--summary`` and ``--evaluate-on`` work on; ``--evaluate-on DIR`` re-scores every packed network on
other test images (``eval-<slug>.json``, ``results-<slug>.json/.md``) without training anything."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from bats_cli.core.errors import Interrupted, RunFailure, UserInputError
from bats_cli.core.fileio import atomic_write_json
from bats_cli.core.names import safe_name
from bats_cli.studies.jobs import STUDY_NAME, Job, Step, StudyOptions, build_jobs, study_record, thread_flags
from bats_cli.studies.results import write_summary
from bats_cli.studies.runner import Runner, record_executed, subprocess_runner

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
    given as DIR with val/ or test/ (train/ optional: only its class folder names are read) or as a
    folder of class folders; links in a temporary directory stand in for what is missing."""
    if not data_dir.is_dir():
        raise UserInputError(f"--evaluate-on {data_dir}: no such directory")
    if (data_dir / "train").is_dir() and (data_dir / "val").is_dir():
        return data_dir
    # The test split: val/ (this project's layout), else test/ (a common one), else DIR itself.
    split = next((data_dir / n for n in ("val", "test") if (data_dir / n).is_dir()), data_dir)
    if not any(p.is_dir() for p in split.iterdir()):
        raise UserInputError(f"--evaluate-on {data_dir}: expected DIR/val/<class>/*.jpg, DIR/test/<class>/*.jpg "
                             "or DIR/<class>/*.jpg")
    tmp = Path(tempfile.mkdtemp(prefix="bats-evaluate-on-"))
    for name in ("train", "val"):
        (tmp / name).symlink_to(split.resolve(), target_is_directory=True)
    return tmp


def data_slug(data_dir: str | Path) -> str:
    """``eval-<slug>.json``: the data directory's name as one harmless file-name component."""
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
                                     *thread_flags(o), "--output", str(job.dir / eval_name), "--force"),
                    job.dir / eval_name)
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
