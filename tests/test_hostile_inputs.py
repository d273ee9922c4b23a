"""Hostile input, round two: one named test per class of input that used to end in an internal
error (docs/reliability.md, "Input boundaries"). tests/test_fuzz.py generates the rest."""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from helpers import cli, one_line_error

from bats_cli.core.errors import RunFailure, UserInputError

REPO = Path(__file__).resolve().parents[1]
BATS_C10 = REPO / "bats_cli" / "genotypes" / "bats_c10.json"


CELL = "[('sep_conv_3x3', 0), ('skip_connect', 1)]"


def _darts(normal_concat: str = "[2]", normal: str = CELL) -> str:
    return f"Genotype(normal={normal}, normal_concat={normal_concat}, reduce={CELL}, reduce_concat=[2])"


# --------------------------------------------------------------------------- numeric bombs


def test_numeric_bombs_in_genotype_json_and_darts_text(tmp_path, capsys):
    data = json.loads(BATS_C10.read_text())
    # Past Python's int-to-string digit limit (json raises a bare ValueError there).
    text = BATS_C10.read_text().replace('["max_pool_3x3", 2]', '["max_pool_3x3", ' + "9" * 5000 + "]", 1)
    path = tmp_path / "digits.json"
    path.write_text(text)
    one_line_error(*cli(["genotype", "validate", str(path)], capsys)[::2], "thousands of digits")
    # Under the limit, but no node index: a short message, not the number.
    data["normal"][0][1] = 10**300
    path.write_text(json.dumps(data))
    line = one_line_error(*cli(["genotype", "validate", str(path)], capsys)[::2], "301-digit number")
    assert len(line) < 400
    # DARTS text: range() with a zero step or astronomical bounds, huge hexadecimal literals.
    for text, needle in [
        (_darts("range(2, 3, 0)"), "step must not be zero"),
        (_darts("range(2, " + "9" * 300 + ")"), "far too large"),
        (_darts("range(-" + "9" * 300 + ", 3)"), "far too large"),
        (_darts(normal="[('sep_conv_3x3', 0x" + "f" * 5000 + "), ('skip_connect', 1)]"), "far too large"),
        ("0x" + "f" * 5000, "is not Genotype"),
        (_darts(normal="[('sep_conv_3x3', " + "9" * 5000 + "), ('skip_connect', 1)]"), "digit"),
    ]:
        one_line_error(*cli(["genotype", "import", text], capsys)[::2], needle)


# --------------------------------------------------------------------------- checkpoint records


def _checkpoint(path: Path, *, kind: str = "train", config: dict) -> Path:
    from bats_cli.storage.checkpoint import save_checkpoint

    return save_checkpoint(path, {"x": torch.zeros(1)}, kind=kind, config=config, epoch=1,
                           genotype_json=BATS_C10.read_text())


@pytest.mark.parametrize("config, needle", [
    ({"network": {"channels": "6"}}, "config.network"),
    ({"network": {"channels_per_group": None}}, "config.network"),
    ({"network": {"channel_shuffle": [3]}}, "config.network"),
    ({"network": {"activation": {"evil": 1}}}, "config.network"),
    ({"network": ["kind", "cifar"]}, "config.network"),
    ({"data": {"image_size": "32"}}, "config.data"),
    ({"data": {"image_size": 100000}}, "config.data"),
    ({"run": {"seed": 2**40}}, "config.run"),
    ({"packing": ["sign-bits-msb-first-v1"]}, "config.packing"),
    ({"packing": {"layout": "sign-bits-msb-first-v1", "binary_convs": {"cells.0.op": "3x3"}}}, "config.packing"),
    ({"packing": {"layout": "sign-bits-msb-first-v1", "binary_convs": {"cells.0.op": [[1], 2]}}}, "config.packing"),
    ({"packing": {"layout": 7, "binary_convs": {}}}, "config.packing"),
])
def test_wrong_json_types_in_checkpoint_settings_and_packing_are_one_line(tmp_path, capsys, config, needle):
    kind = "packed" if "packing" in config else "train"
    path = _checkpoint(tmp_path / "x.safetensors", kind=kind, config=config)
    for command in (["eval", str(path)], ["flops", str(path)]):
        one_line_error(*cli(command, capsys)[::2], needle)


# --------------------------------------------------------------------------- resume state


def _adam_state():
    from bats_cli.storage.optim_state import optimizer_state_tensors

    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    named = dict(model.named_parameters())
    tensors, text = optimizer_state_tensors(opt, named)
    return model, named, tensors, json.loads(text)


