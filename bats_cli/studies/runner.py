"""`bats ablate STUDY`: running a study's jobs (`study_jobs`), ``--jobs`` at a time, each once the
files it reads from another row exist. It only runs ``bats`` commands as subprocesses and summarises
their result files (`study_summary`); it never trains anything itself.

* A finished step (its result file exists) is skipped and long steps run with ``--resume-or-start``,
  so rerunning an interrupted study continues where it stopped.
* ``--reuse DIR``: a finished job of another study with the same commands and seed is copied
  instead of run again.
* Every step's argv and exit code as it ran go to the job's ``executed.json``, its time to ``steps.json``.
"""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from bats_cli.core.errors import Interrupted, RunFailure, UserInputError
from bats_cli.core.fileio import atomic_write_json, atomic_write_text
from bats_cli.studies.jobs import (
    EVAL_NAME,
    EXECUTED_NAME,
    JOB_NAME,
    REUSED_NAME,
    STEPS_NAME,
    STUDY_NAME,
    Job,
    Step,
    StudyOptions,
    build_jobs,
    read_json,
    study_record,
)
from bats_cli.studies.results import step_error, write_summary

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


def step_progress(job: Job, step: Step) -> str:
    """Where a running step is, from its run directory's metrics.csv: 'search stage 2/3, epoch 14'."""
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
    runs = read_json(path) or {}
    runs.setdefault(step.name, []).append({"argv": ["bats", *step.argv], "exit": code,
                                           "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    atomic_write_json(path, runs)


def finished_jobs(study_dir: Path) -> dict[tuple[str, int], Path]:
    """The finished jobs of a study directory, by (their commands, seed)."""
    found: dict[tuple[str, int], Path] = {}
    for record in sorted(study_dir.glob(f"*/seed*/{JOB_NAME}")):
        info = read_json(record)
        if info is None or not (record.parent / EVAL_NAME).is_file():
            continue
        found.setdefault((json.dumps(info.get("key")), int(info.get("seed", -1))), record.parent)
    return found


def reuse_jobs(jobs: Sequence[Job], sources: Sequence[Path], log: Callable[[str], None] = print) -> list[Job]:
    """Copy into each unstarted job the finished job of another study with the same commands and seed
    (e.g. `space`'s BATS row is `temperature`'s T = 0.2 row); returns the jobs that were filled."""
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
    from bats_cli.data import describe_spec  # torch: only when jobs are left to run
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
    atomic_write_json(o.out / STUDY_NAME, study_record(o, read_json(o.out / STUDY_NAME)))
    for job in jobs:
        job.dir.parent.mkdir(parents=True, exist_ok=True)
    if reuse_jobs(jobs, reuse, log):
        # A copied job can change how another row runs (its search came without a checkpoint).
        jobs = build_jobs(o)
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
