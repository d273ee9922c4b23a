"""The run loop every long command shares (``search``, ``train``, ``binarize``).

A command describes *what differs* as a :class:`RunJob` (its step, its epoch end, its
checkpoint payload); :class:`RunLoop` owns *what is the same*:

* the position (epoch, step within it) and exact resume from ``last.safetensors``: the job's
  state, the RNG state and the loop's clock come back as they were saved;
* a checkpoint after every epoch and on interrupt (SIGINT/SIGTERM finish the current step, save
  ``last`` and raise :class:`~bats_cli.core.errors.Interrupted`, exit 130);
* ``metrics.csv``: one row per epoch, with ``seconds`` = the run's cumulative wall time (it
  survives ``--resume``: the clock is saved with every checkpoint);
* progress: one bar (or plain line) per epoch through :class:`~bats_cli.utils.progress.Reporter`;
* rank-0 duties under ``torchrun``: only rank 0 writes; every rank agrees before stopping.

Plus the set-up helpers around a run: the run directory (``check_out_dir``, ``open_run_dir``,
``default_run_dir``), the signal guard and CPU thread control.

Order within an epoch end: metrics row appended, *then* ``last`` saved, so a crash in between
repeats the epoch and :meth:`~bats_cli.storage.rundir.RunDir.resumed_at` drops the stale row.
"""

from __future__ import annotations

import contextlib
import functools
import json
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bats_cli.core.errors import RunFailure, UserInputError
from bats_cli.utils.distributed import Dist, agree, barrier, broadcast_buffers

# Checkpoint metadata key of the loop's own state (its clock).
LOOP_STATE_KEY = "bats_loop"


# --------------------------------------------------------------------------- set-up helpers


def restores_threads(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Decorator: torch's thread count is restored when ``fn`` returns (``--threads``)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        threads = torch.get_num_threads()
        try:
            return fn(*args, **kwargs)
        finally:
            torch.set_num_threads(threads)

    return wrapper


def set_threads(threads: int | None) -> None:
    """``torch.set_num_threads`` when asked (torchrun already sets OMP_NUM_THREADS=1 per rank)."""
    if threads is not None:
        torch.set_num_threads(threads)


def check_out_dir(out: Path, resume: bool) -> None:
    """Refuse an --out that RunDir would refuse (including one locked by a run), before any work."""
    from bats_cli.storage.rundir import check_run_dir_path

    check_run_dir_path(out, resume)


def open_run_dir(out: Path, resume: bool, dist_info: Dist = Dist(), device: torch.device | None = None):
    """RunDir on rank 0 (None elsewhere); every rank fails if rank 0 cannot open it."""
    from bats_cli.storage.rundir import RunDir

    run_dir, error = None, None
    if dist_info.is_main:
        try:
            run_dir = RunDir(out, resume=resume)
        except UserInputError as exc:
            error = exc
    if not agree(error is None, dist_info, device or torch.device("cpu")):
        raise error or RunFailure("rank 0 could not open the run directory")
    return run_dir


def default_run_dir(prefix: str, name: str) -> Path:
    """``runs/<prefix>-<name>-<timestamp>``: where a run goes without ``--out``."""
    from bats_cli.core.names import safe_name

    stamp = time.strftime("%Y%m%d-%H%M%S")
    # The name comes from a file (a genotype's name): never a separator or "..".
    return Path("runs") / f"{safe_name(prefix)}-{safe_name(name)}-{stamp}"


@contextlib.contextmanager
def interrupt_guard(interrupt=None, *, handle_signals: bool = True) -> Iterator[Any]:
    """The interrupt a run polls: ``interrupt`` as given, else SIGINT/SIGTERM handlers installed
    for the block (``handle_signals``), else a flag nothing sets but the loop's own
    ``stop_after_steps`` (tests).

    Entered before set-up, so that a signal during set-up stops the run too (after one step).
    """
    from bats_cli.utils.signals import GracefulInterrupt

    if interrupt is not None:
        yield interrupt
    elif handle_signals:
        with GracefulInterrupt() as guard:
            yield guard
    else:
        yield GracefulInterrupt()  # not entered: no handlers, a flag only


def interrupt_guarded(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Decorator for a command's entry point: the :func:`interrupt_guard` is entered before
    ``fn`` starts its set-up, so that a signal during set-up stops the run too (after one step).

    The wrapper takes ``handle_signals`` (default True); ``fn`` receives the interrupt as ``stop``
    and the command's start as ``started`` (the run's time includes its start-up).
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, handle_signals: bool = True, **kwargs: Any) -> Any:
        started = time.perf_counter()
        with interrupt_guard(handle_signals=handle_signals) as stop:
            return fn(*args, stop=stop, started=started, **kwargs)

    return wrapper