def _load(tensors, state):
    from bats_cli.storage.optim_state import load_optimizer_state

    model = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    load_optimizer_state(opt, dict(model.named_parameters()), tensors, json.dumps(state))
    return opt


def test_tampered_optimizer_state_is_refused_before_a_step():
    _, _, tensors, state = _adam_state()
    _load(tensors, state)  # untouched: loads
    # A moment buffer of another shape would fail inside the first optimizer step.
    bad = {**tensors, "optim.weight.exp_avg": torch.zeros(3, 2)}
    with pytest.raises(UserInputError, match=r"optim.weight.exp_avg has shape \(3, 2\), its parameter \(2, 3\)"):
        _load(bad, state)
    # Settings of the wrong kind or range, a state missing a buffer, a step that is no count.
    group = state["param_groups"][0]
    for key, value, needle in [("betas", {"__tuple__": [2.0, 3.0]}, "betas"), ("lr", "fast", "lr"),
                               ("lr", -1.0, "negative"), ("eps", 1.0, "eps"), ("maximize", True, "maximize")]:
        tampered = json.loads(json.dumps(state))
        tampered["param_groups"][0] = {**group, key: value}
        with pytest.raises(UserInputError, match=needle):
            _load(tensors, tampered)
    tampered = json.loads(json.dumps(state))
    del tampered["state"]["weight"]["exp_avg_sq"]
    with pytest.raises(UserInputError, match="this optimizer keeps"):
        _load(tensors, tampered)
    tampered = json.loads(json.dumps(state))
    tampered["state"]["weight"]["step"] = {"__tensor__": -5.0, "dtype": "float32"}
    with pytest.raises(UserInputError, match="step count"):
        _load(tensors, tampered)


TRAIN = ["--dataset", "fashion-mini", "--subset", "16", "--batch-size", "8", "--epochs", "2",
         "--layers", "3", "--channels", "6", "--image-size", "8", "--threads", "1"]


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory):
    """A `bats train` run stopped after its first step (epoch 0 of 2, step 1 of 2)."""
    from bats_cli.core.errors import Interrupted
    from bats_cli.core.zoo import resolve_genotype
    from bats_cli.pipeline.train import TrainConfig, train

    out = tmp_path_factory.mktemp("stopped") / "run"
    cfg = TrainConfig(genotype="bats_c10", dataset="fashion-mini", subset=16, batch_size=8, epochs=2,
                      layers=3, channels=6, image_size=8, threads=1)
    with pytest.raises(Interrupted):
        train(cfg, genotype=resolve_genotype("bats_c10"), out=out, quiet=True, stop_after_steps=1,
              handle_signals=False)
    return out


def _with_metadata(run: Path, dst: Path, **changes) -> Path:
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    copy = shutil.copytree(run, dst)
    last = copy / "last.safetensors"
    with safe_open(str(last), framework="pt") as fh:
        meta = dict(fh.metadata())
    tensors = load_file(str(last))
    meta.update({k: str(v) for k, v in changes.items()})
    save_file(tensors, str(last), metadata=meta)
    return copy


@pytest.mark.parametrize("changes, needle", [
    ({"bats_epoch": 5}, "epoch 5, but the run has 2 epochs"),
    ({"bats_epoch": 10**7}, "but the run has 2 epochs"),
    ({"bats_step": 99}, "step 99 of an epoch of 2 steps"),
    ({"bats_epoch": 2, "bats_step": 1}, "after its last epoch"),
    # The end exactly, but the run's metrics record no epoch: a finished run that never trained.
    ({"bats_epoch": 2, "bats_step": 0}, "claims 2 finished epoch(s)"),
])
def test_counters_past_the_end_are_refused_not_treated_as_finished(stopped_run, tmp_path, capsys, changes, needle):
    run = _with_metadata(stopped_run, tmp_path / "run", **changes)
    before = (run / "metrics.csv").read_bytes() if (run / "metrics.csv").exists() else None
    one_line_error(*cli(["train", "bats_c10", *TRAIN, "--out", str(run), "--resume", "--ignore-plan", "-q"],
                        capsys)[::2], needle)
    assert not (run / "result.json").exists()
    if before is not None:
        assert (run / "metrics.csv").read_bytes() == before


def test_optimizer_buffer_of_another_shape_is_refused_on_resume(stopped_run, tmp_path, capsys):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    run = shutil.copytree(stopped_run, tmp_path / "run")
    last = run / "last.safetensors"
    with safe_open(str(last), framework="pt") as fh:
        meta = dict(fh.metadata())
    tensors = load_file(str(last))
    name = next(k for k in sorted(tensors) if k.startswith("optim.") and k.endswith(".exp_avg"))
    tensors[name] = torch.zeros(tensors[name].numel() + 1)
    save_file(tensors, str(last), metadata=meta)
    one_line_error(*cli(["train", "bats_c10", *TRAIN, "--out", str(run), "--resume", "--ignore-plan", "-q"],
                        capsys)[::2], name, "has shape")


