"""Exceptions the CLI turns into one line on stderr and an exit code.

Library code raises these instead of printing; the CLI never shows a traceback for them.
"""


class BatsError(Exception):
    """Base class; ``exit_code`` is what the CLI exits with."""

    exit_code = 1


class UserInputError(BatsError, ValueError):
    """Bad input from the user (file, flag, data directory): exit 2."""

    exit_code = 2


class RunFailure(BatsError, RuntimeError):
    """The run itself failed (diverged, out of memory, I/O error while writing): exit 1."""

    exit_code = 1


class Interrupted(BatsError):
    """Ctrl-C or SIGTERM during a long run; a resumable checkpoint was saved first: exit 130."""

    exit_code = 130