# --------------------------------------------------------------------------- the job interface


def check_position(path, *, epoch: int, step: int, epochs: int, steps_per_epoch: int,
                   what: str = "") -> None:
    """UserInputError unless (``epoch`` completed, ``step`` taken in the next) lies inside a run
    of ``epochs`` x ``steps_per_epoch`` steps: a counter past the end is a tampered or foreign
    checkpoint, never a finished run that skips its training."""
    where = f"cannot resume: {path}{' ' + what if what else ''}"
    if not 0 <= epoch <= epochs:
        raise UserInputError(f"{where} is at epoch {epoch}, but the run has {epochs} epochs")
    if not 0 <= step <= steps_per_epoch:
        raise UserInputError(f"{where} is at step {step} of an epoch of {steps_per_epoch} steps "
                             "(different data or batch size?)")
    if epoch == epochs and step:
        raise UserInputError(f"{where} is at step {step} after its last epoch ({epochs})")


@dataclass
class Checkpoint:
    """What a job puts into a checkpoint besides the loop's RNG and clock."""

    tensors: dict[str, torch.Tensor]
    config: Mapping[str, Any]
    epoch: int
    step: int = 0
    genotype_json: str | None = None
    extra: dict[str, str] = field(default_factory=dict)


class RunJob:
    """What one long command does per step and per epoch; :class:`RunLoop` does the rest.

    ``epoch`` / ``step`` are the job's position (completed epochs of the current segment, steps
    taken in the current epoch); the loop advances them. A *segment* is a run of epochs with one
    model (a search stage); most jobs have one.
    """

    kind: str = ""  # checkpoint kind
    model: nn.Module
    steps_per_epoch: int = 0
    epoch: int = 0
    step: int = 0
    # Set by the loop: the run's cumulative wall time in seconds.
    clock: Callable[[], float] = staticmethod(lambda: 0.0)

    # -- position
    def segment_done(self) -> bool:
        raise NotImplementedError

    def next_segment(self) -> bool:
        """Close the finished segment; True if another one was started (the loop then saves)."""
        return False

    def metrics_epoch(self) -> int:
        """Completed epochs as ``metrics.csv`` counts them (rows beyond it are stale on resume)."""
        return self.epoch

    def run_steps(self) -> tuple[int, int, int] | None:
        """(steps of the whole run, steps of completed epochs, images per step) for the run-level
        progress and ETA; None if unknown."""
        return None

    # -- an epoch
    def begin_epoch(self) -> tuple[str, Iterable[Any]]:
        """(progress description, the batches still to run in this epoch)."""
        raise NotImplementedError

    def running_metrics(self) -> dict[str, float]:
        """Progress metrics of a resumed epoch's steps already taken."""
        return {}

    def train_step(self, batch: Any) -> dict[str, float]:
        """One optimizer step; returns the progress metrics to show."""
        raise NotImplementedError

    def end_epoch(self, bar) -> dict[str, Any]:
        """The epoch's metrics row (``seconds`` is filled in by the loop); ``epoch`` is already
        advanced. Runs inside the epoch's progress bar."""
        raise NotImplementedError

    def after_epoch(self, row: Mapping[str, Any]) -> tuple[str, ...]:
        """After the row is written: names of extra weight-only checkpoints to save (``best``)."""
        return ()

    # -- checkpoints
    def checkpoint(self, *, with_state: bool) -> Checkpoint:
        raise NotImplementedError

    def restore(self, tensors: Mapping[str, torch.Tensor], meta) -> None:
        raise NotImplementedError


