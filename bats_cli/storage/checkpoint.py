"""safetensors checkpoints with string metadata; atomic writes, header-only reads, validation.

Metadata keys (all strings): ``bats_format`` (int), ``bats_kind``, ``bats_config`` (JSON),
``bats_genotype`` (JSON, optional), ``bats_epoch``, ``bats_step``, ``bats_versions`` (JSON), plus
the caller's ``extra`` keys. No pickle (optimizer, scheduler and scaler state: :mod:`bats_cli.storage.optim_state`).

Epoch convention: ``epoch`` = number of *completed* epochs; ``step`` = optimizer steps already
taken inside the next epoch (0 at an epoch boundary).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from bats_cli.core.errors import UserInputError
from bats_cli.core.fileio import atomic_target, to_jsonable
from bats_cli.storage.rundir import LAST_NAME
from bats_cli.utils.provenance import software_versions

FORMAT_VERSION = 1
KINDS = ("search", "train", "binarize", "packed")
# Metadata keys this module owns; ``extra`` may not reuse them.
RESERVED_KEYS = frozenset(
    {
        "bats_format",
        "bats_kind",
        "bats_config",
        "bats_genotype",
        "bats_epoch",
        "bats_step",
        "bats_versions",
    }
)

__all__ = [
    "FORMAT_VERSION",
    "KINDS",
    "CheckpointMeta",
    "load_checkpoint",
    "load_tensors",
    "read_metadata",
    "save_checkpoint",
]


@dataclass(frozen=True)
class CheckpointMeta:
    """What :func:`read_metadata` finds in a checkpoint's header."""

    path: Path
    kind: str
    config: dict[str, Any]
    genotype_json: str | None
    epoch: int
    step: int
    versions: dict[str, str]
    format: int
    extra: dict[str, str] = field(default_factory=dict)


# --------------------------------------------------------------------------- save


def _storage_key(t: torch.Tensor) -> tuple[str, int] | None:
    if t.numel() == 0 or t.device.type == "meta":
        return None
    return (str(t.device), t.untyped_storage().data_ptr())


