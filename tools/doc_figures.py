"""Regenerate (or check) the command outputs quoted in README.md and docs/*.md.

A quoted figure is written as ``<!--fig:KEY-->VALUE<!--/fig-->`` (the markers do not render);
KEY names a command below and how its output is formatted. Run

    python tools/doc_figures.py            # rewrite every quoted figure from what the commands print
    python tools/doc_figures.py --check    # exit 1 listing the figures that no longer match

tests/test_doc_figures.py runs the check, so a change that moves a quoted number fails the tests
until the docs are regenerated.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = ("README.md", "docs/flops.md")
FIGURE = re.compile(r"<!--fig:([a-z0-9_.-]+)-->(.*?)<!--/fig-->")


def _run_json(argv: list[str]) -> dict:
    """``bats ARGV --json`` in this process; its one JSON object."""
    from bats_cli.cli import main

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        try:
            main([*argv, "--json"])
        except SystemExit as exc:
            if exc.code not in (0, None):
                raise RuntimeError(f"bats {' '.join(argv)} exited {exc.code}") from None
    return json.loads(buf.getvalue())


def _sci(value: float, exponent: int, digits: int) -> str:
    """``0.826e8`` style: value / 10**exponent with ``digits`` decimals."""
    return f"{value / 10**exponent:.{digits}f}e{exponent}"


def _mega(value: float, digits: int = 2) -> str:
    return f"{value / 1e6:.{digits}f} M"


# What each figure is: the command whose JSON it comes from and how it is written in the docs.
COMMANDS: dict[str, list[str]] = {
    "bats_in": ["flops", "bats_c10", "--dataset", "imagenet"],
    "bats_in_2x": ["flops", "bats_c10", "--dataset", "imagenet", "--width", "2x"],
    "darts_v2_real": ["flops", "darts_v2", "--real"],
    "pdarts_real": ["flops", "pdarts", "--real"],
    "amoebanet_real": ["flops", "amoebanet_a", "--real"],
    "resnet18": ["flops", "resnet18"],
    "resnet18_in": ["flops", "resnet18", "--dataset", "imagenet"],
}
FORMATS: dict[str, Callable[[dict], str]] = {
    "flops": lambda r: _sci(r["flops"], 8, 3),
    "bops": lambda r: _sci(r["bops"], 9, 4),
    "ops": lambda r: _sci(r["ops"], 8, 3),
    "params": lambda r: _mega(r["params"]),
    "params3": lambda r: _mega(r["params"], 3),
    "params_exact": lambda r: f"{r['params']:,}",
    "mflops": lambda r: f"{r['flops'] / 1e6:.1f} M",
}


def compute(keys: set[str]) -> dict[str, str]:
    """The current text of every figure KEY = ``<command>.<format>``."""
    results: dict[str, dict] = {}
    values = {}
    for key in sorted(keys):
        command, _, fmt = key.rpartition(".")
        if command not in COMMANDS or fmt not in FORMATS:
            raise KeyError(f"unknown figure {key!r}")
        if command not in results:
            results[command] = _run_json(COMMANDS[command])
        values[key] = FORMATS[fmt](results[command])
    return values


def figures(text: str) -> list[tuple[str, str]]:
    return FIGURE.findall(text)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    check = "--check" in args
    texts = {name: (ROOT / name).read_text(encoding="utf-8") for name in DOCS}
    keys = {key for text in texts.values() for key, _ in figures(text)}
    values = compute(keys)
    stale = []
    for name, text in texts.items():
        for key, quoted in figures(text):
            if quoted != values[key]:
                stale.append(f"{name}: {key} quotes {quoted!r}, the command prints {values[key]!r}")
        new = FIGURE.sub(lambda m: f"<!--fig:{m.group(1)}-->{values[m.group(1)]}<!--/fig-->", text)
        if not check and new != text:
            (ROOT / name).write_text(new, encoding="utf-8")
    if check and stale:
        print("\n".join(stale), file=sys.stderr)
        print("run: python tools/doc_figures.py", file=sys.stderr)
        return 1
    if not check:
        print(f"{len(keys)} figures; {len(stale)} updated", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
