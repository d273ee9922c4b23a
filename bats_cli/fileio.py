"""Atomic file writes (temp file in the same directory + fsync + ``os.replace``) and JSON-ready values:
nothing a command writes is ever half-written."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

# --------------------------------------------------------------------------- atomic writes

# Read once at import: os.umask can only be read by setting it, which races with threads later.
_UMASK = os.umask(0o022)
os.umask(_UMASK)


def _fsync_dir(directory: Path) -> None:
    # Makes the rename itself durable; some file systems refuse O_RDONLY dir fsync, which is fine.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_target(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temp path next to ``path``; on success fsync it and ``os.replace`` it over ``path``.

    On any exception the temp file is removed and ``path`` keeps its previous content.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # Same directory so os.replace is a rename, never a cross-device copy; *.tmp is git-ignored.
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
    except OSError as exc:
        raise _write_failure(path, exc) from None
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        # mkstemp creates 0600; result files should get the usual umask-derived mode.
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(exc, OSError) or _is_io_error(exc):
            raise _write_failure(path, exc) from None
        raise
    _fsync_dir(path.parent)


def _is_io_error(exc: BaseException) -> bool:
    # safetensors reports a failed write (a full disk) as its own error type, "I/O error: ...".
    return type(exc).__name__ == "SafetensorError" and "I/O error" in str(exc)


def _write_failure(path: Path, exc: BaseException) -> Exception:
    """A failed write as one line (exit 1): a full disk, a read-only or vanished folder."""
    from bats_cli.errors import RunFailure

    if isinstance(exc, OSError):
        reason = exc.strerror or str(exc)
    else:
        reason = str(exc).split("I/O error:", 1)[-1].strip() or type(exc).__name__
        reason = reason.split(" (os error")[0]
    return RunFailure(f"cannot write {path} ({reason}); the previous file, if any, is unchanged")




def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (temp file + fsync + ``os.replace``)."""
    with atomic_target(path) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
    return Path(path)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write UTF-8 ``text`` to ``path`` atomically."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> Path:
    """Write ``obj`` as indented JSON (strict: NaN/inf become null) atomically."""
    return atomic_write_text(path, json.dumps(to_jsonable(obj), indent=2, allow_nan=False) + "\n")


def to_jsonable(obj: Any) -> Any:
    """Convert paths, tensors, numpy scalars, tuples and non-finite floats into strict JSON values."""
    if isinstance(obj, float):
        return obj if np.isfinite(obj) else None
    if obj is None or isinstance(obj, (str, bool, int)):
        return obj
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if isinstance(obj, torch.Tensor):
        return to_jsonable(obj.detach().cpu().tolist())
    if isinstance(obj, np.generic):
        return to_jsonable(obj.item())
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if hasattr(obj, "model_dump"):
        return to_jsonable(obj.model_dump(mode="json"))
    return str(obj)
