"""What a file given on the command line *is*, read from its first bytes before any parser runs.

A genotype handed to `bats eval`, or a checkpoint handed to `bats train`, should hear what it is
and which command takes it, not a parser's complaint ("truncated or corrupt", "far too large for
a genotype file"). ``sniff`` tells apart: a run directory, a bats checkpoint of each kind (the
safetensors header's ``bats_kind``), another safetensors file, an ONNX model, a genotype JSON
file, another JSON file, and anything else. It reads at most a bounded header and never raises:
an unreadable file is ``"unknown"`` and the caller's own checks say why.
"""

from __future__ import annotations

import json
import os
import stat
import struct
from dataclasses import dataclass
from pathlib import Path

# A safetensors header is an 8-byte little-endian length, then that many bytes of JSON. bats
# headers hold a config and a genotype (each bounded far below this).
_MAX_HEADER_READ = 8 << 20
_MAX_JSON_READ = 1 << 20

# What each kind of file is for: the commands that take it, the first one the likeliest.
TAKEN_BY: dict[str, tuple[str, ...]] = {
    "genotype": ("train", "flops", "genotype show"),
    "search": ("derive", "flops"),
    "train": ("binarize", "eval", "export", "flops"),
    "binarize": ("eval", "export", "flops"),
    "packed": ("eval", "export", "flops"),
    "onnx": ("eval",),
}
CHECKPOINT_KINDS = ("search", "train", "binarize", "packed")


@dataclass(frozen=True)
class FileType:
    """``kind``: ``directory``, ``run`` (a directory with ``last.safetensors``), a checkpoint kind
    (``search``, ``train``, ``binarize``, ``packed``), ``safetensors`` (not a bats checkpoint),
    ``onnx``, ``genotype``, ``json``, ``missing`` or ``unknown``. ``what`` says it in words."""

    kind: str
    what: str

    @property
    def is_checkpoint(self) -> bool:
        return self.kind in CHECKPOINT_KINDS


def _read_head(path: Path, n: int) -> bytes:
    try:
        with open(path, "rb") as fh:
            return fh.read(n)
    except OSError:
        return b""


def _safetensors_kind(path: Path, head: bytes) -> FileType | None:
    if len(head) < 10:
        return None
    (length,) = struct.unpack("<Q", head[:8])
    if not 2 <= length or head[8:9] != b"{":
        return None
    if length > _MAX_HEADER_READ:
        return FileType("safetensors", "a safetensors file")
    raw = _read_head(path, 8 + length)[8:]
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None
    if not isinstance(header, dict):
        return None
    meta = header.get("__metadata__")
    kind = meta.get("bats_kind") if isinstance(meta, dict) else None
    if kind in CHECKPOINT_KINDS:
        article = "an" if kind[0] in "aeiou" else "a"
        return FileType(kind, f"{article} {kind} checkpoint")
    return FileType("safetensors", "a safetensors file, but not a bats checkpoint")


def _is_onnx(path: Path, head: bytes) -> bool:
    # An ONNX ModelProto starts with field 1 (ir_version, a varint: tag 0x08); exporters write the
    # producer name (field 2) next, and the opset import names the "ai.onnx" domain or none.
    if path.suffix.lower() == ".onnx":
        return True
    return head[:1] == b"\x08" and (b"pytorch" in head[:64] or b"onnx" in head[:4096].lower())


def _json_kind(path: Path, head: bytes) -> FileType | None:
    text = head.lstrip(b"\xef\xbb\xbf").lstrip()
    if not text.startswith((b"{", b"[")):
        return None
    raw = _read_head(path, _MAX_JSON_READ + 1)
    if len(raw) > _MAX_JSON_READ:
        return FileType("json", "a large JSON file")
    try:
        data = json.loads(raw.decode("utf-8-sig"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None
    if isinstance(data, dict) and "normal" in data and "reduce" in data:
        name = data.get("name")
        named = f" ({name})" if isinstance(name, str) and name.isprintable() and len(name) <= 60 else ""
        return FileType("genotype", f"a genotype JSON file{named}")
    return FileType("json", "a JSON file, but not a genotype")


def sniff(path: str | os.PathLike[str]) -> FileType:
    """What ``path`` is, from its first bytes (never raises; FIFOs and devices are not opened)."""
    p = Path(path)
    try:
        st = os.stat(p)
    except OSError:
        return FileType("missing", "missing")
    if stat.S_ISDIR(st.st_mode):
        last = p / "last.safetensors"
        if last.is_file():
            inner = sniff(last)
            of = f" of a {inner.kind}" if inner.is_checkpoint else ""
            return FileType("run", f"a run directory{of}")
        return FileType("directory", "a directory")
    if not stat.S_ISREG(st.st_mode):
        return FileType("unknown", "not a regular file")
    head = _read_head(p, 4096)
    found = _safetensors_kind(p, head)
    if found is not None:
        return found
    if _is_onnx(p, head):
        return FileType("onnx", "an ONNX model (from `bats export`)")
    found = _json_kind(p, head)
    if found is not None:
        return found
    return FileType("unknown", "unknown")


def taken_by(kind: str, path: str | os.PathLike[str]) -> str:
    """``"`bats eval PATH` (or `bats export`, `bats flops`)"``: the commands that take a file of
    ``kind`` ('' if none)."""
    commands = TAKEN_BY.get(kind, ())
    if not commands:
        return ""
    first = f"`bats {commands[0]} {os.fspath(path)}`"
    rest = [f"`bats {c}`" for c in commands[1:]]
    if not rest:
        return first
    return f"{first} (or {', '.join(rest[:-1]) + ' or ' if len(rest) > 1 else ''}{rest[-1]})"


def wrong_file(path: str | os.PathLike[str], found: FileType, expected: str) -> str:
    """One line: what ``path`` is, what was expected, and which commands take what it is."""
    where = taken_by(found.kind, path)
    hint = f"; it goes to {where}" if where else ""
    return f"{os.fspath(path)} is {found.what}, not {expected}{hint}"


__all__ = ["CHECKPOINT_KINDS", "FileType", "TAKEN_BY", "sniff", "taken_by", "wrong_file"]
