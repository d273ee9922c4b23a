"""The package's shape (docs/ARCHITECTURE.md): no import cycles, and every module imports only
from its own layer or the layers below it, so the package reads bottom-up.

Imports inside functions count too: a lazy import is still a dependency.
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "bats_cli"

# Bottom-up; a module may import from its layer and the layers below. Each layer is one or more
# subpackages (docs/ARCHITECTURE.md has the same table). A module outside them fails
# test_every_module_has_a_layer.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("core", ("bats_cli", "bats_cli.core*")),
    ("foundation", ("bats_cli.utils*", "bats_cli.storage*", "bats_cli.data*")),
    ("binary layers", ("bats_cli.layers*",)),
    ("models", ("bats_cli.models*", "bats_cli.engine*")),
    ("training", ("bats_cli.training*",)),
    ("stages", ("bats_cli.nas*", "bats_cli.pipeline*")),
    ("studies", ("bats_cli.studies*",)),
    ("command line", ("bats_cli.cli*", "bats_cli.__main__")),
]
# Packages whose modules are listed one by one in docs/ARCHITECTURE.md; the others are one row.
LISTED = ("core", "utils", "storage", "layers", "models", "training", "nas", "pipeline", "studies")
DOC = PACKAGE.parent / "docs" / "ARCHITECTURE.md"


def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """bats_cli modules that ``path`` imports (a name imported from a package counts as its
    submodule when one has that name)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    this = _module_name(path)
    package = this if path.name == "__init__.py" else this.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        for name in names:
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name and name != this:
                found.add(name)
    return found


@functools.cache  # parsed once per session: every parametrized test reads the same graph
def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(path, modules) for name, path in modules.items()}


def _layer(name: str) -> int | None:
    for i, (_, patterns) in enumerate(LAYERS):
        for pattern in patterns:
            if pattern.endswith("*"):
                root = pattern[:-1]
                if name == root or name.startswith(root + "."):
                    return i
            elif name == pattern:
                return i
    return None


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path ``[a, b, ..., a]``, or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_no_import_cycles():
    graph = _graph()
    # A package's __init__ re-exporting its submodules is not a cycle with them: Python loads
    # the package first either way.
    for name in graph:
        graph[name] = {d for d in graph[name] if not name.startswith(d + ".")}
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_every_module_has_a_layer():
    missing = [name for name in _modules() if _layer(name) is None]
    assert not missing, f"add these modules to LAYERS (and docs/ARCHITECTURE.md): {missing}"


@pytest.mark.parametrize("name", sorted(_modules()))
def test_imports_only_from_its_layer_or_below(name):
    graph = _graph()
    own = _layer(name)
    if own is None:
        pytest.skip("no layer (reported by test_every_module_has_a_layer)")
    upward = sorted(d for d in graph[name] if (_layer(d) or 0) > own)
    assert not upward, f"{name} ({LAYERS[own][0]}) imports from a higher layer: " + ", ".join(
        f"{d} ({LAYERS[_layer(d)][0]})" for d in upward
    )


def test_core_imports_no_torch():
    """The domain types load without torch (the CLI's --help and genotype tools stay fast)."""
    import subprocess
    import sys

    names = sorted(n for n in _modules() if n.startswith("bats_cli.core"))
    code = "import sys\n" + "".join(f"import {n}\n" for n in names) + \
        "bad = sorted(m for m in sys.modules if m == 'torch' or m.startswith(('torch.', 'numpy')))\nprint(bad)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=PACKAGE.parent).stdout.strip()
    assert out == "[]", f"bats_cli.core imports {out}"


def _doc_rows() -> set[str]:
    """First-column entries of the module table in docs/ARCHITECTURE.md."""
    lines = DOC.read_text(encoding="utf-8").splitlines()
    start = lines.index("| module | owns | paper |")
    rows = set()
    for line in lines[start + 2:]:
        if not line.startswith("| `"):
            break
        rows.add(line.split("`")[1])
    return rows


def _tree_rows() -> set[str]:
    rows = set()
    for entry in sorted(PACKAGE.iterdir()):
        if entry.name.startswith(("_", ".")) or entry.name == "genotypes":
            continue
        if entry.is_dir() and entry.name in LISTED:
            for sub in sorted(entry.iterdir()):
                if sub.name.startswith(("_", ".")):
                    continue
                if sub.is_dir() and (sub / "__init__.py").exists():
                    rows.add(f"{entry.name}/{sub.name}/")
                elif sub.suffix == ".py":
                    rows.add(f"{entry.name}/{sub.name}")
        elif entry.is_dir() and (entry / "__init__.py").exists():
            rows.add(f"{entry.name}/")
    return rows


def test_the_module_table_in_the_docs_is_the_tree():
    doc, tree = _doc_rows(), _tree_rows()
    assert not tree - doc, f"add to docs/ARCHITECTURE.md's module table: {sorted(tree - doc)}"
    assert not doc - tree, f"docs/ARCHITECTURE.md lists what the tree does not have: {sorted(doc - tree)}"


def test_the_top_level_shows_the_layers():
    """`ls bats_cli/` is the layers: every library module lives in a layer package."""
    loose = sorted(p.name for p in PACKAGE.glob("*.py") if p.name not in ("__init__.py", "__main__.py"))
    assert not loose, f"modules outside a layer package: {loose}"
    packages = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").exists()}
    layered = {pat.split(".")[1].rstrip("*") for _, pats in LAYERS for pat in pats if pat.count(".") == 1}
    assert packages <= layered, f"packages with no layer: {sorted(packages - layered)}"