# --------------------------------------------------------------------------- the loop


class RunLoop:
    """Runs a :class:`RunJob` to the end of its last segment, checkpointing as it goes."""

    def __init__(
        self,
        job: RunJob,
        *,
        run_dir=None,
        reporter=None,
        interrupt=None,
        dist_info: Dist = Dist(),
        device: torch.device | None = None,
        stop_after_steps: int | None = None,
        started: float | None = None,
    ) -> None:
        """``started``: ``time.perf_counter()`` when the command started, so that the run's
        time includes its start-up (data, network, plan); default: now."""
        from bats_cli.utils.progress import Reporter
        from bats_cli.utils.signals import GracefulInterrupt

        self.job = job
        self.run_dir = run_dir
        self.reporter = reporter or Reporter(quiet=True)
        self.interrupt = interrupt if interrupt is not None else GracefulInterrupt()
        self.dist = dist_info
        self.device = device or torch.device("cpu")
        self.stop_after_steps = stop_after_steps
        self.steps_this_call = 0
        self._seconds_before = 0.0
        self._started = started if started is not None else time.perf_counter()
        job.clock = self.elapsed

    # -- clock
    def elapsed(self) -> float:
        """Wall time of the whole run so far, across resumes."""
        return self._seconds_before + time.perf_counter() - self._started

    # -- checkpoints
    @property
    def writes(self) -> bool:
        return self.dist.is_main and self.run_dir is not None

    def save(self, path: Path, *, with_state: bool = True) -> Path:
        from bats_cli.storage.checkpoint import save_checkpoint
        from bats_cli.utils.runtime import rng_state_tensors

        ck = self.job.checkpoint(with_state=with_state)
        tensors = dict(ck.tensors)
        extra = dict(ck.extra)
        if with_state:
            tensors.update(rng_state_tensors())
            extra[LOOP_STATE_KEY] = json.dumps({"seconds": self.elapsed()})
        return save_checkpoint(path, tensors, kind=self.job.kind, config=ck.config, epoch=ck.epoch,
                               step=ck.step, genotype_json=ck.genotype_json, extra=extra)

    def save_last(self) -> Path | None:
        """``last.safetensors`` (rank 0); every rank takes part (BatchNorm buffers from rank 0)."""
        broadcast_buffers(self.job.model, self.dist)
        if self.writes:
            return self.save(self.run_dir.last, with_state=True)
        return None

    def resume(self, checkpoint: tuple[Mapping[str, torch.Tensor], Any]):
        """Continue from ``checkpoint``, the ``(tensors, meta)`` the command read once
        (:func:`~bats_cli.storage.checkpoint.load_checkpoint`): the job's state, then the RNG and the clock."""
        from bats_cli.storage.checkpoint import check_kind
        from bats_cli.utils.runtime import restore_rng_state

        tensors, meta = checkpoint
        path = meta.path
        check_kind(meta, self.job.kind, self.job.kind)
        self.job.restore(tensors, meta)
        restore_rng_state(tensors)
        try:
            self._seconds_before = float(json.loads(meta.extra.get(LOOP_STATE_KEY, "{}")).get("seconds", 0.0))
        except (ValueError, TypeError, AttributeError, OverflowError):
            raise UserInputError(f"{path}: unreadable {LOOP_STATE_KEY} metadata") from None
        if not 0 <= self._seconds_before < 1e10:  # NaN included
            raise UserInputError(f"{path}: {LOOP_STATE_KEY} metadata: {self._seconds_before} is no run time")
        if self.run_dir is not None:
            done = self.job.metrics_epoch()
            rows = self.run_dir.metrics.epochs()
            if rows < done:
                # The file may claim more progress than the run made: its training would be skipped.
                raise UserInputError(
                    f"cannot resume: {path} claims {done} finished epoch(s), but "
                    f"{self.run_dir.metrics.path} records {rows} (a tampered checkpoint or metrics.csv)"
                )
            # A crash between writing a metrics row and saving last.safetensors leaves a row
            # the resumed run will write again.
            self.run_dir.resumed_at(done)
        return meta

    # -- interrupts
    def _save_for_interrupt(self) -> Path | None:
        saved = self.save_last()
        if self.dist.enabled:
            barrier(self.dist)
        return saved

    def check_interrupt(self, *, saved: bool = False) -> None:
        """Stop here if a signal arrived (on any rank): save ``last`` unless ``saved`` already."""
        stop = self.interrupt
        if self.dist.enabled:
            if agree(not stop.requested, self.dist, self.device):
                return
            if not stop.requested:
                stop.requested, stop.signal_name = True, "SIGTERM (another rank)"
        if saved:
            last = self.run_dir.last if self.writes else None
            stop.raise_if_requested(save_fn=lambda: last)
        else:
            stop.raise_if_requested(save_fn=self._save_for_interrupt)

    # -- the loop
    def run_epoch(self) -> dict[str, Any]:
        job = self.job
        desc, batches = job.begin_epoch()
        with self.reporter.epoch(desc, job.steps_per_epoch) as bar:
            if job.step:  # resumed mid-epoch: the bar and its metrics continue from the checkpoint
                bar.update(job.step, **job.running_metrics())
            for batch in batches:
                metrics = job.train_step(batch)
                job.step += 1
                self.steps_this_call += 1
                bar.update(1, **metrics)
                if self.stop_after_steps is not None and self.steps_this_call >= self.stop_after_steps:
                    stop = self.interrupt
                    stop.requested, stop.signal_name = True, getattr(stop, "signal_name", None) or "SIGINT"
                self.check_interrupt()
            job.epoch, job.step = job.epoch + 1, 0
            row = job.end_epoch(bar)
        row["seconds"] = round(self.elapsed(), 1)
        if self.writes:
            self.run_dir.append_metrics(row)
        for name in job.after_epoch(row):
            if self.writes:
                self.save(self.run_dir.path / f"{name}.safetensors", with_state=False)
        self.save_last()
        self.check_interrupt(saved=True)
        return row

    def run(self) -> None:
        """Every remaining epoch of every remaining segment."""
        steps = self.job.run_steps()
        if steps is not None:
            total, done, images = steps
            # Elapsed time counts from the run's start, across resumes.
            self.reporter.start_run(total, done=done, images_per_step=images,
                                    started=time.perf_counter() - self.elapsed())
        while True:
            while not self.job.segment_done():
                self.run_epoch()
            if not self.job.next_segment():
                return
            self.save_last()
            self.check_interrupt(saved=True)


