"""Atomic file writes (temp file in the same directory + fsync + ``os.replace``), bounded reads and
the one bounded JSON parser, and JSON-ready values: nothing a command writes is ever half-written,
nothing it reads can be a FIFO, a multi-GB file or a NaN."""

from __future__ import annotations

import contextlib
import json
import math
import os
import stat
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from bats_cli.core.errors import UserInputError
from bats_cli.core.names import safe_text

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
    from bats_cli.core.errors import RunFailure

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
    """Convert paths, tensors, numpy values, tuples and non-finite floats into strict JSON values."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if obj is None or isinstance(obj, (str, bool, int)):
        return obj
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if hasattr(obj, "model_dump"):
        return to_jsonable(obj.model_dump(mode="json"))
    if hasattr(obj, "tolist"):  # torch tensors, numpy arrays and scalars: duck-typed, no torch import
        return to_jsonable(obj.tolist())
    return str(obj)


# --------------------------------------------------------------------------- bounded reads

# Deeper JSON is refused before parsing: nothing bats writes nests past a handful of levels.
MAX_JSON_DEPTH = 32


def read_bounded(path: str | os.PathLike[str], limit: int, *, what: str) -> bytes:
    """At most ``limit`` bytes of a regular file; larger files, FIFOs and devices are refused.

    Bounded by the bytes actually read, not by ``stat().st_size`` (which devices and /proc
    report as 0); non-regular files are refused before they are opened (a FIFO would block).
    """
    p = Path(path)
    try:
        st = os.stat(p)
    except OSError as exc:
        raise UserInputError(f"{p}: cannot read ({exc.strerror or exc})") from None
    if not stat.S_ISREG(st.st_mode):
        raise UserInputError(f"{p}: not a regular file (a FIFO, device or socket); expected {what}")
    try:
        with open(p, "rb") as fh:
            raw = fh.read(limit + 1)
    except OSError as exc:
        raise UserInputError(f"{p}: cannot read ({exc.strerror or exc})") from None
    if len(raw) > limit:
        raise UserInputError(f"{p}: more than {limit:,} bytes is far too large for {what}")
    return raw


def refuse_non_regular(path: Path) -> None:
    """UserInputError unless ``path`` is absent or a plain file (not a link, FIFO or device)."""
    # Files a run appends to or locks in place: a link would redirect the write elsewhere, and
    # a FIFO or device is no file to write.
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    except OSError as exc:
        raise UserInputError(f"{path}: cannot inspect it ({exc.strerror or exc})") from None
    if not stat.S_ISREG(mode):
        what = "a symbolic link" if stat.S_ISLNK(mode) else "not a regular file"
        raise UserInputError(
            f"{path} is {what}; a run writes this file in place, so it must be a plain file "
            "(remove it)"
        )


class _JSONShapeError(ValueError):
    pass


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _JSONShapeError(f"duplicate key {key!r}")
        out[key] = value
    return out


def _reject_constant(name: str) -> Any:
    raise _JSONShapeError(f"{name} is not allowed")


def _depth(text: str) -> int:
    """Deepest bracket nesting of JSON ``text`` (strings skipped), in one pass."""
    depth = deepest = 0
    in_string = escaped = False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]}":
            depth -= 1
    return deepest


def load_json(
    text: object,
    *,
    where: str,
    max_bytes: int,
    label: str = "corrupt JSON",
    max_depth: int = MAX_JSON_DEPTH,
) -> Any:
    """Parse JSON text (``str`` or UTF-8 ``bytes``) with size and depth limits; NaN/Infinity and
    duplicate keys refused. Every problem is one :class:`UserInputError` line ``where: label (why)``."""
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8-sig")
        except UnicodeDecodeError:
            raise UserInputError(f"{where}: not a UTF-8 text file; expected JSON") from None
    if not isinstance(text, str):
        raise UserInputError(f"{where}: expected JSON text")
    if len(text) > max_bytes:
        raise UserInputError(f"{where}: {len(text):,} characters of JSON is far too large")
    if _depth(text) > max_depth:
        raise UserInputError(f"{where}: JSON nested deeper than {max_depth} levels")
    try:
        return json.loads(text, object_pairs_hook=_no_duplicate_keys, parse_constant=_reject_constant)
    except json.JSONDecodeError as exc:
        reason = f"line {exc.lineno}, column {exc.colno}: {exc.msg}"
    except (_JSONShapeError, RecursionError) as exc:
        reason = str(exc) or "nested far too deeply"
    except ValueError:
        # json refuses integers past Python's int-to-string digit limit with a bare ValueError.
        reason = "a number with thousands of digits"
    raise UserInputError(f"{where}: {label} ({safe_text(reason, max_chars=120)})")


def load_json_file(path: str | os.PathLike[str], *, max_bytes: int, what: str, where: str | None = None,
                   label: str = "not valid JSON") -> Any:
    """:func:`load_json` of a regular file of at most ``max_bytes`` bytes (:func:`read_bounded`)."""
    raw = read_bounded(path, max_bytes, what=what)
    return load_json(raw, where=where or str(path), max_bytes=max_bytes, label=label)
