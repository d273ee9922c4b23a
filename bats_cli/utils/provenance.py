"""What produced a result: software versions, the command line, host, start time, git commit."""

from __future__ import annotations

import functools
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch


def software_versions() -> dict[str, str]:
    """Versions recorded in every checkpoint and ``config.json``."""
    return dict(_collect_versions())


@functools.lru_cache(maxsize=1)
def _collect_versions() -> dict[str, str]:
    import bats_cli

    return {
        "bats": bats_cli.__version__,
        "torch": torch.__version__,
        "torchvision": _dist_version("torchvision"),
        "python": platform.python_version(),
    }


def _dist_version(name: str) -> str:
    # Package metadata, not an import: importing torchvision takes seconds (bad right after Ctrl-C).
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return "absent"


def run_record(device: Any = None) -> dict[str, Any]:
    """What ``config.json`` records about the start of a run: the command line as typed, start
    time, host, package version, git commit of the source (when it is a checkout) and device."""
    import shlex
    import socket

    import bats_cli

    return {
        "command_line": shlex.join([_program_name(), *sys.argv[1:]]),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "host": socket.gethostname(),
        "bats_version": bats_cli.__version__,
        "git_commit": git_commit(),
        "device": None if device is None else str(device),
    }


def _program_name() -> str:
    name = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "bats"
    # `python -m bats_cli` shows as __main__.py; the command a user retypes is `bats`.
    return "bats" if name in ("__main__.py", "-c", "") else name


@functools.lru_cache(maxsize=1)
def git_commit() -> str | None:
    """The commit of the checkout this package runs from, or None (installed copy, no git)."""
    import subprocess

    source = Path(__file__).resolve().parents[2]
    if not (source / ".git").exists():
        return None
    try:
        proc = subprocess.run(["git", "-C", str(source), "rev-parse", "HEAD"], capture_output=True,
                              text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    commit = proc.stdout.strip()
    return commit if proc.returncode == 0 and commit else None