# --------------------------------------------------------------------------- paths


def test_a_path_argument_that_does_not_exist_is_no_such_file(tmp_path, capsys):
    for arg in ["my/genotypes.py", "genotypes.py", str(tmp_path / "missing" / "g.txt")]:
        one_line_error(*cli(["genotype", "import", arg], capsys)[::2], arg, "no such file")
    one_line_error(*cli(["genotype", "import", str(tmp_path)], capsys)[::2], "is a directory")
    one_line_error(*cli(["train", "my/genotype.json"], capsys)[::2], "no such file")
    one_line_error(*cli(["train", "bats_c10", "--config", "missing.json"], capsys)[::2], "no such file")
    one_line_error(*cli(["eval", str(tmp_path / "m.safetensors")], capsys)[::2], "no such")
    # Names the system refuses (too long) are bad input too, never an internal error.
    long = "x/" + "a" * 300 + ".json"
    one_line_error(*cli(["train", long], capsys)[::2], "no such file")
    one_line_error(*cli(["genotype", "import", "a" * 5000 + ".py"], capsys)[::2])


# --------------------------------------------------------------------------- outputs before work


def _unwritable(tmp_path: Path) -> Path:
    """A folder nobody can create files in, root included (/proc), else a read-only one."""
    if os.path.isdir("/proc/self"):
        return Path("/proc")
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    if os.access(folder, os.W_OK):
        pytest.skip("no unwritable folder here")
    return folder


def test_outputs_are_checked_before_any_work(tmp_path, capsys):
    nowhere = _unwritable(tmp_path)
    ckpt = _checkpoint(tmp_path / "train.safetensors", config={})
    text = _darts()
    cases = [
        (["binarize", str(ckpt), "-o", str(nowhere / "m.packed.safetensors"), "--out", str(tmp_path / "b")], "-o"),
        (["eval", str(ckpt), "--output", str(nowhere / "eval.json")], "--output"),
        (["export", str(ckpt), "-o", str(nowhere / "m.onnx")], "-o"),
        (["derive", "--random", "-o", str(nowhere / "g.json")], "--output"),
        (["derive", "--random", "--plot", str(nowhere / "g.svg")], "--plot"),
        (["genotype", "import", text, "-o", str(nowhere / "g.json")], "--output"),
        (["genotype", "show", "bats_c10", "--plot", str(nowhere / "g.svg")], "--plot"),
        (["report", str(tmp_path), "--out", str(nowhere / "report")], "--out"),
        (["train", "bats_c10", *TRAIN, "--out", str(nowhere / "run")], "--out"),
        (["derive", "--random", "-o", str(tmp_path / ("n" * 250 + ".json"))], "longer than"),
    ]
    for argv, needle in cases:
        one_line_error(*cli(argv, capsys)[::2], needle)
    # The binarize above stopped before its run directory (or anything else) was made.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train.safetensors"]


# --------------------------------------------------------------------------- --config files


@pytest.mark.parametrize("settings, needle", [
    ({"num_workers": 100000}, "--num-workers"),
    ({"threads": 99999}, "--threads"),
    ({"seed": 2**40}, "--seed"),
    ({"epochs": 10**9}, "--epochs"),
    ({"lr": 1e300}, "--lr"),
    ({"momentum": -1}, "--momentum"),
    ({"image_size": 100000}, "--image-size"),
])
def test_a_config_file_may_not_set_what_a_flag_may_not(tmp_path, capsys, settings, needle):
    path = tmp_path / "c.json"
    path.write_text(json.dumps(settings))
    one_line_error(*cli(["train", "bats_c10", "--config", str(path), "--print-config"], capsys)[::2],
                   needle, "--config")


def test_hostile_config_files_are_one_line(tmp_path, capsys):
    path = tmp_path / "c.json"
    for text, needle in [('{"lr": NaN}', "NaN"), ("[" * 100000 + "]" * 100000, "nested"),
                         ('{"epochs": ' + "9" * 5000 + "}", "thousands of digits"),
                         ('{"name": "a\\u001b[2Jb"}', "control characters"),
                         ('{"arch_betas": [2, 3]}', "--arch-betas"), ("\xff\xfe", "UTF-8")]:
        path.write_bytes(text.encode("latin-1"))
        one_line_error(*cli(["search", "--config", str(path), "--print-config"], capsys)[::2], needle)
    one_line_error(*cli(["search", "--config", "/dev/zero", "--print-config"], capsys)[::2], "not a regular file")


