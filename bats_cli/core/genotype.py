"""Cell genotypes (§3): which op connects which inputs inside the normal and the reduction cell.

The shape is the DARTS convention, so genotypes printed by DARTS-style code can be pasted here::

    {"name": "darts_v2", "space": "darts",
     "normal": [["sep_conv_3x3", 0], ["sep_conv_3x3", 1], ...], "normal_concat": [2, 3, 4, 5],
     "reduce": [["max_pool_3x3", 0], ...], "reduce_concat": [2, 3, 4, 5]}

Entries ``2k`` and ``2k+1`` of a cell are the two incoming edges of intermediate node ``k``; an
edge ``[op, i]`` applies ``op`` to input ``i``, where 0 and 1 are the cell's two inputs (the
outputs of the two previous cells) and ``i >= 2`` is intermediate node ``i - 2``. The cell's
output concatenates the nodes listed in ``*_concat`` (node indices, so ``>= 2``).

Nothing here ever evaluates user text: JSON goes through :func:`bats_cli.core.fileio.load_json`.
DARTS Python reprs are read by :mod:`bats_cli.core.darts_import`, the bundled genotypes by
:mod:`bats_cli.core.zoo`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Literal, NamedTuple

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictInt,
    StrictStr,
    ValidationError,
    model_validator,
)

from bats_cli.core.config import format_validation_error
from bats_cli.core.errors import UserInputError
from bats_cli.core.fileio import atomic_write_text, load_json, read_bounded
from bats_cli.core.names import exists, has_control_chars
from bats_cli.core.spaces import SPACES

CellName = Literal["normal", "reduce"]
CELLS: tuple[CellName, CellName] = ("normal", "reduce")

# A pasted genotype is a few hundred bytes; the cap keeps a stray multi-GB file from being parsed.
MAX_TEXT_BYTES = 1 << 20
# A name is an identifier (file names are made from it after safe_name), not a paragraph.
MAX_NAME_LENGTH = 128
# DARTS-style cells have 4-5 intermediate nodes; a huge cell would be a memory bomb when built.
MAX_CELL_NODES = 64
# Any integer a genotype holds is a node index (< MAX_CELL_NODES + 2); text may hold at most this
# much, so that no message prints a number with thousands of digits and no range() is enormous.
MAX_INDEX = 1_000_000


def short_int(value: int) -> str:
    """``value`` for a message: a huge integer as its digit count, never thousands of digits."""
    if abs(value) <= 10**12:
        return str(value)
    return f"{'-' if value < 0 else ''}a {value.bit_length() * 30103 // 100000 + 1}-digit number"


class Edge(NamedTuple):
    """One incoming edge of an intermediate node: ``op`` applied to input ``input``."""

    node: int  # index of the receiving node in the cell's numbering (>= 2)
    input: int
    op: str


class Genotype(BaseModel):
    """A derived architecture: one normal and one reduction cell, in the DARTS convention."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: StrictStr = Field(
        min_length=1, max_length=MAX_NAME_LENGTH, description="Short identifier, e.g. 'bats_c10'."
    )
    space: Literal["bats", "darts"] = Field(
        description="Search space whose op names the cells use (see bats_cli.core.spaces)."
    )
    normal: tuple[tuple[StrictStr, StrictInt], ...] = Field(
        description="Normal cell: two [op, input] entries per intermediate node, in node order."
    )
    normal_concat: tuple[StrictInt, ...] = Field(
        description="Node indices (>= 2) concatenated into the normal cell's output."
    )
    reduce: tuple[tuple[StrictStr, StrictInt], ...] = Field(
        description="Reduction cell: two [op, input] entries per intermediate node."
    )
    reduce_concat: tuple[StrictInt, ...] = Field(
        description="Node indices (>= 2) concatenated into the reduction cell's output."
    )
    source: StrictStr | None = Field(
        default=None, description="Where the genotype comes from (paper, repository, run)."
    )
    notes: StrictStr | None = Field(default=None, description="Free-form remarks.")

    @model_validator(mode="after")
    def _check_cells(self) -> Genotype:
        problems: list[str] = []
        # Names and notes reach terminals and (sanitised) file names: no escape sequences.
        if has_control_chars(self.name):
            problems.append("name: control characters are not allowed")
        for key in ("source", "notes"):
            value = getattr(self, key)
            if value is not None and has_control_chars(value, allow_newlines=True):
                problems.append(f"{key}: control characters are not allowed")
        valid_ops = SPACES[self.space].ops
        for cell in CELLS:
            entries = getattr(self, cell)
            if not entries:
                problems.append(f"{cell}: empty; a cell needs at least one node (two entries)")
                continue
            if len(entries) > 2 * MAX_CELL_NODES:
                problems.append(
                    f"{cell}: {len(entries) // 2} nodes; at most {MAX_CELL_NODES} are supported"
                )
                continue
            if len(entries) % 2:
                problems.append(
                    f"{cell}: {len(entries)} entries, but every intermediate node takes exactly "
                    "two [op, input] entries, so the count must be even"
                )
            for i, (op, src) in enumerate(entries):
                node = i // 2
                if abs(src) > MAX_INDEX:
                    problems.append(f"{cell}[{i}]: input {short_int(src)} is far out of range")
                    continue
                if op not in valid_ops:
                    problems.append(
                        f"{cell}[{i}]: op {op!r} is not in the {self.space!r} space; "
                        f"valid: {', '.join(valid_ops)}"
                    )
                if src < 0:
                    problems.append(f"{cell}[{i}]: input {src} is negative")
                elif src >= node + 2:
                    problems.append(
                        f"{cell}[{i}]: input {src} is an index from the future: node {node + 2} "
                        f"may only read inputs 0..{node + 1} "
                        "(0, 1 = cell inputs, 2.. = earlier nodes)"
                    )
            steps = (len(entries) + 1) // 2
            concat = getattr(self, f"{cell}_concat")
            if not concat:
                problems.append(f"{cell}_concat: empty; the cell output needs at least one node")
            seen: set[int] = set()
            for j, idx in enumerate(concat):
                if not 2 <= idx <= steps + 1:
                    problems.append(
                        f"{cell}_concat[{j}]: {short_int(idx)} is not a node of the {cell} cell; "
                        f"valid: 2..{steps + 1} ({steps} nodes)"
                    )
                elif idx in seen:
                    problems.append(f"{cell}_concat[{j}]: node {idx} is listed twice")
                seen.add(idx)
        if problems:
            raise ValueError("; ".join(problems))
        return self

    # ---- views -------------------------------------------------------------------------------

    def cell(self, cell: CellName) -> tuple[tuple[str, int], ...]:
        return getattr(self, _cell_name(cell))

    def concat(self, cell: CellName) -> tuple[int, ...]:
        return getattr(self, f"{_cell_name(cell)}_concat")

    def steps(self, cell: CellName = "normal") -> int:
        """Number of intermediate nodes of ``cell`` (DARTS calls it ``steps``)."""
        return len(self.cell(cell)) // 2

    @property
    def nodes(self) -> int:
        """Intermediate nodes of the normal cell (4 for DARTS-style cells, 5 for NASNet/AmoebaNet).

        The reduction cell may differ: use ``steps("reduce")``.
        """
        return self.steps("normal")

    def edges(self, cell: CellName) -> list[Edge]:
        return [
            Edge(node=i // 2 + 2, input=src, op=op) for i, (op, src) in enumerate(self.cell(cell))
        ]

    @property
    def ops_used(self) -> tuple[str, ...]:
        """Distinct op names of both cells, in the space's op order."""
        used = {op for cell in CELLS for op, _ in self.cell(cell)}
        return tuple(op for op in SPACES[self.space].ops if op in used)

    # ---- serialisation -----------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (lists, not tuples); provenance fields only when set."""
        return self.model_dump(mode="json", exclude_none=True)

    def to_json(self) -> str:
        """Pretty JSON, one ``[op, input]`` pair per line, with a trailing newline."""
        data = self.to_dict()
        lines = []
        for key, value in data.items():
            if key in CELLS:
                pairs = ",\n".join(f"    {json.dumps(p)}" for p in value)
                text = f"[\n{pairs}\n  ]" if value else "[]"
            else:
                text = json.dumps(value, ensure_ascii=False)
            lines.append(f"  {json.dumps(key)}: {text}")
        return "{\n" + ",\n".join(lines) + "\n}\n"

    @classmethod
    def from_json(cls, text: str | bytes, *, origin: str = "<genotype>") -> Genotype:
        """Parse JSON text; any problem is one :class:`UserInputError` line naming ``origin``."""
        if not (text.strip() if isinstance(text, str) else text.strip(b"\xef\xbb\xbf \t\r\n")):
            raise UserInputError(f"{origin}: empty; expected a genotype JSON object")
        try:
            data = load_json(text, where=origin, max_bytes=MAX_TEXT_BYTES, label="not valid JSON")
        except UserInputError as exc:
            if _looks_like_darts(text):
                raise UserInputError(
                    f"{exc}; it looks like a DARTS Python genotype: convert it with `bats genotype import`"
                ) from None
            raise
        return cls.from_dict(data, origin=origin)

    @classmethod
    def from_dict(cls, data: Any, *, origin: str = "<genotype>") -> Genotype:
        """Validate already-parsed data; errors become one :class:`UserInputError` line."""
        if not isinstance(data, dict):
            raise UserInputError(
                f"{origin}: expected a JSON object with keys {', '.join(_REQUIRED)}; "
                f"got {_json_type(data)}"
            )
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise UserInputError(
                f"{origin}: {format_validation_error(exc, allowed=cls.model_fields)}"
            ) from None

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write :meth:`to_json` atomically (temp file in the same directory + ``os.replace``)."""
        if Path(path).is_dir():
            raise UserInputError(f"{path}: is a directory")
        return atomic_write_text(path, self.to_json())

    def to_darts(self) -> str:
        """The DARTS code's Python repr, e.g. to paste into a DARTS ``genotypes.py``."""

        def pairs(cell: CellName) -> str:
            return "[" + ", ".join(f"({op!r}, {src})" for op, src in self.cell(cell)) + "]"

        return (
            f"Genotype(normal={pairs('normal')}, normal_concat={list(self.normal_concat)}, "
            f"reduce={pairs('reduce')}, reduce_concat={list(self.reduce_concat)})"
        )


_REQUIRED = ("name", "space", "normal", "normal_concat", "reduce", "reduce_concat")


def _cell_name(cell: str) -> CellName:
    if cell not in CELLS:
        raise ValueError(f"cell must be 'normal' or 'reduce', not {cell!r}")
    return cell  # type: ignore[return-value]


def _looks_like_darts(text: str | bytes) -> bool:
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    return text.lstrip().startswith(("Genotype(", "Genotype (")) or "= Genotype(" in text


def _json_type(value: Any) -> str:
    names = {
        list: "an array",
        str: "a string",
        bool: "a boolean",
        int: "a number",
        float: "a number",
    }
    if value is None:
        return "null"
    return names.get(type(value), type(value).__name__)


def load_genotype(path: str | os.PathLike[str]) -> Genotype:
    """Read and validate a genotype JSON file; every failure is one :class:`UserInputError` line."""
    p = Path(path)
    name = str(path)
    if not exists(p):
        raise UserInputError(f"{name}: no such file")
    if p.is_dir():
        raise UserInputError(f"{name}: is a directory; expected a genotype .json file")
    from bats_cli.core.sniff import sniff, wrong_file

    found = sniff(p)
    if found.is_checkpoint or found.kind in ("safetensors", "onnx"):
        raise UserInputError(wrong_file(name, found, "a genotype JSON file"))
    raw = read_bounded(p, MAX_TEXT_BYTES, what="a genotype file")
    return Genotype.from_json(raw, origin=name)


def genotype_json_schema() -> dict[str, Any]:
    """JSON Schema (draft 2020-12) of a genotype file; op names are those of all spaces."""
    schema = Genotype.model_json_schema()
    all_ops = list(dict.fromkeys(op for space in SPACES.values() for op in space.ops))
    for cell in CELLS:
        op_item = schema["properties"][cell]["items"]["prefixItems"][0]
        op_item["enum"] = all_ops
        op_item["description"] = "Op name; must belong to the genotype's space."
        schema["properties"][cell]["items"]["prefixItems"][1].update(
            minimum=0, description="Input: 0, 1 = cell inputs; 2.. = earlier intermediate nodes."
        )
        schema["properties"][f"{cell}_concat"]["items"]["minimum"] = 2
    ops_by_space = "; ".join(f"{n}: {', '.join(s.ops)}" for n, s in SPACES.items())
    schema["description"] = (
        "A BATS/DARTS cell genotype. Entries 2k and 2k+1 of a cell are the two inputs of "
        "intermediate node k (numbered k+2); node k may read inputs 0..k+1. Ops per space: "
        + ops_by_space
    )
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", **schema}
