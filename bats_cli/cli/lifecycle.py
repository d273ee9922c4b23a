"""The `bats` process: entry point, exit codes, signals, one-line errors.

Exit codes scripts can rely on: 0 success; 2 bad input (one ``error:`` line, click usage errors
included); 1 a failed run; 130 interrupted (Ctrl-C / SIGTERM, at any point: start-up, training,
the final save, evaluation, a second signal). An unexpected internal error is one line naming
a file that holds its traceback, never a traceback on the terminal.
"""

from __future__ import annotations

import contextlib
import errno
import importlib
import os
import signal
import sys
import threading
from typing import Any

# One module per command; each registers itself on ``app`` when imported.
COMMAND_MODULES = ("genotype", "search", "derive", "flops", "train", "binarize", "eval", "export", "report", "ablate")

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 0, 1, 2, 130


def _load_commands() -> None:
    for name in COMMAND_MODULES:
        importlib.import_module(f"bats_cli.cli.{name}")


def _click_exceptions() -> tuple[type, type, type]:
    """(ClickException, UsageError, Abort) of the click that typer uses.

    typer >= 0.26 vendors click as ``typer._click`` and keeps ``Abort``/``Exit`` in
    ``typer.exceptions``; older typer depends on click itself, which has all three.
    """
    try:
        from typer import _click as click
        from typer.exceptions import Abort
    except ImportError:  # pragma: no cover - depends on the installed typer
        import click
        from click.exceptions import Abort
    return click.exceptions.ClickException, click.exceptions.UsageError, Abort


def _print_error(text: str) -> None:
    from bats_cli.core.names import safe_text

    with contextlib.suppress(OSError, ValueError):
        print(f"error: {safe_text(text)}", file=sys.stderr, flush=True)


def _say(message: str) -> None:
    from bats_cli.core.names import safe_text

    with contextlib.suppress(OSError, ValueError):
        print(safe_text(message), file=sys.stderr, flush=True)


def _interrupted(message: str = "interrupted") -> None:
    _say(message)
    sys.exit(EXIT_INTERRUPTED)


def _sigterm_as_interrupt(signum: int, frame: object) -> None:
    # Outside a run's own handler (start-up, final output, `eval`), SIGTERM stops like Ctrl-C.
    raise KeyboardInterrupt


@contextlib.contextmanager
def _terminate_as_interrupt():
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _sigterm_as_interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


def save_traceback(exc: BaseException) -> str | None:
    """Write ``exc``'s traceback to a private file in the temp directory; its path, or None."""
    import tempfile
    import time
    import traceback

    try:
        fd, path = tempfile.mkstemp(
            prefix=f"bats-crash-{time.strftime('%Y%m%d-%H%M%S')}-", suffix=".txt"
        )
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(f"bats {' '.join(sys.argv)}\n\n")
            fh.write("".join(traceback.format_exception(exc)))
        return path
    except (OSError, ValueError):
        return None


def _usage_error(exc: Any) -> str:
    """A click usage error as one line (click's own text spans several lines with hints)."""
    message = exc.format_message() if hasattr(exc, "format_message") else str(exc)
    ctx = getattr(exc, "ctx", None)
    where = f" (see `{ctx.command_path} --help`)" if ctx is not None else ""
    return " ".join(message.split()) + where


def _quiet_broken_pipe() -> None:
    # stdout was closed by the reader (`bats ... | head`): drop further output silently.
    with contextlib.suppress(OSError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())


def _tidy_help(command) -> None:
    """Readable value names in --help: none for on/off flags, N / X / TEXT / DIR / FILE for
    values, instead of the type names typer shows by default (``<bool>``, ``<int range>``)."""
    get_help_option = command.get_help_option

    def help_option(ctx):
        option = get_help_option(ctx)
        if option is not None:
            option.metavar = ""  # a flag takes no value
        return option

    command.get_help_option = help_option
    for param in getattr(command, "params", []):
        if getattr(param, "param_type_name", "") == "argument":
            # The argument's own name and help say what it is; "<str>" next to it says nothing.
            param.display_type_rich = lambda ctx: None
            continue
        if getattr(param, "param_type_name", "") != "option" or param.metavar is not None:
            continue
        desc = getattr(param, "type_descriptor", None)
        if param.is_flag or param.count:
            param.metavar = ""
        elif desc is None or desc.is_choice or desc.is_list or desc.is_tuple:
            continue
        elif desc.is_path:
            param.metavar = "DIR" if desc.path_type == "dir" else "FILE"
        elif desc.annotation is int:
            param.metavar = "N"
        elif desc.annotation is float:
            param.metavar = "X"
        elif desc.annotation is str:
            param.metavar = "TEXT"
    for sub in getattr(command, "commands", {}).values():
        _tidy_help(sub)


def _late_signal(signum: int, frame: object) -> None:
    # The command is over; a signal during interpreter shutdown (workers joining, files
    # closing) still means "interrupted", never the default handler's 143.
    with contextlib.suppress(OSError, ValueError):
        sys.stdout.flush()
        sys.stderr.flush()
    os._exit(EXIT_INTERRUPTED)


