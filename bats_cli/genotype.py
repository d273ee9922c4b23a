"""Cell genotypes (§3): which op connects which inputs inside the normal and the reduction cell.

The shape is the DARTS convention, so genotypes printed by DARTS-style code can be pasted here::

    {"name": "darts_v2", "space": "darts",
     "normal": [["sep_conv_3x3", 0], ["sep_conv_3x3", 1], ...], "normal_concat": [2, 3, 4, 5],
     "reduce": [["max_pool_3x3", 0], ...], "reduce_concat": [2, 3, 4, 5]}

Entries ``2k`` and ``2k+1`` of a cell are the two incoming edges of intermediate node ``k``; an
edge ``[op, i]`` applies ``op`` to input ``i``, where 0 and 1 are the cell's two inputs (the
outputs of the two previous cells) and ``i >= 2`` is intermediate node ``i - 2``. The cell's
output concatenates the nodes listed in ``*_concat`` (node indices, so ``>= 2``).

Nothing here ever evaluates user text: JSON goes through :mod:`json`, and DARTS Python reprs
through :mod:`ast` with only literals and ``range(...)`` accepted.
"""

from __future__ import annotations

import ast
import json
import os
import re
import tempfile
from importlib import resources
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

from bats_cli.archs import MODELS, model_key, not_cells
from bats_cli.errors import RunFailure, UserInputError
from bats_cli.names import exists, has_control_chars
from bats_cli.spaces import SPACES

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


def _short_int(value: int) -> str:
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
        description="Search space whose op names the cells use (see bats_cli.spaces)."
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
                    problems.append(f"{cell}[{i}]: input {_short_int(src)} is far out of range")
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
                        f"{cell}_concat[{j}]: {_short_int(idx)} is not a node of the {cell} cell; "
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
        if isinstance(text, bytes):
            try:
                text = text.decode("utf-8-sig")
            except UnicodeDecodeError:
                raise UserInputError(
                    f"{origin}: not a UTF-8 text file; expected genotype JSON"
                ) from None
        if not text.strip():
            raise UserInputError(f"{origin}: empty; expected a genotype JSON object")
        try:
            data = json.loads(
                text, object_pairs_hook=_no_duplicate_keys, parse_constant=_reject_constant
            )
        except json.JSONDecodeError as exc:
            hint = ""
            if text.lstrip().startswith(("Genotype(", "Genotype (")) or "= Genotype(" in text:
                hint = (
                    "; it looks like a DARTS Python genotype: "
                    "convert it with `bats genotype import`"
                )
            raise UserInputError(
                f"{origin}: not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg}){hint}"
            ) from None
        except (_JSONShapeError, RecursionError) as exc:
            raise UserInputError(f"{origin}: not valid genotype JSON ({exc})") from None
        except ValueError:
            # json refuses integers past Python's int-to-string digit limit with a bare ValueError.
            raise UserInputError(
                f"{origin}: not valid genotype JSON (a number with thousands of digits)"
            ) from None
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
            raise UserInputError(f"{origin}: {format_validation_error(exc)}") from None

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write :meth:`to_json` atomically (temp file in the same directory + ``os.replace``)."""
        return _atomic_write_text(Path(path), self.to_json())

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


class _JSONShapeError(ValueError):
    pass


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _JSONShapeError(f"duplicate key {key!r}")
        out[key] = value
    return out


def _reject_constant(name: str) -> Any:
    raise _JSONShapeError(f"{name} is not allowed")


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


def _format_loc(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def format_validation_error(exc: ValidationError) -> str:
    """Collapse pydantic's multi-line report into ``field: message; field: message``."""
    parts = []
    for err in exc.errors(include_url=False):
        loc = _format_loc(tuple(err.get("loc", ())))
        kind = err.get("type", "")
        msg = str(err.get("msg", "invalid"))
        if kind == "value_error":
            # Our own validator already names the field inside the message.
            msg = msg.removeprefix("Value error, ")
            parts.append(msg if not loc else f"{loc}: {msg}")
            continue
        if kind == "extra_forbidden":
            msg = f"unknown field; allowed: {', '.join(Genotype.model_fields)}"
        elif kind == "missing":
            msg = "required field is missing"
        elif "input" in err and kind not in ("string_too_short",):
            shown = json.dumps(err["input"], ensure_ascii=False, default=str)
            if len(shown) > 60:
                shown = shown[:57] + "..."
            msg = f"{msg} (got {shown})"
        parts.append(f"{loc}: {msg}" if loc else msg)
    return "; ".join(p.replace("\n", " ") for p in parts)


