"""Import of genotypes written the DARTS way (``Genotype(normal=[('sep_conv_3x3', 1), ...], ...)``,
or a whole DARTS ``genotypes.py``): parsed with :mod:`ast`, only literals and ``range(...)``
accepted, nothing ever evaluated."""

from __future__ import annotations

import ast
from typing import Any

from bats_cli.core.errors import UserInputError
from bats_cli.core.genotype import CELLS, MAX_INDEX, MAX_TEXT_BYTES, Genotype, short_int
from bats_cli.core.spaces import SPACES


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
            f"DARTS genotype: {where}: {short_int(value)} is far too large for a node index"
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