def _prepare_tensors(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached, contiguous tensors with no shared storage (safetensors rejects aliasing)."""
    seen: set[tuple[str, int]] = set()
    out: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        if not isinstance(name, str) or not isinstance(t, torch.Tensor):
            raise TypeError(f"checkpoint entries must be str -> Tensor, got {name!r}")
        t = t.detach()
        key = _storage_key(t)
        # Tied weights / views share a storage: give every entry its own compact copy.
        shares = key is not None and (
            key in seen or t.untyped_storage().nbytes() != t.numel() * t.element_size()
        )
        if shares or not t.is_contiguous():
            t = t.contiguous().clone() if shares else t.contiguous()
        if key is not None:
            seen.add(key)
        out[name] = t
    return out


def save_checkpoint(
    path: str | os.PathLike[str],
    tensors: Mapping[str, torch.Tensor],
    *,
    kind: str,
    config: Mapping[str, Any],
    epoch: int,
    step: int = 0,
    genotype_json: str | None = None,
    extra: Mapping[str, str] | None = None,
) -> Path:
    """Write a checkpoint atomically (temp file + fsync + ``os.replace``); returns ``path``."""
    from safetensors.torch import save_file

    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, not {kind!r}")
    extra = dict(extra or {})
    clash = RESERVED_KEYS & set(extra)
    if clash:
        raise ValueError(f"extra metadata may not use reserved keys {sorted(clash)}")
    if not all(isinstance(v, str) for v in extra.values()):
        raise TypeError("extra metadata values must be strings")
    metadata = {
        "bats_format": str(FORMAT_VERSION),
        "bats_kind": kind,
        "bats_config": json.dumps(to_jsonable(config), sort_keys=True),
        "bats_epoch": str(int(epoch)),
        "bats_step": str(int(step)),
        "bats_versions": json.dumps(software_versions(), sort_keys=True),
        **extra,
    }
    if genotype_json is not None:
        metadata["bats_genotype"] = genotype_json
    prepared = _prepare_tensors(tensors)
    path = Path(path)
    with atomic_target(path) as tmp:
        save_file(prepared, str(tmp), metadata=metadata)
    return path


# --------------------------------------------------------------------------- read / load


def _open_error(path: Path, exc: BaseException) -> UserInputError:
    reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return UserInputError(f"{path}: not a valid safetensors checkpoint (truncated or corrupt: {reason})")


def _check_file(path: Path) -> None:
    import stat

    if not path.exists():
        raise UserInputError(f"{path}: no such checkpoint file")
    if path.is_dir():
        if (path / LAST_NAME).is_file():
            raise UserInputError(
                f"{path} is a run directory; give one of its checkpoints, e.g. {path / LAST_NAME}"
            )
        raise UserInputError(
            f"{path} is a directory without {LAST_NAME} (not a bats run); give a .safetensors checkpoint file"
        )
    try:
        mode = path.stat().st_mode
    except OSError as exc:
        raise UserInputError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if not stat.S_ISREG(mode):
        # A FIFO would block the read forever; a device has no end.
        raise UserInputError(f"{path}: not a regular file (a FIFO, device or socket); give a checkpoint file")
    if not os.access(path, os.R_OK):
        raise UserInputError(f"{path}: cannot read (permission denied)")


def read_metadata(path: str | os.PathLike[str]) -> CheckpointMeta:
    """Read and validate a checkpoint's header without loading any tensor."""
    from safetensors import safe_open

    from bats_cli.core.sniff import sniff, wrong_file

    path = Path(path)
    _check_file(path)
    found = sniff(path)
    if found.kind in ("genotype", "json", "onnx"):
        raise UserInputError(wrong_file(path, found, "a bats checkpoint (.safetensors)"))
    try:
        with safe_open(str(path), framework="pt") as fh:
            raw = fh.metadata() or {}
    except Exception as exc:  # safetensors raises its own error types for every malformation
        raise _open_error(path, exc) from None
    return _parse_metadata(path, raw)


def _parse_metadata(path: Path, raw: Mapping[str, str]) -> CheckpointMeta:
    """Every value validated (bats_cli.storage.metadata) before anything acts on it."""
    from bats_cli.core.names import safe_text
    from bats_cli.storage.metadata import load_json, parse_extra, parse_header

    if "bats_format" not in raw or "bats_kind" not in raw:
        raise UserInputError(f"{path}: a safetensors file, but not a bats checkpoint")
    try:
        fmt = int(raw["bats_format"])
    except (TypeError, ValueError):
        raise UserInputError(f"{path}: corrupt bats metadata (bats_format is not a number)") from None
    if fmt > FORMAT_VERSION:
        try:
            versions = load_json(raw.get("bats_versions", "{}"), where=str(path))
        except UserInputError:
            versions = {}
        written_by = versions.get("bats", "?") if isinstance(versions, dict) else "?"
        raise UserInputError(
            f"{path}: written by a newer bats ({safe_text(written_by, max_chars=40)}, checkpoint "
            f"format {fmt}); this bats reads format {FORMAT_VERSION} or older; upgrade bats"
        )
    header = parse_header(path, raw)
    if header.kind not in KINDS:
        raise UserInputError(f"{path}: unknown checkpoint kind {safe_text(repr(header.kind), max_chars=40)}")
    extra = {k: v for k, v in raw.items() if k not in RESERVED_KEYS}
    parse_extra(path, extra, config=header.config)
    genotype_json = raw.get("bats_genotype")
    if genotype_json is not None and len(genotype_json) > (1 << 20):
        raise UserInputError(f"{path}: the recorded genotype is far too large")
    return CheckpointMeta(
        path=path,
        kind=header.kind,
        config=header.config,
        genotype_json=genotype_json,
        epoch=header.epoch,
        step=header.step,
        versions=header.versions,
        format=header.format,
        extra=extra,
    )


def _join_or(words: Iterable[str]) -> str:
    words = list(words)
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " or " + words[-1]


def check_kind(meta: CheckpointMeta, expect_kind: str | Iterable[str], command: str | None) -> None:
    """UserInputError naming both kinds when ``meta.kind`` is not expected."""
    expected = [expect_kind] if isinstance(expect_kind, str) else list(expect_kind)
    if meta.kind in expected:
        return
    # Keep KINDS order so messages are stable regardless of set ordering.
    ordered = [k for k in KINDS if k in expected] + [k for k in expected if k not in KINDS]
    from bats_cli.core.sniff import taken_by

    who = f"`bats {command}` expects" if command else "expected"
    where = taken_by(meta.kind, meta.path)
    raise UserInputError(
        f"{meta.path} is a {meta.kind} checkpoint; {who} a {_join_or(ordered)} checkpoint"
        + (f"; a {meta.kind} checkpoint goes to {where}" if where else "")
    )


def load_checkpoint(
    path: str | os.PathLike[str],
    *,
    expect_kind: str | Iterable[str] | None = None,
    device: str | torch.device = "cpu",
    command: str | None = None,
) -> tuple[dict[str, torch.Tensor], CheckpointMeta]:
    """Load all tensors onto ``device`` plus the metadata; ``command`` names it in errors."""
    meta = read_metadata(path)
    if expect_kind is not None:
        check_kind(meta, expect_kind, command)
    return load_tensors(meta, device=device), meta


def load_tensors(meta: CheckpointMeta, *, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint whose metadata was read (and checked) already: its header is not
    parsed again."""
    from safetensors.torch import load_file

    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        # Otherwise safetensors' error would read like a corrupt file.
        raise UserInputError(f"cannot load {meta.path} onto {device}: CUDA is not available")
    try:
        tensors = load_file(str(meta.path), device=str(device))
    except Exception as exc:
        raise _open_error(meta.path, exc) from None
    from bats_cli.storage.metadata import check_tensors

    check_tensors(meta.path, tensors)
    return tensors
