"""The set-up ``search``, ``train`` and ``binarize`` share before their run loop starts.

One path through it, in order:

1. :func:`begin` -> :class:`LongRun`: the device (and the process group under ``torchrun``), the
   run directory (:func:`run_out_dir`: ``--resume`` needs ``--out``, the default, refused before
   any work) and the checkpoint to continue, read once (:func:`read_resume`: tensors and
   validated metadata, handed to :meth:`~bats_cli.training.runloop.RunLoop.resume`);
2. the resumed run's config (:func:`resume_config`: the saved one, then preset and flags, which
   must agree with it), then :meth:`LongRun.settle`: precision checked, threads and seed, from the
   final config;
3. the data (:func:`load_data`: under ``torchrun`` rank 0 downloads while the others wait) and the
   stage's own checks;
4. :meth:`LongRun.open`: the memory plan on every rank, then the run directory (rank 0) and the
   reporter. Everything that can be refused is refused before this step creates anything.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch

from bats_cli.core.config import RESUME_IGNORED_KEYS, resolve_resume_config
from bats_cli.core.errors import UserInputError
from bats_cli.storage.checkpoint import CheckpointMeta, load_checkpoint
from bats_cli.training.runloop import check_out_dir, open_run_dir, preflight_everywhere, set_threads
from bats_cli.utils.distributed import Dist, barrier, init_run_device

T = TypeVar("T")
Opened = tuple[dict[str, torch.Tensor], CheckpointMeta]


def run_out_dir(out: str | Path | None, resume: bool, default: Callable[[], Path], *, hint: str = "") -> Path:
    """``out`` (else ``default()``), refused now if the run could not use it; ``hint`` ends the error."""
    if resume and out is None:
        raise UserInputError("--resume needs --out: the run directory to continue")
    path = Path(out) if out is not None else default()
    try:
        check_out_dir(path, resume)
    except UserInputError as exc:
        raise UserInputError(f"{exc}{hint}") from None
    return path


def read_resume(out: Path, resume: bool, kind: str) -> Opened | None:
    """``<out>/last.safetensors`` read once (tensors, metadata of ``kind``) when ``--resume`` finds
    it; None for a fresh start."""
    last = out / "last.safetensors"
    if not (resume and last.exists()):
        return None
    tensors, meta = load_checkpoint(last, expect_kind=kind, command=f"{kind} --resume")
    return tensors, meta


def resume_config(model_cls: type[T], saved: Any, *, preset: str | None, presets: Mapping[str, Mapping[str, Any]],
                  overrides: Mapping[str, Any], defaults: Mapping[str, Any] | None = None) -> T:
    """A resumed run's config: ``saved`` (``defaults`` for keys older files lack), then ``preset`` and
    ``overrides`` (the flags given), which must agree with it except where and how it runs."""
    if isinstance(saved, dict) and defaults:
        saved = {**defaults, **saved}
    return resolve_resume_config(model_cls, saved, preset=preset, presets=presets, overrides=overrides,
                                 ignore=RESUME_IGNORED_KEYS)


def load_data(build: Callable[[bool | None], T], download: bool | None, dist_info: Dist) -> T:
    """``build(download)``; under torchrun with ``download`` allowed, rank 0 builds (and downloads)
    first while the other ranks wait, then they build from its files."""
    wait = download is not False and dist_info.enabled
    if wait and not dist_info.is_main:
        barrier(dist_info)
    data = build(download if dist_info.is_main else False)
    if wait and dist_info.is_main:
        barrier(dist_info)
    return data


@dataclass
class LongRun:
    """Where a long run runs, where it writes and what it continues (step 1 of the module's list)."""

    kind: str  # the checkpoint kind it writes: search, train or binarize
    out: Path
    resume: bool  # --resume / --resume-or-start was given (``opened`` says whether there was a checkpoint)
    dist_info: Dist
    device: torch.device
    opened: Opened | None  # <out>/last.safetensors, read once, when resuming

    @property
    def resuming(self) -> bool:
        return self.opened is not None

    @property
    def meta(self) -> CheckpointMeta | None:
        """The continued checkpoint's metadata (None on a fresh start)."""
        return self.opened[1] if self.opened is not None else None

    def settle(self, *, precision: str, threads: int | None, seed: int | None = None) -> None:
        """Precision (checked against the device), threads and seed from the run's final config: a
        resumed run's saved one, not the flags' defaults."""
        from bats_cli.utils.runtime import check_precision

        check_precision(self.device, precision)
        set_threads(threads)
        if seed is not None:
            from bats_cli.utils.runtime import seed_everything

            seed_everything(seed)

    def open(self, preflight=None, plan: Mapping[str, Any] | None = None, *, quiet: bool = False, reporter=None):
        """The memory plan (``preflight(**plan)``, followed by every rank), then the run directory
        (a RunDir on rank 0, None elsewhere) and the reporter (``reporter`` if given; quiet off rank 0)."""
        from bats_cli.utils.progress import Reporter

        if preflight is not None:
            preflight_everywhere(preflight, dict(plan or {}), self.dist_info, self.device)
        run_dir = open_run_dir(self.out, self.resume, self.dist_info, self.device)
        if reporter is None or not self.dist_info.is_main:
            reporter = Reporter(quiet=quiet or not self.dist_info.is_main)
        return run_dir, reporter


def begin(kind: str, *, out: str | Path | None, resume: bool, default: Callable[[], Path], device: str,
          precision: str, hint: str = "") -> LongRun:
    """Step 1 of every long run: its device, its checked run directory, its checkpoint to continue."""
    dist_info, dev = init_run_device(device, precision)
    path = run_out_dir(out, resume, default, hint=hint)
    return LongRun(kind=kind, out=path, resume=resume, dist_info=dist_info, device=dev,
                   opened=read_resume(path, resume, kind))


__all__ = ["LongRun", "begin", "load_data", "read_resume", "resume_config", "run_out_dir"]