def load_genotype(path: str | os.PathLike[str]) -> Genotype:
    """Read and validate a genotype JSON file; every failure is one :class:`UserInputError` line."""
    p = Path(path)
    name = str(path)
    if not exists(p):
        hint = ""
        if p.suffix == ".json" and p.stem in zoo_names():
            hint = f" (the bundled genotype of that name is available as `{p.stem}`)"
        raise UserInputError(f"{name}: no such file{hint}")
    if p.is_dir():
        raise UserInputError(f"{name}: is a directory; expected a genotype .json file")
    from bats_cli.sniff import sniff, wrong_file

    found = sniff(p)
    if found.is_checkpoint or found.kind in ("safetensors", "onnx"):
        raise UserInputError(wrong_file(name, found, "a genotype JSON file"))
    raw = read_bounded(p, MAX_TEXT_BYTES, what="a genotype file")
    return Genotype.from_json(raw, origin=name)


def read_bounded(path: str | os.PathLike[str], limit: int, *, what: str) -> bytes:
    """At most ``limit`` bytes of a regular file; larger files, FIFOs and devices are refused.

    Bounded by the bytes actually read, not by ``stat().st_size`` (which devices and /proc
    report as 0); non-regular files are refused before they are opened (a FIFO would block).
    """
    import stat as stat_

    p = Path(path)
    try:
        st = os.stat(p)
    except OSError as exc:
        raise UserInputError(f"{p}: cannot read ({exc.strerror or exc})") from None
    if not stat_.S_ISREG(st.st_mode):
        raise UserInputError(f"{p}: not a regular file (a FIFO, device or socket); expected {what}")
    try:
        with open(p, "rb") as fh:
            raw = fh.read(limit + 1)
    except OSError as exc:
        raise UserInputError(f"{p}: cannot read ({exc.strerror or exc})") from None
    if len(raw) > limit:
        raise UserInputError(f"{p}: more than {limit:,} bytes is far too large for {what}")
    return raw


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


# ---- DARTS Python repr -----------------------------------------------------------------------


