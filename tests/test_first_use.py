"""A newcomer's first hour: `bats flops` takes every file the pipeline writes, and a file handed
to the wrong command hears what it is and which command takes it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from helpers import cli, one_line_error

# Smaller than --preset tiny (8 px, a handful of images), same commands.
_SMALL = ["--preset", "tiny", "--subset", "32", "--image-size", "8", "--batch-size", "8"]


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """search -> train -> binarize (+ packed artifact), each run through the CLI."""
    root = tmp_path_factory.mktemp("first-use")
    from bats_cli.cli import main

    def run(argv):
        try:
            main(argv)
        except SystemExit as exc:
            assert exc.code in (0, None), argv

    run(["search", *_SMALL, "--layers", "3,3", "--ops", "8,3", "--epochs", "1", "--warmup", "0",
         "--out", str(root / "search"), "-q"])
    run(["train", str(root / "search" / "genotype.json"), *_SMALL, "--epochs", "1",
         "--out", str(root / "train"), "-q"])
    run(["binarize", str(root / "train" / "last.safetensors"), "--preset", "tiny", "--subset", "32",
         "-o", str(root / "tiny.packed.safetensors"), "-q"])
    return root


@pytest.mark.parametrize("target, kind", [
    ("search/last.safetensors", "search"), ("search/stage1.safetensors", "search"), ("search", "search"),
    ("train/last.safetensors", "train"), ("train/best.safetensors", "train"), ("train", "train"),
    ("train/binarize/last.safetensors", "binarize"), ("train/binarize", "binarize"),
    ("tiny.packed.safetensors", "packed"),
])
def test_flops_takes_every_checkpoint_and_run_directory(pipeline, target, kind, capsys):
    code, out, err = cli(["flops", str(pipeline / target), "--json"], capsys)
    assert code == 0, err
    data = json.loads(out)
    assert data["params"] > 0 and data["bops"] > 0
    assert data["checkpoint"]["kind"] == kind


def test_flops_of_a_search_counts_its_genotype_in_the_evaluation_network(pipeline, capsys):
    code, out, err = cli(["flops", str(pipeline / "search"), "--json"], capsys)
    assert code == 0, err
    data = json.loads(out)
    genotype = json.loads((pipeline / "search" / "genotype.json").read_text())
    assert data["genotype"] == genotype["name"]
    # What `bats flops genotype.json` counts on the search's data set: the same network.
    code, out2, err = cli(["flops", str(pipeline / "search" / "genotype.json"), "--dataset",
                           "fashion-mini", "--json"], capsys)
    assert code == 0, err
    assert json.loads(out2)["params"] == data["params"]
    assert data["network"]["layers"] == 20  # not the supernet's 3,3 cells
    code, out, err = cli(["flops", str(pipeline / "search")], capsys)
    assert code == 0 and "is a search checkpoint: counted the evaluation network" in out


def test_flops_refuses_a_folder_that_is_not_a_run(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("x")
    code, _, err = cli(["flops", str(tmp_path)], capsys)
    one_line_error(code, err, "not a bats run directory")


@pytest.mark.parametrize("argv, needles", [
    (["eval", "{search}/genotype.json"], ["is a genotype JSON file", "not a bats checkpoint",
                                         "`bats train {search}/genotype.json`"]),
    (["train", "{train}/last.safetensors", "--preset", "tiny"],
     ["is a train checkpoint, not a genotype JSON file", "`bats binarize {train}/last.safetensors`",
      "`bats eval`"]),
    (["binarize", "{search}/last.safetensors"],
     ["is a search checkpoint; `bats binarize` expects a train checkpoint", "`bats derive"]),
    (["derive", "{train}/last.safetensors"],
     ["is a train checkpoint; `bats derive` expects a search checkpoint", "`bats binarize"]),
    (["eval", "{train}"], ["is a run directory", "{train}/last.safetensors"]),
    (["train", "{root}/tiny.packed.safetensors"], ["is a packed checkpoint, not a genotype", "`bats eval"]),
])
def test_wrong_files_say_what_they_are_and_which_command_takes_them(pipeline, argv, needles, capsys):
    subst = {"search": pipeline / "search", "train": pipeline / "train", "root": pipeline}
    argv = [a.format(**subst) for a in argv]
    code, _, err = cli(argv, capsys)
    line = one_line_error(code, err, *[n.format(**subst) for n in needles])
    assert "corrupt" not in line and "too large" not in line


@pytest.mark.slow
def test_an_onnx_file_is_recognised_under_any_name(pipeline, tmp_path, capsys):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    onnx_path = tmp_path / "tiny.onnx"
    code, _, err = cli(["export", str(pipeline / "tiny.packed.safetensors"), "-o", str(onnx_path)], capsys)
    assert code == 0, err
    renamed = tmp_path / "model.bin"
    shutil.copy(onnx_path, renamed)
    from bats_cli.core.sniff import sniff

    assert sniff(renamed).kind == "onnx"
    for argv in (["train", str(renamed)], ["flops", str(onnx_path)], ["derive", str(renamed)]):
        code, _, err = cli(argv, capsys)
        one_line_error(code, err, "is an ONNX model", "`bats eval")


def test_sniff_never_raises_and_tells_json_apart(tmp_path):
    from bats_cli.core.sniff import sniff

    (tmp_path / "g.json").write_text('{"name": "x", "normal": [], "reduce": []}')
    (tmp_path / "c.json").write_text('{"epochs": 3}')
    (tmp_path / "bad.safetensors").write_bytes(b"\xff" * 20)
    (tmp_path / "empty").write_bytes(b"")
    assert sniff(tmp_path / "g.json").kind == "genotype"
    assert sniff(tmp_path / "c.json").kind == "json"
    assert sniff(tmp_path / "bad.safetensors").kind == "unknown"
    assert sniff(tmp_path / "empty").kind == "unknown"
    assert sniff(tmp_path / "nope").kind == "missing"
    assert sniff(tmp_path).kind == "directory"


# --------------------------------------------------------------------------- bats report


@pytest.mark.slow
def test_report_has_one_titled_block_per_run_and_the_table(pipeline, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    from PIL import Image

    runs = [pipeline / "search", pipeline / "train", pipeline / "train" / "binarize"]
    code, out, err = cli(["report", *map(str, runs), "--out", str(tmp_path / "rep"), "--json"], capsys)
    assert code == 0, err
    manifest = json.loads(out)
    rows = {r["run"]: r for r in manifest["comparison"]}
    # binarize's default folder is named after its training run; its genotype and size are known.
    assert set(rows) == {"search", "train", "train-binarize"}
    assert rows["train-binarize"]["genotype"] == rows["train"]["genotype"]
    assert rows["train-binarize"]["params"] == rows["train"]["params"] > 0
    # The train run draws the cell the search derived (its genotype): not twice more.
    assert "search/cell" in manifest["panels"]
    assert "train/cell" not in manifest["panels"] and "train-binarize/cell" not in manifest["panels"]
    with Image.open(manifest["png"]) as im:
        assert 1000 <= im.width <= 2000 and im.height > 1500
    page = Path(manifest["html"]).read_text()
    assert "Its cell is search's, drawn above." in page


def test_report_axes_integer_epochs_no_offset_and_single_points(monkeypatch):
    plt = pytest.importorskip("matplotlib.pyplot")
    from bats_cli.studies import report_panels as report

    figures = []
    monkeypatch.setattr(report, "figure_png", lambda fig: figures.append(fig) or b"")
    rows = [{"epoch": 1, "train_loss": 1.0, "val_loss": 0.9999912, "lr": 8.1e-7}]
    run = report.Run(path=Path("x"), name="one", kind="binarize", config={}, record={}, rows=rows,
                     result=None)
    report._line_panel(plt, run, "loss", "loss", [("train_loss", "train"), ("val_loss", "validation")], "ce")
    ax = figures[-1].axes[0]
    assert "one point per curve" in ax.get_xlabel() and ax.get_title() == "one: loss"
    assert all(line.get_linestyle() == "None" and line.get_marker() == "o" for line in ax.get_lines())
    assert list(ax.get_xticks()) == [1.0]
    assert not ax.yaxis.get_major_formatter().get_useOffset()
    run.rows = [dict(rows[0], epoch=e, val_loss=0.99999 + e * 1e-6) for e in (1, 2, 3)]
    report._line_panel(plt, run, "loss", "loss", [("val_loss", "validation")], "ce")
    ax = figures[-1].axes[0]
    figures[-1].canvas.draw()
    assert all(float(t).is_integer() for t in ax.get_xticks())
    assert ax.get_lines()[0].get_linestyle() == "-"
    assert not any("+" in t.get_text() or "e-" in t.get_text() for t in ax.get_yticklabels())
    assert ax.yaxis.get_offset_text().get_text() == ""


# --------------------------------------------------------------------------- run directories


def test_a_folder_that_is_not_a_run_gets_one_consistent_answer(tmp_path, capsys):
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "notes.txt").write_text("mine")
    code, _, err = cli(["train", "bats_c10", "--preset", "tiny", "--out", str(junk)], capsys)
    line = one_line_error(code, err, "is not empty and holds no bats run (notes.txt)", "choose a new --out")
    assert "--resume" not in line
    code, _, err = cli(["train", "bats_c10", "--preset", "tiny", "--out", str(junk), "--resume"], capsys)
    line = one_line_error(code, err, "holds no bats run (notes.txt)", "a new --out without --resume")
    assert sorted(p.name for p in junk.iterdir()) == ["notes.txt"]


@pytest.mark.parametrize("argv", [
    ["train", "bats_c10", "--preset", "tiny", "--out", "{tmp}/model.packed.safetensors"],
    ["search", "--preset", "tiny", "--out", "{tmp}/genotype.json"],
])
def test_out_with_a_file_extension_is_refused(argv, tmp_path, capsys):
    code, _, err = cli([a.format(tmp=tmp_path) for a in argv], capsys)
    one_line_error(code, err, "looks like a file name", "-o names an output file")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("argv, needles", [
    (["train", "bats_c10", "--preset", "tiyn"], ["unknown preset 'tiyn'", "did you mean 'tiny'?"]),
    (["search", "--preset", "tyni"], ["did you mean 'tiny'?"]),
    (["binarize", "x.safetensors", "--preset", "smal"], ["did you mean 'small'?"]),
    (["eval", "x.safetensors", "--engine", "bitwize"], ["unknown engine 'bitwize'", "did you mean 'bitwise'?"]),
])
def test_bad_choices_are_refused_at_once_with_a_suggestion(argv, needles, capsys):
    # Refused while the command line is parsed, before the command imports torch.
    code, _, err = cli(argv, capsys)
    one_line_error(code, err, *needles)
