"""Docs cannot drift: every figure quoted in README.md / docs with a fig marker is what `bats` prints."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _tool():
    spec = importlib.util.spec_from_file_location("doc_figures", ROOT / "tools" / "doc_figures.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quoted_figures_match_the_commands(one_thread):
    tool = _tool()
    texts = {name: (ROOT / name).read_text(encoding="utf-8") for name in tool.DOCS}
    quoted = [(name, key, value) for name, text in texts.items() for key, value in tool.figures(text)]
    assert len(quoted) >= 15  # the README cost table and docs/flops.md's Table 6 rows
    values = tool.compute({key for _, key, _ in quoted})
    stale = [f"{name}: {key} quotes {value!r}, bats prints {values[key]!r}"
             for name, key, value in quoted if value != values[key]]
    assert not stale, "run `python tools/doc_figures.py`: " + "; ".join(stale)


def test_a_changed_figure_is_caught(tmp_path, monkeypatch):
    tool = _tool()
    (tmp_path / "README.md").write_text("x <!--fig:darts_v2_real.params_exact-->3,349,343<!--/fig--> y\n")
    monkeypatch.setattr(tool, "ROOT", tmp_path)
    monkeypatch.setattr(tool, "DOCS", ("README.md",))
    assert tool.main(["--check"]) == 1
    assert tool.main([]) == 0
    assert "3,349,342" in (tmp_path / "README.md").read_text()
    assert tool.main(["--check"]) == 0


def _study_docs():
    spec = importlib.util.spec_from_file_location("study_docs", ROOT / "tools" / "study_docs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_study_sections_are_their_results(tmp_path, monkeypatch):
    tool = _study_docs()
    assert tool.main(["--check"]) == 0, "run `python tools/study_docs.py`"
    # A figure edited by hand in a study section is caught and rewritten from results.json.
    doc = (ROOT / tool.DOC).read_text(encoding="utf-8")
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "ablations").symlink_to(ROOT / "docs" / "ablations")
    begin = doc.index("<!-- random-study:begin -->")
    assert "0.964" in doc[begin:] and "0.111" not in doc
    (tmp_path / tool.DOC).write_text(doc[:begin] + doc[begin:].replace("0.964", "0.111", 1), encoding="utf-8")
    monkeypatch.setattr(tool, "ROOT", tmp_path)
    assert tool.main(["--check"]) == 1
    assert tool.main([]) == 0
    assert (tmp_path / tool.DOC).read_text(encoding="utf-8").count("0.111") == 0
    assert tool.main(["--check"]) == 0
