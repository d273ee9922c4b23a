"""The paper's data by default, the preflight plan, progress, reports, one vocabulary."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import cli, one_line_error

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """No network and an empty default data directory, whatever machine runs the tests."""
    from bats_cli.data import sources

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("BATS_DATA_DIR", raising=False)
    monkeypatch.setattr(sources, "_probe_network", lambda url: "no connection to the test host")
    monkeypatch.chdir(tmp_path)
    return tmp_path


# --------------------------------------------------------------------------- 1. paper data


def test_train_defaults_to_cifar10_and_offline_is_one_line(offline, capsys):
    code, _, err = cli(["train", "bats_c10", "--width", "2x"], capsys)
    line = one_line_error(code, err, "cifar10", "--data-dir", "--preset tiny", "fashion-mini")
    assert "Traceback" not in err and line
    assert not (offline / "runs").exists()  # a failed start leaves no run directory
    assert not (offline / "cache" / "bats").exists()  # nor an empty download folder


def test_search_no_download_names_the_fixes(offline, capsys):
    code, _, err = cli(["search", "--no-download", "--out", str(offline / "s")], capsys)
    one_line_error(code, err, "cifar10", "--no-download", "--data-dir", "--preset tiny")
    assert not (offline / "s").exists()


def test_network_probe_fails_fast():
    from bats_cli.data.sources import _probe_network

    start = time.monotonic()
    reason = _probe_network("https://bats-test.invalid/cifar.tar.gz")  # .invalid never resolves
    assert reason is not None and "bats-test.invalid" in reason
    assert time.monotonic() - start < 30


def test_tiny_preset_keeps_fashion_mini():
    from bats_cli.core.presets import SEARCH_PRESETS, TRAIN_PRESETS
    from bats_cli.nas.search import SearchConfig
    from bats_cli.pipeline.train import TrainConfig

    assert TrainConfig(genotype="x").dataset == "cifar10" and SearchConfig().dataset == "cifar10"
    assert TRAIN_PRESETS["tiny"]["dataset"] == SEARCH_PRESETS["tiny"]["dataset"] == "fashion-mini"


# --------------------------------------------------------------------------- 2. the plan


PEAK_PROBE = """
import re, sys
from bats_cli.cli import main
try:
    main(sys.argv[1:])
except SystemExit as exc:
    code = exc.code
else:
    code = 0
