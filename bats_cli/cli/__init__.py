"""Command-line interface: thin commands that parse, validate, call the library and print.

The process around them (exit codes, signals, one-line errors) is :mod:`bats_cli.cli.lifecycle`;
`bats` is :func:`entry`, ``main(argv)`` runs it in-process.
"""

from __future__ import annotations

from typing import Any

from bats_cli.cli.lifecycle import (
    COMMAND_MODULES,
    EXIT_BAD_INPUT,
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    _load_commands,
    entry,
    main,
    save_traceback,
)

__all__ = ["COMMAND_MODULES", "EXIT_BAD_INPUT", "EXIT_FAILED", "EXIT_INTERRUPTED", "EXIT_OK", "_load_commands",
           "entry", "main", "save_traceback"]


def __getattr__(name: str) -> Any:
    # ``app`` is imported lazily so that `bats` reaches main() (and its handlers) quickly.
    if name == "app":
        from bats_cli.cli.app import app

        return app
    raise AttributeError(name)