def parse_darts_genotype(
    text: str,
    *,
    space: str | None = None,
    name: str | None = None,
    pick: str | None = None,
    source: str | None = None,
    notes: str | None = None,
) -> Genotype:
    """Parse a genotype written the DARTS way, without evaluating anything.

    Accepts ``Genotype(normal=[('sep_conv_3x3', 1), ...], normal_concat=[2, 3, 4, 5],
    reduce=[...], reduce_concat=range(2, 6))`` (keywords or positional, in that order), also as
    ``NAME = Genotype(...)`` or a whole DARTS ``genotypes.py`` (then ``pick`` selects ``NAME``;
    other statements are ignored, never run). Only literals and ``range(a, b[, c])`` are
    accepted inside; cells may also be nested per node (``[[(op, i), (op, j)], ...]``).
    ``space`` defaults to the one whose ops the cells use (``darts`` when both fit).
    """
    if len(text.encode("utf-8", "replace")) > MAX_TEXT_BYTES:
        raise UserInputError("DARTS genotype text is far too large")
    try:
        tree = ast.parse(text.strip(), mode="exec")
    except (SyntaxError, ValueError) as exc:
        if isinstance(exc, SyntaxError):
            where = f" (line {exc.lineno})" if exc.lineno else ""
            reason = exc.msg
        else:
            where, reason = "", str(exc)
        raise UserInputError(f"DARTS genotype: not valid Python syntax{where}: {reason}") from None
    except (RecursionError, MemoryError):
        raise UserInputError("DARTS genotype: text is nested too deeply") from None

    call, found_name = _find_genotype_call(tree, pick)
    try:
        fields = _call_fields(call)
        cells = {c: _pairs(fields[c], c) for c in CELLS}
        concats = {c: _int_list(fields[f"{c}_concat"], f"{c}_concat") for c in CELLS}
    except RecursionError:
        raise UserInputError("DARTS genotype: text is nested too deeply") from None

    if space is None:
        used = {op for c in CELLS for op, _ in cells[c]}
        fits = [s for s in ("darts", "bats") if used <= set(SPACES[s].ops)]
        if not fits:
            unknown = sorted(used - set(SPACES["darts"].ops) - set(SPACES["bats"].ops))
            raise UserInputError(
                f"DARTS genotype: op(s) {', '.join(map(repr, unknown))} belong to no known space; "
                f"bats: {', '.join(SPACES['bats'].ops)}; darts: {', '.join(SPACES['darts'].ops)}"
            )
        space = fits[0]
    elif space not in SPACES:
        raise UserInputError(f"unknown search space {space!r}; choose one of: {', '.join(SPACES)}")

    data: dict[str, Any] = {
        "name": name or (found_name.lower() if found_name else "imported"),
        "space": space,
        "normal": cells["normal"],
        "normal_concat": concats["normal"],
        "reduce": cells["reduce"],
        "reduce_concat": concats["reduce"],
    }
    if source is not None:
        data["source"] = source
    if notes is not None:
        data["notes"] = notes
    return Genotype.from_dict(data, origin="DARTS genotype")


def _is_genotype_call(node: ast.AST) -> bool:
    if not isinstance(node, ast.Call):
        return False
    func = node.func
    return (isinstance(func, ast.Name) and func.id == "Genotype") or (
        isinstance(func, ast.Attribute) and func.attr == "Genotype"
    )


def _find_genotype_call(tree: ast.Module, pick: str | None) -> tuple[ast.Call, str | None]:
    named: dict[str, ast.Call] = {}
    aliases: dict[str, str] = {}
    bare: list[ast.Call] = []
    for stmt in tree.body:
        if isinstance(stmt, ast.Expr) and _is_genotype_call(stmt.value):
            bare.append(stmt.value)  # type: ignore[arg-type]
        elif (
            isinstance(stmt, ast.Assign)
            and len(stmt.targets) == 1
            and isinstance(stmt.targets[0], ast.Name)
        ):
            target = stmt.targets[0].id
            if _is_genotype_call(stmt.value):
                named[target] = stmt.value  # type: ignore[assignment]
            elif isinstance(stmt.value, ast.Name):
                aliases[target] = stmt.value.id  # `DARTS = DARTS_V2`

    if pick is not None:
        seen = set()
        key = pick
        while key in aliases and key not in named and key not in seen:
            seen.add(key)
            key = aliases[key]
        if key not in named:
            available = ", ".join(sorted(named)) or "none"
            raise UserInputError(
                f"DARTS genotype: no `{pick} = Genotype(...)` found; available: {available}"
            )
        return named[key], pick
    candidates: list[tuple[ast.Call, str | None]] = [(c, None) for c in bare]
    candidates += [(c, n) for n, c in named.items()]
    if not candidates:
        if len(tree.body) == 1 and isinstance(tree.body[0], (ast.Expr, ast.Assign)):
            # A single pasted expression that is not Genotype(...): quote it back.
            snippet = _snippet(tree.body[0].value)
            raise UserInputError(
                f"DARTS genotype: `{snippet}` is not Genotype(normal=[...], normal_concat=[...], "
                "reduce=[...], reduce_concat=[...]) (the text is parsed, never evaluated)"
            )
        raise UserInputError(
            "DARTS genotype: no `Genotype(normal=[...], normal_concat=[...], reduce=[...], "
            "reduce_concat=[...])` found"
        )
    if len(candidates) > 1:
        names = ", ".join(n for _, n in candidates if n) or f"{len(candidates)} unnamed"
        raise UserInputError(
            f"DARTS genotype: the text holds several genotypes ({names}); "
            "pick one by name (--pick NAME)"
        )
    return candidates[0]


