"""Output files named by the user: never an input, never overwritten without ``--force``.

Checked before any work starts, so a long run does not fail (or destroy something) at the end.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from bats_cli.core.errors import UserInputError


def same_file(a: str | os.PathLike[str], b: str | os.PathLike[str]) -> bool:
    """True when ``a`` and ``b`` name one file (links and hard links included)."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)


def check_output_file(
    path: str | os.PathLike[str],
    *,
    flag: str,
    force: bool = False,
    inputs: Iterable[str | os.PathLike[str] | None] = (),
    reserved: Iterable[str | os.PathLike[str] | None] = (),
) -> Path:
    """Refuse ``path`` as an output unless it is new (or ``force``) and writable.

    ``inputs`` are files the command reads: writing onto one is refused even with ``--force``.
    ``reserved`` are other files the command writes (a run's checkpoints): refused as well.
    """
    path = Path(path)
    check_path_name(path, flag=flag)
    for other in inputs:
        if other is not None and Path(other).exists() and same_file(path, other):
            raise UserInputError(
                f"{flag} {path} is this command's own input; choose another output file"
            )
    for other in reserved:
        if other is not None and (same_file(path, other) if Path(other).exists() else
                                  os.path.abspath(path) == os.path.abspath(other)):
            raise UserInputError(
                f"{flag} {path} is a file this run writes itself; choose another output file"
            )
    if path.is_dir():
        raise UserInputError(f"{flag} {path} is a directory; give a file name")
    if path.exists() or path.is_symlink():
        if not force:
            raise UserInputError(f"{flag} {path} already exists; pass --force to overwrite it")
        if not (path.is_file() or not path.exists()):
            raise UserInputError(f"{flag} {path} is not a regular file; refusing to replace it")
    check_writable_dir(path.parent, flag=f"{flag} {path}")
    return path


# Longest file name most file systems take; atomic writes add ``.`` + ``.XXXXXXXX.tmp``.
MAX_NAME_BYTES = 255
_TEMP_NAME_EXTRA = 16


def check_path_name(path: str | os.PathLike[str], *, flag: str) -> None:
    """No part of ``path`` too long for the file system (with room for a temp file's name)."""
    try:
        raw = os.fsencode(path)
    except (TypeError, ValueError):
        raise UserInputError(f"{flag}: not a usable file name") from None
    if b"\0" in raw:
        raise UserInputError(f"{flag}: a file name may not hold a NUL byte")
    parts = raw.split(b"/")
    for i, part in enumerate(parts):
        room = _TEMP_NAME_EXTRA if i == len(parts) - 1 else 0
        if len(part) + room > MAX_NAME_BYTES:
            raise UserInputError(
                f"{flag}: the name {os.fsdecode(part[:40])}... is longer than the "
                f"{MAX_NAME_BYTES - room} bytes a file system allows; choose a shorter one"
            )
    if len(raw) > 4000:
        raise UserInputError(f"{flag}: the path is longer than a file system allows")


def check_writable_dir(directory: str | os.PathLike[str], *, flag: str) -> None:
    """The folder (or the nearest existing folder above it, which will hold it) must be writable.

    Tested by creating (and removing) a folder in it: permission bits say nothing for root, and
    nothing about /proc, a read-only mount or a folder that is not there.
    """
    import tempfile

    directory = Path(directory) if str(directory) else Path(".")
    check_path_name(directory, flag=flag)
    probe = directory
    while not os.path.exists(probe):
        if os.path.islink(probe):
            raise UserInputError(f"{flag}: {probe} is a dangling symbolic link")
        parent = probe.parent
        if parent == probe:
            break
        probe = parent
    if os.path.exists(probe) and not os.path.isdir(probe):
        raise UserInputError(f"{flag}: {probe} is a file, not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise UserInputError(f"{flag}: cannot write into {probe} (permission denied)")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".bats-write-test-", dir=probe))
    except OSError as exc:
        raise UserInputError(
            f"{flag}: cannot write into {probe} ({exc.strerror or exc}); choose another place"
        ) from None


def check_distinct(named: dict[str, str | os.PathLike[str] | None]) -> None:
    """Two output flags may not name the same file (the second write would replace the first)."""
    seen: dict[str, str] = {}
    for flag, path in named.items():
        if path is None:
            continue
        key = os.path.abspath(os.path.realpath(path))
        if key in seen:
            raise UserInputError(f"{seen[key]} and {flag} name the same file {path}")
        seen[key] = flag
