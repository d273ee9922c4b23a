"""Strings read from files (genotype names, checkpoint metadata) are data, never paths or escapes.

``safe_name`` turns such a string into one harmless path component; ``safe_text`` makes it
harmless on a terminal (no control characters, no ANSI escape sequences, one line).
"""

from __future__ import annotations

import re

# Longest path component made from a name: far below NAME_MAX (255) with room for prefixes.
MAX_NAME_CHARS = 64
# Longest single value shown on a terminal line (e.g. a name inside an error message).
MAX_TEXT_CHARS = 2000

_UNSAFE_NAME = re.compile(r"[^A-Za-z0-9._-]+")
# ESC-introduced sequences: CSI (ESC [ ... final), OSC (ESC ] ... BEL or ESC \), and 2-byte ones.
_ANSI = re.compile(r"\x1b(?:\[[0-?]*[ -/]*[@-~]|\][^\x07\x1b]*(?:\x07|\x1b\\)?|[@-Z\\-_])")
# C0 controls, DEL and C1 controls (U+0080-U+009F; U+009B is a one-character CSI).
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
# Unicode bidi overrides/isolates can reorder what a terminal shows.
_BIDI = re.compile(r"[\u202a-\u202e\u2066-\u2069]")


def safe_name(text: object, *, default: str = "run", max_chars: int = MAX_NAME_CHARS) -> str:
    """One path component: ``[A-Za-z0-9._-]`` only, no leading dot or dash, no ``..``, bounded.

    ``safe_name("x/../../../../elsewhere") == "x_._._._._elsewhere"``: no separator, so no way
    out of the folder it is joined to.
    """
    name = _UNSAFE_NAME.sub("_", str(text))
    # ".." only means "parent" as a whole component; collapsing runs of dots keeps names readable.
    name = re.sub(r"\.{2,}", ".", name)
    name = name.strip("._-")[:max_chars].rstrip("._-")
    return name or default


def safe_text(text: object, *, max_chars: int = MAX_TEXT_CHARS) -> str:
    """``text`` fit for one terminal line: escapes removed, control characters shown as ``?``."""
    out = _ANSI.sub("", str(text))
    out = out.replace("\r\n", " ").replace("\n", " ").replace("\t", " ")
    out = _CONTROL.sub("?", out)
    out = _BIDI.sub("?", out)
    if len(out) > max_chars:
        out = out[: max_chars - 3] + "..."
    return out


def has_control_chars(text: str, *, allow_newlines: bool = False) -> bool:
    """True when ``text`` holds a control character (``\\n``/``\\t`` allowed on request)."""
    if allow_newlines:
        text = text.replace("\n", "").replace("\t", "").replace("\r", "")
    return bool(_CONTROL.search(text) or _BIDI.search(text))


def exists(path: object) -> bool:
    """``os.path.exists`` for a path named by a user or a file: False, never an error, for a
    name the system refuses (too long, a NUL byte, a loop of links)."""
    import os

    try:
        return os.path.lexists(os.fspath(path))  # type: ignore[arg-type]
    except (OSError, ValueError, TypeError):
        return False