def _call_fields(call: ast.Call) -> dict[str, ast.AST]:
    order = ("normal", "normal_concat", "reduce", "reduce_concat")
    if len(call.args) > len(order) or any(isinstance(a, ast.Starred) for a in call.args):
        raise UserInputError(
            "DARTS genotype: Genotype(...) takes normal, normal_concat, reduce, reduce_concat"
        )
    fields: dict[str, ast.AST] = dict(zip(order, call.args, strict=False))
    for kw in call.keywords:
        if kw.arg is None:
            raise UserInputError("DARTS genotype: `**` arguments are not allowed")
        if kw.arg not in order:
            raise UserInputError(
                f"DARTS genotype: unknown argument {kw.arg!r}; expected {', '.join(order)}"
            )
        if kw.arg in fields:
            raise UserInputError(f"DARTS genotype: {kw.arg} given twice")
        fields[kw.arg] = kw.value
    missing = [k for k in order if k not in fields]
    if missing:
        raise UserInputError(f"DARTS genotype: missing {', '.join(missing)}")
    return fields


def _literal(node: ast.AST, where: str) -> Any:
    """Value of a literal node; ``range(...)`` is the only call allowed. Never evaluates code."""
    if isinstance(node, ast.Constant) and type(node.value) is int:
        return _bounded_int(node.value, where)
    if isinstance(node, ast.Constant) and type(node.value) is str:
        return node.value
    if (
        isinstance(node, ast.UnaryOp)
        and isinstance(node.op, ast.USub)
        and isinstance(node.operand, ast.Constant)
        and type(node.operand.value) is int
    ):
        return -_bounded_int(node.operand.value, where)
    if isinstance(node, (ast.List, ast.Tuple)):
        return [_literal(e, where) for e in node.elts]
    if (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Name)
        and node.func.id in ("range", "list", "tuple")
        and not node.keywords
    ):
        args = [_literal(a, where) for a in node.args]
        if node.func.id == "range" and 1 <= len(args) <= 3 and all(type(a) is int for a in args):
            if len(args) == 3 and args[2] == 0:
                raise UserInputError(f"DARTS genotype: {where}: range() step must not be zero")
            values = range(*args)  # bounds are at most MAX_INDEX: len() cannot overflow
            if len(values) > 1000:
                raise UserInputError(f"DARTS genotype: {where}: range too long")
            return list(values)
        if node.func.id in ("list", "tuple") and len(args) == 1 and isinstance(args[0], list):
            return args[0]
    raise UserInputError(
        f"DARTS genotype: {where}: `{_snippet(node)}` is not a literal; only strings, integers, "
        "lists/tuples and range(a, b) are accepted (nothing is evaluated)"
    )


def _bounded_int(value: int, where: str) -> int:
    # Hexadecimal literals escape Python's digit limit: 0xfff... can be any size.
    if abs(value) > MAX_INDEX:
        raise UserInputError(
            f"DARTS genotype: {where}: {_short_int(value)} is far too large for a node index"
        )
    return value