# --------------------------------------------------------------------------- flags at extremes


@pytest.mark.parametrize("argv, needle", [
    (["train", "bats_c10", "--lr", "inf", "--print-config"], "finite"),
    (["train", "bats_c10", "--lr", "nan", "--print-config"], "finite"),
    (["train", "bats_c10", "--seed", "9" * 30, "--print-config"], "--seed"),
    (["train", "bats_c10", "--epochs", "9" * 20, "--print-config"], "--epochs"),
    (["search", "--temp-normal", "1e-300", "--print-config"], "--temp-normal"),
    (["search", "--arch-betas", "0.5,1", "--print-config"], "--arch-betas"),
    (["search", "--name", "a\x1b[2Jb", "--print-config"], "--name"),
    (["search", "--layers", ",".join(["3"] * 100), "--ops", ",".join(["8"] * 100), "--print-config"], "--layers"),
])
def test_flag_values_at_their_extremes_are_one_line(capsys, argv, needle):
    one_line_error(*cli(argv, capsys)[::2], needle)


# --------------------------------------------------------------------------- a full disk


def test_a_full_disk_is_one_error_line_and_nothing_half_written(tmp_path, capsys, monkeypatch):
    from safetensors import SafetensorError

    out = tmp_path / "g.json"
    out.write_text("previous\n")

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    code, _, err = cli(["genotype", "import", _darts(), "-o", str(out), "--force"], capsys)
    assert code == 1, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "cannot write" in lines[0], err
    assert "No space left" in lines[0]
    assert "internal error" not in err
    assert out.read_text() == "previous\n" and sorted(p.name for p in tmp_path.iterdir()) == ["g.json"]
    monkeypatch.undo()
    # safetensors reports its own failed write as a SafetensorError: the same one line.
    import safetensors.torch

    def no_space(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(safetensors.torch, "save_file", no_space)
    with pytest.raises(RunFailure, match="cannot write .*No space left on device"):
        _checkpoint(tmp_path / "c.safetensors", config={})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g.json"]


# --------------------------------------------------------------------------- run directories


def _run_dir(root: Path) -> Path:
    run = root / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"command": "train", "config": {}}))
    (run / "metrics.csv").write_text("epoch,train_loss,val_top1,seconds\n1,2.3,10.0,5.0\n2,2.1,12.5,9.0\n")
    return run


@pytest.mark.parametrize("name, text, needle", [
    ("config.json", "[1, 2]", "expected a JSON object"),
    ("config.json", '{"network": {"channels": "x"}}', "network"),
    ("metrics.csv", "\xff\xfe", "UTF-8"),
    ("result.json", '"text"', "expected a JSON object"),
    ("alphas/stage1_epoch01.json", '{"stage": 1, "epoch": 1, "normal": [{"node": 2}], "reduce": []}', "α snapshot"),
])
def test_run_directory_files_report_reads_are_checked(tmp_path, capsys, name, text, needle):
    pytest.importorskip("matplotlib")
    run = _run_dir(tmp_path)
    (run / name).parent.mkdir(exist_ok=True)
    (run / name).write_bytes(text.encode("latin-1"))
    one_line_error(*cli(["report", str(run), "--out", str(tmp_path / "out")], capsys)[::2], needle)


def test_hostile_metrics_values_are_plotted_or_skipped(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    run = _run_dir(tmp_path)
    (run / "metrics.csv").write_text("epoch,train_loss,val_top1,seconds\n1,inf,nan,abc\n2,1e309," + "9" * 5000
                                     + ",\n")
    code, _, err = cli(["report", str(run), "--out", str(tmp_path / "out")], capsys)
    assert code == 0, err


def test_run_files_genotype_best_reads_are_checked(tmp_path, capsys):
    run = tmp_path / "cand"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"command": "train", "genotype": {"name": "x"}}))
    (run / "result.json").write_text(json.dumps({"command": "train", "val_split": "holdout",
                                                 "final_val_top1": 10.0}))
    one_line_error(*cli(["genotype", "best", str(run), "-o", str(tmp_path / "g.json")], capsys)[::2],
                   "config.json (genotype)")
    (run / "result.json").write_text("[]")
    one_line_error(*cli(["genotype", "best", str(run), "-o", str(tmp_path / "g.json")], capsys)[::2],
                   "result.json: expected a JSON object")