hwm = re.search(r"VmHWM:\\s+(\\d+)", open("/proc/self/status").read()).group(1)
sys.stderr.write("\\nPEAK_KIB=%s\\n" % hwm)
sys.exit(code or 0)
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
@pytest.mark.slow
def test_dry_run_estimate_within_half_and_twice_the_real_peak(tmp_path):
    args = ["train", "bats_c10", "--preset", "tiny", "--epochs", "1", "--subset", "640", "--device", "cpu"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    dry = subprocess.run([sys.executable, "-m", "bats_cli", *args, "--dry-run", "--json"],
                         capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert dry.returncode == 0, dry.stderr
    plan = json.loads(dry.stdout)
    assert plan["total_steps"] == 640 // 32
    # Steps were timed: the plan estimates the time (labelled an estimate in its text).
    assert plan["seconds_per_epoch"] > 0 and plan["seconds_total"] == plan["seconds_per_epoch"]
    assert not (tmp_path / "runs").exists()  # a dry run creates nothing
    real = subprocess.run([sys.executable, "-c", PEAK_PROBE, *args, "--out", str(tmp_path / "r"), "-q"],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert real.returncode == 0, real.stderr
    peak = int(real.stderr.rsplit("PEAK_KIB=", 1)[1].split()[0]) * 1024
    ratio = plan["peak_memory_bytes"] / peak
    assert 0.5 <= ratio <= 2.0, (plan["peak_memory_bytes"], peak)


def test_plan_refuses_a_batch_that_cannot_fit(monkeypatch, tmp_path, capsys):
    from bats_cli.utils import memory

    # Room for this process as it is now plus some images, not for 2048 of them. Fixed once:
    # the plan trims the heap before measuring, so the process's RSS moves between the calls.
    budget = memory.rss_bytes() + 800 * 2**20
    room = lambda *device: budget  # noqa: E731
    monkeypatch.setattr(memory, "available_ram_bytes", room)
    monkeypatch.setattr(memory, "available_gpu_bytes", room)
    out = tmp_path / "run"
    code, _, err = cli(["train", "bats_c10", "--preset", "tiny", "--batch-size", "2048", "--subset",
                        "2500", "--out", str(out), "-q"], capsys)
    line = one_line_error(code, err, "--batch-size", "--ignore-plan", "GiB")
    assert not out.exists()
    # The suggested batch is what the measured line allows, and it is below the refused one.
    suggested = int(line.split("use --batch-size ")[1].split()[0])
    assert 1 <= suggested < 2048
    # ... and the plan at that batch fits (a real run would start).
    code, out_json, err = cli(["train", "bats_c10", "--preset", "tiny", "--batch-size", str(suggested),
                               "--out", str(out), "--dry-run", "--json"], capsys)
    assert code == 0, err
    assert json.loads(out_json)["fits"] is True and not out.exists()


def test_memory_model_arithmetic():
    from bats_cli.training.plan import Plan, check_fits
    from bats_cli.training.plan_measure import MemoryModel

    m = MemoryModel(fixed_bytes=100.0, per_image_bytes=10.0)
    assert m.at(5) == 150 and m.largest_batch(205) == 10
    p = Plan(command="train", device="cpu", dataset="cifar10", train_images=10, test_images=1,
             parameters=1, batch_size=64, steps_per_epoch=1, epochs=1, total_steps=1,
             peak_memory_bytes=2**31, memory="RAM", available_memory_bytes=2**30,
             largest_fitting_batch=12, fits=False)
    from bats_cli.core.errors import UserInputError

    with pytest.raises(UserInputError, match="--batch-size 12"):
        check_fits(p)
    check_fits(p, force=True)


# --------------------------------------------------------------------------- 3. progress


def test_plain_progress_lines_carry_run_step_speed_and_eta():
    from bats_cli.utils.progress import Reporter

    stream = io.StringIO()
    rep = Reporter(stream=stream, tty=False, every_steps=3, every_seconds=3600)
    rep.start_run(12, images_per_step=8)
    for epoch in (1, 2):
        with rep.epoch(f"epoch {epoch}/2", 6) as bar:
            for _ in range(6):
                bar.update(1, loss=1.5)
    lines = stream.getvalue().splitlines()
    steps = [line for line in lines if line.startswith("step ")]
    assert steps and steps[-1].startswith("step 12/12")
    assert all("img/s" in line and "eta" in line and "elapsed" in line and "loss=1.5" in line
               for line in steps[1:])
    assert sum(line.startswith("epoch ") for line in lines) == 2


# --------------------------------------------------------------------------- 4. report; 6. units


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory):
    from bats_cli.core.zoo import resolve_genotype
    from bats_cli.nas.search import SearchConfig, run_search
    from bats_cli.pipeline.train import TrainConfig, train

    root = tmp_path_factory.mktemp("runs")
    search = SearchConfig(dataset="fashion-mini", subset=32, image_size=8, batch_size=8, epochs=2,
                          warmup=1, channels=6, layers=(3, 3), ops=(8, 3), threads=1)
    run_search(search, out_dir=root / "search")
    cfg = TrainConfig(genotype="bats_c10", dataset="fashion-mini", layers=3, channels=6,
                      batch_size=32, subset=64, epochs=2, device="cpu", threads=1)
    result = train(cfg, genotype=resolve_genotype("bats_c10"), out=root / "train", quiet=True,
                   handle_signals=False)
    return root, result


@pytest.mark.slow
def test_report_of_a_search_and_a_train(tiny_runs, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    from PIL import Image

    root, _ = tiny_runs
    code, out, err = cli(["report", str(root / "search"), str(root / "train"), "--out",
                          str(tmp_path / "rep"), "--json"], capsys)
    assert code == 0, err
    manifest = json.loads(out)
    panels = set(manifest["panels"])
    assert {"search/loss", "search/accuracy", "search/alpha-normal", "search/alpha-reduce",
            "search/entropy", "search/param-free", "search/cell",
            "train/loss", "train/accuracy", "train/cell"} <= panels
    assert len(manifest["series"]["search/alpha-normal"]) == 14  # one plot per edge (4 nodes)
    assert set(manifest["series"]["train/accuracy"]) >= {"train", "validation"}
    with Image.open(manifest["png"]) as im:
        im.load()
        assert im.width > 500 and im.height > 500
    page = Path(manifest["html"]).read_text()
    assert page.count("data:image/png;base64,") == len(panels)
    for pid in panels:
        assert f"id='{pid}'" in page
    assert "id='comparison'" in page and "<td>search</td>" in page
    rows = {r["run"]: r for r in manifest["comparison"]}
    assert rows["train"]["params"] and rows["train"]["flops"] and rows["train"]["accuracy"] is not None
    # An existing report is not overwritten without --force.
    before = Path(manifest["png"]).read_bytes()
    args = ["report", str(root / "search"), str(root / "train"), "--out", str(tmp_path / "rep")]
    code, _, err = cli(args, capsys)
    one_line_error(code, err, "report.png already exists", "--force")
    assert Path(manifest["png"]).read_bytes() == before
    code, _, err = cli(args + ["--force"], capsys)
    assert code == 0, err


@pytest.mark.slow
def test_report_without_matplotlib_names_the_extra(tiny_runs, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    code, _, err = cli(["report", str(tiny_runs[0] / "train")], capsys)
    one_line_error(code, err, "bats[report]")


@pytest.mark.slow
def test_search_accuracies_are_percentages(tiny_runs):
    import csv

    from bats_cli.nas.search_records import EpochSums, Sums

    assert EpochSums(w=Sums(correct=3, count=4), a=Sums(correct=1, count=4)).metrics()["train_acc"] == 75.0
    rows = list(csv.DictReader(open(tiny_runs[0] / "search" / "metrics.csv")))
    assert any(float(r["train_acc"]) > 1 for r in rows if r["train_acc"])


@pytest.mark.slow
def test_train_and_flops_params_agree(tiny_runs, capsys):
    _, result = tiny_runs
    code, out, err = cli(["flops", "bats_c10", "--dataset", "fashion-mini", "--layers", "3",
                          "--channels", "6", "--json"], capsys)
    assert code == 0, err
    assert json.loads(out)["params"] == result["parameters_without_aux"] < result["parameters"]


@pytest.mark.slow
def test_config_json_records_the_run(tiny_runs):
    record = json.loads((tiny_runs[0] / "train" / "config.json").read_text())["run"]
    assert record["device"] == "cpu" and record["bats_version"] and record["host"]
    assert {"command_line", "started", "git_commit"} <= set(record)


# --------------------------------------------------------------------------- 5. --config; 6. vocabulary


def test_config_file_between_preset_and_flags(tmp_path, capsys):
    cfg_file = tmp_path / "c.json"
    cfg_file.write_text(json.dumps({"config": {"epochs": 7, "lr": 0.01}}))
    code, out, err = cli(["train", "bats_c10", "--preset", "tiny", "--config", str(cfg_file),
                          "--lr", "0.02", "--print-config"], capsys)
    assert code == 0, err
    cfg = json.loads(out)
    assert (cfg["epochs"], cfg["lr"], cfg["layers"], cfg["dataset"]) == (7, 0.02, 3, "fashion-mini")
    cfg_file.write_text(json.dumps({"epoch": 7}))
    code, _, err = cli(["train", "bats_c10", "--config", str(cfg_file), "--print-config"], capsys)
    one_line_error(code, err, "epoch")


@pytest.mark.parametrize("command", [["train", "bats_c10"], ["search"]])
def test_resume_of_a_directory_without_checkpoint(command, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, err = cli([*command, "--out", str(empty), "--resume"], capsys)
    one_line_error(code, err, "no checkpoint", "--resume-or-start")
    code, out, err = cli([*command, "--out", str(empty), "--resume-or-start", "--preset", "tiny",
                          "--print-config"], capsys)
    assert code == 0, err


def test_out_is_a_directory_and_dash_o_a_file(capsys):
    code, _, err = cli(["train", "bats_c10", "-o", "x", "--print-config"], capsys)
    assert code == 2 and "-o" in err


@pytest.mark.parametrize("command", ["search", "train", "binarize"])
def test_every_command_has_the_same_presets_and_shows_them(command, capsys):
    code, out, _ = cli([command, "--help"], capsys)
    assert code == 0
    text = " ".join(out.split())
    for name in ("paper:", "tiny:", "small:"):
        assert name in text, (command, name)


def test_one_spelling_of_weight_decay(capsys):
    for command in ("search", "train"):
        code, out, _ = cli([command, "--help"], capsys)
        assert "--weight-decay" in out and "--wd " not in out


def test_terminal_bar_never_cuts_its_clock():
    from bats_cli.utils.progress import Reporter

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    stream = Terminal()
    rep = Reporter(stream=stream, tty=True)
    rep._rich_console().width = 50
    rep.start_run(100, images_per_step=32)
    with rep.epoch("stage 1/3 (17 cells, 8 ops) epoch 1/25 warm-up", 50) as bar:
        for _ in range(7):
            bar.update(1, w_loss=2.3456, w_acc=12.5, a_loss=2.1, a_acc=14.4)
        bar._progress.refresh()
    live = [part for part in stream.getvalue().split("\r") if "7/50" in part and "…" in part]
    assert live and all("eta" in part for part in live)


# --------------------------------------------------------------------------- 8. cell plots


def test_cell_plots_number_nodes_as_the_json_without_tex_or_overlaps(tmp_path, capsys):
    from bats_cli.core.zoo import resolve_genotype, zoo_names
    from bats_cli.studies.plot import _panels, _place_labels, to_svg

    for name in zoo_names():
        g = resolve_genotype(name)
        for panel in _panels(g):
            assert _place_labels(panel)[1] == 0, name  # no label overlaps a label or a node
        svg = to_svg(g)
        assert "_{" not in svg and "\\" not in svg, name
        steps = g.steps("normal")
        for node in range(2, steps + 2):
            assert f">{node}</text>" in svg, (name, node)
    for target in ("cell.svg", "cell.png"):
        code, _, err = cli(["genotype", "show", "bats_c10", "--plot", str(tmp_path / target)], capsys)
        assert code == 0, err
        assert (tmp_path / target).stat().st_size > 1000
    code, _, err = cli(["genotype", "show", str(ROOT / "genotypes" / "darts_v2.json"), "--plot",
                        str(tmp_path / "d.png")], capsys)
    assert code == 0, err
    # An existing plot is not overwritten without --force.
    code, _, err = cli(["genotype", "show", "nasnet_a", "--plot", str(tmp_path / "d.png")], capsys)
    one_line_error(code, err, "d.png already exists", "--force")
    code, _, err = cli(["genotype", "show", "nasnet_a", "--plot", str(tmp_path / "d.png"), "--force"],
                       capsys)
    assert code == 0, err
