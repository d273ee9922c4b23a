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

# Bottom-up; a module may import from its layer and the layers below. Keep in step with
# docs/ARCHITECTURE.md. A module missing here fails test_every_module_has_a_layer.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("foundation", ("bats_cli", "bats_cli.errors", "bats_cli.names", "bats_cli.metadata",
                    "bats_cli.outputs", "bats_cli.preflight", "bats_cli.spaces", "bats_cli.archs", "bats_cli.genotype",
                    "bats_cli.darts_import", "bats_cli.zoo",
                    "bats_cli.memory", "bats_cli.config", "bats_cli.presets", "bats_cli.fileio", "bats_cli.provenance",
                    "bats_cli.runtime", "bats_cli.signals", "bats_cli.rundir", "bats_cli.runlock",
                    "bats_cli.progress", "bats_cli.checkpoint", "bats_cli.optim_state", "bats_cli.sniff",
                    "bats_cli.distributed", "bats_cli.schedule", "bats_cli.stats", "bats_cli.data*")),
    ("binary layers and ops", ("bats_cli.quant", "bats_cli.ops")),
    ("networks and supernet", ("bats_cli.networks", "bats_cli.resnet", "bats_cli.mixed_op*",
                               "bats_cli.supernet")),
    ("counting, model I/O, derivation", ("bats_cli.counting", "bats_cli.registry", "bats_cli.summary", "bats_cli.pack", "bats_cli.modelio",
                                         "bats_cli.derive", "bats_cli.random_genotypes", "bats_cli.plot", "bats_cli.engine*",
                                         "bats_cli.search_health", "bats_cli.cell_similarity")),
    ("run loop and evaluation", ("bats_cli.runloop", "bats_cli.evaluate", "bats_cli.export",
                                 "bats_cli.onnx_eval", "bats_cli.plan",
                                 "bats_cli.plan_measure", "bats_cli.plan_cache",
                                 "bats_cli.distill", "bats_cli.fit", "bats_cli.longrun")),
    ("pipeline stages", ("bats_cli.search", "bats_cli.search_config", "bats_cli.searcher",
                         "bats_cli.search_records", "bats_cli.train", "bats_cli.binarize",
                         "bats_cli.report", "bats_cli.report_run", "bats_cli.report_panels",
                         "bats_cli.selection")),
    ("studies", ("bats_cli.study_catalog", "bats_cli.study_jobs", "bats_cli.study_compare", "bats_cli.study_summary",
                 "bats_cli.study_run", "bats_cli.study_publish")),
    ("command line", ("bats_cli.cli*", "bats_cli.__main__")),
]


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
