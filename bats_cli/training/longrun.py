"""The set-up steps ``search``, ``train`` and ``binarize`` share before their run loop starts.

In order: the run directory (:func:`run_out_dir`: ``--resume`` needs ``--out``, the default,
refused before any work), the checkpoint to continue, read once (:func:`read_resume`: tensors
and validated metadata, handed to :meth:`~bats_cli.training.runloop.RunLoop.resume`), the resumed run's
config (:func:`resume_config`: the saved one, then preset and flags, which must agree with it)
and the data (:func:`load_data`: under ``torchrun`` rank 0 downloads while the others wait).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import torch

from bats_cli.core.config import RESUME_IGNORED_KEYS, resolve_resume_config
from bats_cli.core.errors import UserInputError
from bats_cli.storage.checkpoint import CheckpointMeta, load_checkpoint
from bats_cli.training.runloop import check_out_dir
from bats_cli.utils.distributed import Dist, barrier

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


__all__ = ["load_data", "read_resume", "resume_config", "run_out_dir"]
