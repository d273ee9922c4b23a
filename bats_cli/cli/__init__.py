"""Command-line interface: thin commands that parse, validate, call the library and print.

Every :class:`bats_cli.errors.BatsError` becomes one line on stderr and its exit code (2 for bad
input, 1 for a failed run); Ctrl-C exits 130 (long commands save a checkpoint first).
"""

from __future__ import annotations

import importlib
import sys

from bats_cli.cli.app import app

# One module per command; each registers itself on ``app`` when imported.
COMMAND_MODULES = ("genotype", "search", "derive", "flops", "train", "binarize", "eval", "export")


def _load_commands() -> None:
    for name in COMMAND_MODULES:
        importlib.import_module(f"bats_cli.cli.{name}")


def _click_module():
    # typer >= 0.26 vendors click as typer._click; older typer depends on click itself.
    try:
        from typer import _click as click
    except ImportError:  # pragma: no cover - depends on the installed typer
        import click
    return click


def main(argv: list[str] | None = None) -> None:
    from bats_cli.errors import BatsError

    _load_commands()
    try:
        app(args=argv, standalone_mode=False)
    except BatsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except SystemExit:
        raise
    except Exception as exc:  # click usage errors arrive here in non-standalone mode
        click = _click_module()
        if isinstance(exc, click.exceptions.ClickException):
            exc.show()
            sys.exit(2 if isinstance(exc, click.exceptions.UsageError) else exc.exit_code)
        if isinstance(exc, click.exceptions.Abort):
            print("aborted", file=sys.stderr)
            sys.exit(130)
        raise
