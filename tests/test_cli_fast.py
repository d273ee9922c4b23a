"""The CLI answers --help, --version and `genotype list` without importing torch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # a Python subprocess per command line

ROOT = Path(__file__).resolve().parents[1]

PROBE = """
import sys
from bats_cli.cli import main
try:
    main(sys.argv[1:])
except SystemExit as exc:
    assert exc.code in (0, None), exc.code
sys.stderr.write("\\nTORCH_LOADED=%s\\n" % ("torch" in sys.modules))
"""


def _run(*argv: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "120"}
    return subprocess.run([sys.executable, "-c", PROBE, *argv], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=120)


COMMANDS = ["search", "derive", "flops", "train", "binarize", "eval", "report", "genotype"]


@pytest.mark.parametrize("argv", [
    ["--help"], ["-h"], ["--version"], ["genotype", "list"], ["genotype", "list", "--json"],
    *[[c, "--help"] for c in COMMANDS], ["genotype", "show", "-h"],
])
def test_no_torch_import(argv):
    proc = _run(*argv)
    assert proc.returncode == 0, proc.stderr
    assert "TORCH_LOADED=False" in proc.stderr, (argv, proc.stderr)
    if "--help" in argv or "-h" in argv:
        # Value names, not typer's raw type placeholders.
        raw = [tok for tok in ("<bool>", "<str>", "<int", "<float", "<dir>", "<path>") if tok in proc.stdout]
        assert not raw, (argv, raw)
    if argv == ["--version"]:
        assert proc.stdout.startswith("bats ")
    if argv[-1] == "--json":
        rows = json.loads(proc.stdout)
        assert {"bats_c10", "darts_v2"} <= {r["name"] for r in rows}
        assert all(set(r) == {"name", "space", "nodes", "source"} for r in rows)
