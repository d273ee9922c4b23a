"""The one way results reach stdout: ``emit_result`` (one JSON object with ``--json``, else a rich
table), the tables' helpers, and ``--print-config``."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Iterable, Mapping
from typing import Any


def key_value_table(rows: Iterable[tuple[str, Any]], *, fold: bool = False) -> Any:
    """A borderless two-column rich table: bold keys, values as ``str`` (wrapped with ``fold``)."""
    from rich.table import Table

    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold")
    table.add_column(overflow="fold" if fold else "ellipsis")
    for key, value in rows:
        table.add_row(console_text(key), console_text(value))
    return table


def console_text(value: Any) -> str:
    """``value`` for a rich table or markup string: no escapes, no markup from file contents."""
    from rich.markup import escape

    from bats_cli.core.names import safe_text

    return escape(safe_text(value))


def pct(value: float | None) -> str:
    """A percentage for a result table; ``-`` when there is none."""
    return "-" if value is None else f"{value:.2f} %"


def _default_table(result: Mapping[str, Any]) -> Any:
    from bats_cli.core.fileio import to_jsonable

    return key_value_table((key, _cell(value)) for key, value in _flat(to_jsonable(result)).items())


def _flat(obj: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in obj.items():
        if isinstance(v, dict) and v:
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    if value is None:
        return "-"
    if isinstance(value, list):
        return ", ".join(_cell(v) for v in value)
    return str(value)


def stdout_console():
    """A rich console on stdout; piped or redirected, wide enough that tables are not cut
    (rich would assume 80 columns)."""
    from rich.console import Console

    if sys.stdout.isatty():
        return Console(file=sys.stdout, highlight=False)
    width = max(160, int(os.environ.get("COLUMNS", "0") or 0))
    return Console(file=_LinesWithoutTrailingSpaces(sys.stdout), highlight=False, width=width)


class _LinesWithoutTrailingSpaces:
    """A text stream that drops the spaces rich pads table lines with (piped output is diffed and
    grepped, where 160-column padding only gets in the way)."""

    def __init__(self, stream) -> None:
        self._stream = stream
        self._pending = ""

    def write(self, text: str) -> int:
        lines = (self._pending + text).split("\n")
        self._pending = lines.pop()
        for line in lines:
            self._stream.write(line.rstrip() + "\n")
        return len(text)

    def flush(self) -> None:
        if self._pending:
            self._stream.write(self._pending)
            self._pending = ""
        self._stream.flush()

    def isatty(self) -> bool:
        return False

    def fileno(self) -> int:
        return self._stream.fileno()

    @property
    def encoding(self) -> str:
        return getattr(self._stream, "encoding", None) or "utf-8"


def emit_result(
    result: Mapping[str, Any],
    *,
    as_json: bool,
    table_fn: Callable[[Mapping[str, Any]], Any] | None = None,
) -> None:
    """The command's result on stdout: one strict JSON object with ``--json``, else a rich table.

    ``table_fn(result)`` may return any rich renderable (or a str) for a custom human view.
    """
    if as_json:
        # Imported here: bats_cli.core.fileio imports torch, which `--help` must not pay for.
        from bats_cli.core.fileio import to_jsonable

        sys.stdout.write(json.dumps(to_jsonable(result), allow_nan=False) + "\n")
        sys.stdout.flush()
        return

    renderable = table_fn(result) if table_fn is not None else _default_table(result)
    stdout_console().print(renderable)


def print_config(cfg: Any) -> None:
    """``--print-config``: the resolved settings as indented JSON on stdout."""
    from bats_cli.core.fileio import to_jsonable

    sys.stdout.write(json.dumps(to_jsonable(cfg), indent=2) + "\n")
