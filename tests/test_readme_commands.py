"""The README's command blocks run as written, and docs/pipeline.md's transcript is what the
tiny-pipeline block prints today (tools/doc_transcripts.py, with times and free memory masked)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _tool():
    spec = importlib.util.spec_from_file_location("doc_transcripts", ROOT / "tools" / "doc_transcripts.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def _has_export_extra() -> bool:
    return all(importlib.util.find_spec(m) is not None for m in ("onnx", "onnxruntime"))


def _check(ran, lines):
    """Every line ran and exited 0; lines needing the `export` extra are skipped without it."""
    assert [r.line for r in ran] == lines[:len(ran)]
    for r in ran:
        assert r.code == 0, f"`{r.line}` exited {r.code}: {r.err[-2000:]}"
    assert len(ran) == len(lines), f"stopped after `{ran[-1].line}`"


@pytest.fixture(scope="module")
def tiny_pipeline(tmp_path_factory):
    if not _has_export_extra():
        pytest.skip("the tiny-pipeline block ends with the export extra (onnx, onnxruntime)")
    tool = _tool()
    lines = tool.readme_blocks()["tiny-pipeline"]
    ran = tool.run_block(lines, tmp_path_factory.mktemp("tiny-pipeline"))
    return tool, lines, ran


def test_the_tiny_pipeline_block_runs_as_written(tiny_pipeline):
    _tool_, lines, ran = tiny_pipeline
    assert any(line.startswith("bats search --preset tiny") for line in lines)
    _check(ran, lines)


def test_pipeline_md_shows_what_the_tiny_pipeline_prints_today(tiny_pipeline):
    tool, _lines, ran = tiny_pipeline
    generated = tool.render(ran)
    text = (ROOT / "docs" / "pipeline.md").read_text(encoding="utf-8")
    quoted = tool.transcripts(text)["tiny-pipeline"]
    assert tool.normalize(quoted, "tiny-pipeline") == tool.normalize(generated, "tiny-pipeline"), (
        "run `python tools/doc_transcripts.py`: " + tool.first_difference(quoted, generated, "tiny-pipeline"))


@pytest.mark.timeout(900)
def test_the_cheat_sheet_runs_at_preset_tiny(tmp_path):
    """The cheat sheet's commands with `--preset tiny` (and fewer images) added to the long ones. Its search names
    the paper's data (`--dataset cifar10`, a download); here it runs on the tiny preset's data,
    `fashion-mini`, which ships inside the package."""
    if not _has_export_extra():
        pytest.skip("the cheat sheet exports to ONNX (the export extra: onnx, onnxruntime)")
    tool = _tool()
    lines = tool.readme_blocks()["cheat-sheet"]
    assert any("--dataset cifar10" in line for line in lines)
    (tmp_path / "genotypes").symlink_to(ROOT / "genotypes")  # commands run from the clone's root

    # Fewer images than the tiny preset's: the tiny-pipeline block above already runs the preset
    # as written; here the commands' flags and the files they pass on are what is checked.
    fewer = {"search": ["--subset", "128"], "train": ["--subset", "300"], "binarize": []}

    def at_preset_tiny(argv):
        argv = ["fashion-mini" if a == "cifar10" else a for a in argv]
        return [*argv, "--preset", "tiny", *fewer[argv[0]]] if argv[0] in fewer else argv

    _check(tool.run_block(lines, tmp_path, argv_edit=at_preset_tiny), lines)


def test_blocks_and_transcripts_are_found():
    tool = _tool()
    blocks = tool.readme_blocks()
    assert {"cheat-sheet", "tiny-pipeline"} <= set(blocks)
    assert "bats export runs/tiny.packed.safetensors -o tiny.onnx" in blocks["tiny-pipeline"]
    assert not any(line.startswith("pip") and "bats" in line for line in blocks["tiny-pipeline"])
    assert "tiny-pipeline" in tool.transcripts((ROOT / "docs" / "pipeline.md").read_text(encoding="utf-8"))
    # What the check masks is what depends on the machine, not the numbers a reader compares.
    a = "epoch 1/2  78/78 steps  0:46  loss=2.13 val_top1=50.4\ntime         107 s\n"
    b = "epoch 1/2  78/78 steps  1:02  loss=2.13 val_top1=50.4\ntime         56 s\n"
    assert tool.normalize(a) == tool.normalize(b)
    assert tool.normalize(a) != tool.normalize(a.replace("50.4", "50.6"))
    # A run that learns is compared by what it prints, not by what it learned (another CPU's
    # arithmetic derives another cell): numbers and (op, input) choices masked, wording kept.
    cell = "normal          skip_connect<1 avg_pool_3x3<0\n"
    learned = a + cell
    other_cpu = a.replace("50.4", "51.9") + cell.replace("avg_pool_3x3<0", "group_conv_5x5<2")
    assert tool.normalize(learned, "tiny-pipeline") == tool.normalize(other_cpu, "tiny-pipeline")
    reworded = learned.replace("val_top1", "top1")
    assert tool.normalize(learned, "tiny-pipeline") != tool.normalize(reworded, "tiny-pipeline")
    assert tool.normalize(learned) != tool.normalize(other_cpu)