def _snippet(node: ast.AST, limit: int = 60) -> str:
    try:
        text = ast.unparse(node)
    except (ValueError, RecursionError):  # a huge hexadecimal literal, a deep nesting
        return "that expression"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _pairs(node: ast.AST, where: str) -> list[list[Any]]:
    value = _literal(node, where)
    if not isinstance(value, list):
        raise UserInputError(f"DARTS genotype: {where}: expected a list of (op, input) pairs")
    flat: list[Any] = []
    for item in value:
        # Some DARTS derivatives nest the two edges of each node: [[(op, i), (op, j)], ...].
        if isinstance(item, list) and item and all(isinstance(e, list) for e in item):
            flat.extend(item)
        else:
            flat.append(item)
    for i, pair in enumerate(flat):
        if not (
            isinstance(pair, list)
            and len(pair) == 2
            and isinstance(pair[0], str)
            and type(pair[1]) is int
        ):
            raise UserInputError(
                f"DARTS genotype: {where}[{i}]: expected an (op, input) pair "
                f"like ('sep_conv_3x3', 1), got {_short_repr(pair)}"
            )
    return flat


def _short_repr(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _int_list(node: ast.AST, where: str) -> list[int]:
    value = _literal(node, where)
    if not (isinstance(value, list) and all(type(v) is int for v in value)):
        raise UserInputError(
            f"DARTS genotype: {where}: expected a list of node indices or range(a, b)"
        )
    return value


# ---- the bundled zoo ---------------------------------------------------------------------------

_ZOO_PACKAGE_DIR = "genotypes"
_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]+$")


def _zoo_dir() -> Any:
    return resources.files("bats_cli").joinpath(_ZOO_PACKAGE_DIR)


def zoo_names() -> list[str]:
    """Names of the genotypes shipped with the package (``bats_cli/genotypes/*.json``)."""
    try:
        entries = list(_zoo_dir().iterdir())
    except (FileNotFoundError, NotADirectoryError):
        return []
    return sorted(e.name[: -len(".json")] for e in entries if e.name.endswith(".json"))


def load_zoo_genotype(name: str) -> Genotype:
    key = name.strip().lower().replace("-", "_")
    if key.endswith(".json"):
        key = key[: -len(".json")]
    names = zoo_names()
    if not _NAME_RE.match(key) or key not in names:
        raise UserInputError(
            f"{name!r} is not a bundled genotype; available: {', '.join(names) or 'none'}"
        )
    text = _zoo_dir().joinpath(f"{key}.json").read_text(encoding="utf-8")
    return Genotype.from_json(text, origin=f"bundled genotype {key}")


def resolve_genotype(arg: str | os.PathLike[str]) -> Genotype:
    """A genotype from a ``.json`` path or a bundled name (``bats_c10``, ``darts_v2``, ...)."""
    found = resolve_network(arg)
    if isinstance(found, str):
        raise not_cells(found, f"{os.fspath(arg)!r} names the {MODELS[found]}")
    return found


def resolve_network(arg: str | os.PathLike[str]) -> Genotype | str:
    """What ``bats train`` / ``bats flops`` accept: a genotype (path or bundled name), or the name
    of a fixed model (``resnet18``; see :mod:`bats_cli.archs`), returned as that name."""
    model = model_key(arg)
    if model is not None:
        return model
    text = os.fspath(arg)
    p = Path(text)
    looks_like_path = p.suffix.lower() == ".json" or os.sep in text or "/" in text
    if looks_like_path or exists(p):
        return load_genotype(p)
    key = text.strip().lower().replace("-", "_")
    if key in zoo_names():
        return load_zoo_genotype(key)
    raise UserInputError(
        f"{text!r} is neither a genotype file nor a bundled genotype (nor a model); bundled: "
        f"{', '.join(zoo_names()) or 'none'} (see `bats genotype list`); models: {', '.join(MODELS)}"
    )


def _atomic_write_text(path: Path, text: str) -> Path:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.is_dir():
            raise UserInputError(f"{path}: is a directory")
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as fh:
                fh.write(text)
                fh.flush()
                os.fsync(fh.fileno())
            # mkstemp files are 0600; give the result the usual umask-derived mode.
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)
            os.replace(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
    except OSError as exc:
        raise RunFailure(f"{path}: cannot write ({exc.strerror or exc})") from None
    return path
