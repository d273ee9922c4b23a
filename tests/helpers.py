"""Helpers shared by the test modules that drive the CLI in-process."""

from __future__ import annotations


def cli(argv, capsys):
    """Run ``bats_cli.cli.main(argv)``; returns (exit code, stdout, stderr), code 0 when it returns."""
    from bats_cli.cli import main

    try:
        main(argv)
        code = 0
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(code, err, *needles):
    """Assert exit code 2 and a single ``error: ...`` line on stderr containing every needle; return it."""
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]