__all__ = [
    "Checkpoint",
    "LOOP_STATE_KEY",
    "RunJob",
    "RunLoop",
    "check_out_dir",
    "check_position",
    "default_run_dir",
    "interrupt_guard",
    "interrupt_guarded",
    "open_run_dir",
    "restores_threads",
    "set_threads",
]


def preflight_everywhere(preflight, plan_args: dict[str, Any], dist_info: Dist,
                          device: torch.device) -> None:
    """Rank 0 plans (and prints, refuses or stops for --dry-run); the other ranks follow it
    instead of waiting in a collective for a rank that has left."""
    from bats_cli.training.plan import DryRun
    from bats_cli.utils.distributed import all_sum

    failure: BaseException | None = None
    if dist_info.is_main:
        try:
            preflight(**plan_args)
        except (DryRun, UserInputError, RunFailure) as exc:
            failure = exc
    # 0: go on; 1: --dry-run; 2: refused. Only rank 0 adds its code.
    code = 0.0 if failure is None else 1.0 if isinstance(failure, DryRun) else 2.0
    code = all_sum([code], dist_info, device)[0] if dist_info.enabled else code
    if failure is not None:
        raise failure
    if code == 1.0:
        raise DryRun(None)  # type: ignore[arg-type]  # rank 0 prints the plan
    if code:
        raise RunFailure("rank 0 refused to start (its message above)")