def _until_exit_signals_mean_interrupted() -> None:
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, _late_signal)


def main(argv: list[str] | None = None) -> None:
    """Run the CLI; returns on success, otherwise ``sys.exit`` with 1, 2 or 130."""
    try:
        with _terminate_as_interrupt():
            code = _run(argv)
    except KeyboardInterrupt:
        _interrupted()
    if code:
        sys.exit(code)


def entry() -> None:
    """The `bats` program (console script, ``python -m bats_cli``): :func:`main`, and a signal
    that arrives while the process shuts down still exits 130."""
    import atexit

    code = EXIT_OK
    try:
        main()
    except SystemExit as exc:
        if exc.code is None or isinstance(exc.code, int):
            code = exc.code or EXIT_OK
        else:
            _say(str(exc.code))
            code = EXIT_FAILED
    finally:
        _until_exit_signals_mean_interrupted()
    atexit._run_exitfuncs()  # workers joined, locks released, as at a normal exit
    with contextlib.suppress(OSError, ValueError):
        sys.stdout.flush()
        sys.stderr.flush()
    # Python's own shutdown puts the default signal handlers back while it tears torch down
    # (a second or more): a signal then would end the process with 143 instead of 130.
    os._exit(code)


_BUILT: tuple[Any, Any] | None = None  # (app, its click command)


def _command(app: Any, build: Any) -> Any:
    """The click command of ``app``, built once per process: building it inspects every
    command's signature (half a second), which in-process callers (tests, notebooks) would pay
    on every call."""
    global _BUILT
    if _BUILT is None or _BUILT[0] is not app:
        command = build(app)
        _tidy_help(command)
        _BUILT = (app, command)
    return _BUILT[1]


def _run(argv: list[str] | None) -> int:
    from bats_cli.core.errors import BatsError

    click_exception, usage_error, abort = _click_exceptions()
    try:
        import typer.main

        from bats_cli.cli.app import app

        _load_commands()
        command = _command(app, typer.main.get_command)
        # Non-standalone: typer *returns* 130 on Ctrl-C (and an Exit's code) instead of exiting.
        rv = command.main(args=argv, standalone_mode=False, prog_name="bats")
        code = rv if isinstance(rv, int) and not isinstance(rv, bool) else EXIT_OK
        if code == EXIT_INTERRUPTED:
            _say("interrupted")
        return code
    except BatsError as exc:
        if exc.exit_code == EXIT_INTERRUPTED:
            _say(str(exc))
            return EXIT_INTERRUPTED
        _print_error(str(exc))
        return exc.exit_code
    except KeyboardInterrupt:
        _say("interrupted")
        return EXIT_INTERRUPTED
    except abort:
        _say("aborted")
        return EXIT_INTERRUPTED
    except click_exception as exc:
        if type(exc).__name__ == "NoArgsIsHelpError":
            exc.show()  # `bats` alone prints the help, as click does
            return EXIT_BAD_INPUT
        if isinstance(exc, usage_error):
            _print_error(_usage_error(exc))
            return EXIT_BAD_INPUT
        _print_error(exc.format_message())
        return exc.exit_code or EXIT_FAILED
    except SystemExit:
        raise
    except BrokenPipeError:
        _quiet_broken_pipe()
        return EXIT_FAILED
    except MemoryError:
        _print_error("out of memory; use a smaller --batch-size, network or data set")
        return EXIT_FAILED
    except OSError as exc:
        return _os_error(exc)
    except Exception as exc:
        return _internal_error(exc)


# A path a user named that the system refuses: bad input. Any other system error (a full disk,
# a read-only file system, an I/O error) is the environment's: the run failed.
_BAD_PATH_ERRNOS = frozenset(
    getattr(errno, name) for name in ("ENOENT", "ENOTDIR", "EISDIR", "ENAMETOOLONG", "ELOOP", "EINVAL")
)


def _os_error(exc: OSError) -> int:
    """A system error no check caught as one line: the file it names and the system's reason."""
    where = exc.filename if exc.filename is not None else None
    reason = exc.strerror or type(exc).__name__
    _print_error(f"{where}: {reason}" if where is not None else reason)
    return EXIT_BAD_INPUT if exc.errno in _BAD_PATH_ERRNOS else EXIT_FAILED


def _internal_error(exc: BaseException) -> int:
    import torch

    if isinstance(exc, torch.OutOfMemoryError):
        first = str(exc).splitlines()[0] if str(exc) else "out of memory"
        _print_error(f"{first}; use a smaller --batch-size or network")
        return EXIT_FAILED
    path = save_traceback(exc)
    where = f"; traceback saved to {path}" if path else ""
    first = str(exc).splitlines()[0] if str(exc) else ""
    _print_error(
        f"internal error: {type(exc).__name__}: {first}{where}; please report it"
    )
    return EXIT_FAILED
