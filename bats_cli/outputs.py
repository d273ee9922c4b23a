"""Output files named by the user: never an input, never overwritten without ``--force``.

Checked before any work starts, so a long run does not fail (or destroy something) at the end.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from bats_cli.errors import UserInputError


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


def check_writable_dir(directory: str | os.PathLike[str], *, flag: str) -> None:
    """The folder (or the nearest existing folder above it, which will hold it) must be writable."""
    directory = Path(directory) if str(directory) else Path(".")
    probe = directory
    while not probe.exists():
        if probe.is_symlink():
            raise UserInputError(f"{flag}: {probe} is a dangling symbolic link")
        parent = probe.parent
        if parent == probe:
            break
        probe = parent
    if probe.exists() and not probe.is_dir():
        raise UserInputError(f"{flag}: {probe} is a file, not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise UserInputError(f"{flag}: cannot write into {probe} (permission denied)")


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
