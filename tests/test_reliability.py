"""Hostile input and faults (docs/reliability.md): every case ends in exit 2 (130 for signals)
with one clear line, or in a documented skip naming the file; nothing is overwritten, nothing
written outside the run directory, and a run stopped by SIGTERM to its process group (with data
workers) resumes to the result of an uninterrupted run.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import cli, one_line_error
from PIL import Image

from bats_cli.core.errors import UserInputError

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def alarm():
    """Fail instead of hanging forever (a FIFO read would block without the checks under test)."""

    def on_alarm(signum, frame):
        raise TimeoutError("blocked: the operation under test did not return")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(60)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


# --------------------------------------------------------------------------- exit codes


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["train", "bats_c10", "--epochs", "0"], "--epochs"),
        (["train", "bats_c10", "--batch-size", "0"], "--batch-size"),
        (["search", "--threads", "0"], "--threads"),
        (["nosuchcommand"], "nosuchcommand"),
    ],
)
def test_usage_errors_are_one_error_line(argv, needle, capsys):
    one_line_error(*cli(argv, capsys)[::2], needle)


def test_existing_file_as_out_is_one_error_line(tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    one_line_error(*cli(["train", "bats_c10", "--out", str(tmp_path / "f")], capsys)[::2], "--out")


def _patch_command(monkeypatch, action):
    """`bats genotype show` runs ``action`` instead of loading a genotype."""
    import bats_cli.core.zoo as zoo

    def fake(arg):
        return action()

    monkeypatch.setattr(zoo, "resolve_genotype", fake)


def test_ctrl_c_inside_a_command_exits_130(monkeypatch, capsys):
    def interrupt():
        raise KeyboardInterrupt

    _patch_command(monkeypatch, interrupt)
    code, _, err = cli(["genotype", "show", "x"], capsys)
    assert code == 130 and "Traceback" not in err


def test_sigterm_outside_a_run_exits_130(monkeypatch, capsys):
    # Start-up, the final output, `bats eval`: no run handler, SIGTERM stops like Ctrl-C.
    def terminate():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)

    _patch_command(monkeypatch, terminate)
    code, _, err = cli(["genotype", "show", "x"], capsys)
    assert code == 130 and "Traceback" not in err
    assert signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None) or callable(signal.getsignal(signal.SIGTERM))


def test_second_signal_during_a_run_exits_130(monkeypatch, capsys):
    from bats_cli.utils.signals import GracefulInterrupt

    def run():
        with GracefulInterrupt():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.1)
            os.kill(os.getpid(), signal.SIGTERM)  # "quit without saving"
            time.sleep(5)

    _patch_command(monkeypatch, run)
    code, _, err = cli(["genotype", "show", "x"], capsys)
    assert code == 130, err


def test_internal_error_is_one_line_with_a_saved_traceback(monkeypatch, capsys):
    def bug():
        raise TypeError("unexpected thing")

    _patch_command(monkeypatch, bug)
    code, _, err = cli(["genotype", "show", "x"], capsys)
    lines = err.strip().splitlines()
    assert code == 1 and len(lines) == 1 and lines[0].startswith("error: internal error"), err
    path = Path(re.search(r"traceback saved to (\S+);", lines[0]).group(1))
    try:
        assert "TypeError: unexpected thing" in path.read_text()
    finally:
        path.unlink()


# --------------------------------------------------------------------------- nothing overwritten


def test_binarize_output_never_replaces_its_input(tmp_path, capsys):
    ckpt = tmp_path / "last.safetensors"
    ckpt.write_bytes(b"precious")
    for extra in ([], ["--force"]):
        code, _, err = cli(["binarize", str(ckpt), "-o", str(ckpt), *extra], capsys)
        one_line_error(code, err, "own input")
    link = tmp_path / "link.safetensors"
    link.symlink_to(ckpt)
    one_line_error(*cli(["binarize", str(ckpt), "-o", str(link), "--force"], capsys)[::2], "own input")
    # Nor a checkpoint of its own run, nor an existing file without --force.
    run = tmp_path / "binarize"
    one_line_error(*cli(["binarize", str(ckpt), "-o", str(run / "last.safetensors")], capsys)[::2],
                   "this run writes")
    other = tmp_path / "other.safetensors"
    other.write_bytes(b"keep")
    one_line_error(*cli(["binarize", str(ckpt), "-o", str(other)], capsys)[::2], "--force")
    assert ckpt.read_bytes() == b"precious" and other.read_bytes() == b"keep"


def test_derive_and_import_outputs_need_force_and_never_hit_inputs(tmp_path, capsys):
    ckpt = tmp_path / "search.safetensors"
    ckpt.write_bytes(b"precious")
    one_line_error(*cli(["derive", str(ckpt), "-o", str(ckpt), "--force"], capsys)[::2], "own input")
    plot = tmp_path / "cell.svg"
    plot.write_text("keep")
    one_line_error(*cli(["derive", "--random", "--plot", str(plot)], capsys)[::2], "--force")
    one_line_error(*cli(["derive", "--random", "-o", str(plot), "--plot", str(plot)], capsys)[::2],
                   "same file")
    src = tmp_path / "genotypes.py"
    src.write_text("X = Genotype(normal=[('skip_connect', 0), ('skip_connect', 1)], normal_concat=[2], "
                   "reduce=[('max_pool_3x3', 0), ('max_pool_3x3', 1)], reduce_concat=[2])")
    before = src.read_text()
    one_line_error(*cli(["genotype", "import", str(src), "-o", str(src), "--force"], capsys)[::2],
                   "own input")
    assert ckpt.read_bytes() == b"precious" and plot.read_text() == "keep" and src.read_text() == before


@pytest.mark.slow
def test_run_directory_lock_refuses_a_second_process(tmp_path):
    from bats_cli.storage.rundir import RunDir

    out = tmp_path / "run"
    with RunDir(out, resume=False) as run:
        run.write_json("config.json", {"config": {}})
        # --resume of a directory whose run has not saved a checkpoint yet: busy, not "no checkpoint".
        for flag in ("--resume-or-start", "--resume"):
            proc = subprocess.run(
                [sys.executable, "-m", "bats_cli", "train", "bats_c10", "--preset", "tiny",
                 flag, "--out", str(out)],
                env=_env(), capture_output=True, text=True, timeout=300,
            )
            assert proc.returncode == 2, proc.stderr
            line = proc.stderr.strip().splitlines()[-1]
            assert line.startswith("error:") and f"pid {os.getpid()}" in line and "in use" in line, proc.stderr
            assert "Traceback" not in proc.stderr
    assert not (out / ".lock").exists()  # released on close


@pytest.mark.slow
def test_stale_lock_of_a_dead_run_is_taken_over(tmp_path, capsys):
    from bats_cli.storage.rundir import RunDir

    out = tmp_path / "run"
    out.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (out / ".lock").write_text(f"pid={dead.pid} host=elsewhere\n")
    with RunDir(out, resume=True):
        assert f"pid={os.getpid()}" in (out / ".lock").read_text()
    assert f"stale lock of pid {dead.pid}" in capsys.readouterr().err


def test_resume_into_a_folder_that_is_not_a_run_touches_nothing(tmp_path):
    from bats_cli.storage.rundir import RunDir

    folder = tmp_path / "home"
    folder.mkdir()
    (folder / "metrics.txt").write_text("mine")
    (folder / "notes.md").write_text("mine")
    with pytest.raises(UserInputError, match="no bats run"):
        RunDir(folder, resume=True)
    assert sorted(p.name for p in folder.iterdir()) == ["metrics.txt", "notes.md"]


def test_unwritable_out_is_refused_before_work(tmp_path):
    from bats_cli.storage.rundir import RunDir

    if os.geteuid() == 0:
        pytest.skip("root can write anywhere")
    locked = tmp_path / "ro"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        with pytest.raises(UserInputError, match="not writable|cannot create"):
            RunDir(locked / "run", resume=False)
    finally:
        locked.chmod(0o700)


# --------------------------------------------------------------------------- signals and workers

TRAIN = ["train", "bats_c10", "--dataset", "fashion-mini", "--layers", "3", "--channels", "6", "--subset", "160",
         "--batch-size", "16", "--epochs", "2", "--lr", "2e-3", "--threads", "1",
         "--device", "cpu", "--num-workers", "2", "--json"]


def _bats(args, **kw):
    return subprocess.Popen([sys.executable, "-m", "bats_cli", *args], env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


@pytest.mark.slow
def test_sigterm_to_the_process_group_with_workers_saves_and_resumes_exactly(tmp_path):
    reference = _bats([*TRAIN, "--out", str(tmp_path / "ref")])
    stopped_out = tmp_path / "stopped"
    proc = _bats([*TRAIN, "--out", str(stopped_out)], start_new_session=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True)
    reader.start()
    deadline = time.monotonic() + 240
    # Signal the whole group (what SLURM, docker stop and systemd do) while epoch 2 trains.
    while not any(line.startswith("epoch 1/2") for line in lines) and time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "".join(lines)
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(timeout=240)
    reader.join(timeout=10)
    err = "".join(lines)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "exited unexpectedly" not in err, err
    assert (stopped_out / "last.safetensors").is_file()
    with pytest.raises(ProcessLookupError):
        os.killpg(proc.pid, 0)  # no worker outlived the run
    assert not (stopped_out / ".lock").exists()

    resumed = _bats([*TRAIN, "--out", str(stopped_out), "--resume"])
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    ref_out, ref_err = reference.communicate(timeout=300)
    assert reference.returncode == 0, ref_err
    keys = ("final_train_top1", "final_val_top1", "final_val_top5", "best_val_top1")
    got, want = json.loads(out), json.loads(ref_out)
    assert {k: got[k] for k in keys} == {k: want[k] for k in keys}


@pytest.mark.slow
def test_workers_ignore_group_signals_but_obey_the_parent(tmp_path):
    """A shielded worker outlives SIGINT/SIGTERM from others; the parent's SIGTERM ends it."""
    from bats_cli.data import ShieldedDataLoader

    class Slow(torch.utils.data.Dataset):
        def __len__(self):
            return 64

        def __getitem__(self, i):
            time.sleep(0.05)
            return torch.tensor([i])

    loader = ShieldedDataLoader(Slow(), batch_size=4, num_workers=1)
    it = iter(loader)
    next(it)
    worker = it._workers[0]
    killer = subprocess.run([sys.executable, "-c",
                             f"import os,signal; os.kill({worker.pid}, signal.SIGTERM); "
                             f"os.kill({worker.pid}, signal.SIGINT)"], timeout=60)
    assert killer.returncode == 0
    time.sleep(1.5)
    assert worker.is_alive()
    assert len([b for b in it]) == 15  # the epoch finishes: the main process owns shutdown
    worker.join(timeout=30)
    assert not worker.is_alive()


# --------------------------------------------------------------------------- data sets


def _png(path: Path, value: int, side: int = 8) -> None:
    Image.fromarray(np.full((side, side, 3), value, dtype=np.uint8)).save(path)


def _bomb_png(path: Path, side: int = 100_000) -> None:
    """A valid PNG header claiming side x side pixels, with almost no data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (len(data).to_bytes(4, "big") + kind + data
                + zlib.crc32(kind + data).to_bytes(4, "big"))

    ihdr = side.to_bytes(4, "big") * 2 + bytes([8, 2, 0, 0, 0])
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
                     + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


def _hostile_tree(root: Path) -> tuple[Path, list[str]]:
    """Two classes with 3 good images each in train and val, plus every kind of bad file."""
    for split in ("train", "val"):
        for c, name in enumerate(("a", "b")):
            (root / split / name).mkdir(parents=True)
            for i in range(3):
                _png(root / split / name / f"{i}.png", 40 * c + i)
    a = root / "train" / "a"
    bad = []
    (a / "corrupt.png").write_bytes(os.urandom(300)); bad.append("corrupt.png")
    (a / "empty.jpg").write_bytes(b""); bad.append("empty.jpg")
    good = (a / "0.png").read_bytes()
    (a / "truncated.png").write_bytes(good[: len(good) // 2]); bad.append("truncated.png")
    (a / "dangling.png").symlink_to(root / "nowhere.png"); bad.append("dangling.png")
    os.mkfifo(a / "fifo.png"); bad.append("fifo.png")
    _bomb_png(a / "bomb.png"); bad.append("bomb.png")
    (a / "self.png").symlink_to(a / "self.png"); bad.append("self.png")
    (a / "loop").symlink_to(a)  # a folder link back up: walked once, images not multiplied
    (a / "README.txt").write_text("not an image, not a warning")
    return root, bad


def test_hostile_image_folder_skips_and_names_each_bad_file(tmp_path, capsys, alarm):
    from bats_cli.data import build_datasets

    root, bad = _hostile_tree(tmp_path / "data")
    data = build_datasets("imagefolder", data_dir=root)
    err = capsys.readouterr().err
    assert len(data.train) == 6 and len(data.test) == 6
    for name in bad:
        assert f"skipped {root / 'train' / 'a' / name}:" in err, (name, err)
    assert "README" not in err and "Traceback" not in err
    assert "fifo.png: not a regular file" in err and "decompression bomb" in err
    # Every image loads: no crash mid-epoch.
    assert [int(data.train[i][1]) for i in range(len(data.train))] == [0, 0, 0, 1, 1, 1]


def test_links_out_of_a_class_folder_never_add_or_relabel_images(tmp_path, capsys, alarm):
    from bats_cli.data import build_datasets

    root, _ = _hostile_tree(tmp_path / "data")
    b = root / "train" / "b"
    (b / "up2").symlink_to(Path("..") / "..")  # the data root: would bring val/ into train
    (b / "up").symlink_to(Path(".."))  # the split: would relabel class a's images as b
    (b / "twin.png").symlink_to(root / "train" / "a" / "1.png")  # another class's image
    data = build_datasets("imagefolder", data_dir=root)
    err = capsys.readouterr().err
    assert len(data.train) == 6 and len(data.test) == 6, err
    assert [int(data.train[i][1]) for i in range(len(data.train))] == [0, 0, 0, 1, 1, 1]
    assert f"skipped {b / 'up2'}: a link that leads out of its class folder" in err
    assert f"skipped {b / 'up'}: a link that leads out of its class folder" in err
    assert f"skipped {b / 'twin.png'}: the same image file as one already used" in err


def test_image_that_breaks_after_the_scan_is_replaced_with_a_warning(tmp_path, capsys):
    from bats_cli.data import build_datasets

    root = tmp_path / "data"
    _hostile_tree(root)
    data = build_datasets("imagefolder", data_dir=root)
    capsys.readouterr()
    victim = Path(data.train.dataset.samples[1][0]) if hasattr(data.train, "dataset") else Path(
        data.train.samples[1][0])
    victim.write_bytes(b"garbage now")
    image, label = data.train[1]
    assert image is not None
    assert f"skipped {victim}" in capsys.readouterr().err


@pytest.mark.parametrize("layout", ["one class", "class without images"])
def test_unusable_class_layouts_are_refused(tmp_path, layout, alarm):
    from bats_cli.data import build_datasets

    root = tmp_path / "data"
    classes = ("a",) if layout == "one class" else ("a", "b")
    for split in ("train", "val"):
        for name in classes:
            (root / split / name).mkdir(parents=True)
            _png(root / split / name / "0.png", 1)
    if layout == "class without images":
        (root / "train" / "b" / "0.png").write_bytes(b"broken")
    with pytest.raises(UserInputError, match="at least two|without usable images"):
        build_datasets("imagefolder", data_dir=root)


def test_gzip_bomb_in_fashion_files_is_refused(tmp_path, monkeypatch):
    import gzip

    from bats_cli.data import idx

    monkeypatch.setattr(idx, "MAX_IDX_BYTES", 10_000)
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(b"\0" * 100_000))
    with pytest.raises(UserInputError, match="more than"):
        idx.read_idx(path, ndim=3)


# --------------------------------------------------------------------------- names are data


def test_genotype_name_cannot_escape_runs(tmp_path):
    from bats_cli.core.genotype import load_genotype
    from bats_cli.training.runloop import default_run_dir

    data = json.loads((REPO / "genotypes" / "bats_c10.json").read_text())
    data["name"] = "x/../../../../elsewhere"
    path = tmp_path / "evil.json"
    path.write_text(json.dumps(data))
    g = load_genotype(path)
    run = default_run_dir("train", g.name)
    assert run.parent == Path("runs") and "/" not in run.name and ".." not in run.name


@pytest.mark.parametrize("field", ["name", "notes", "source"])
def test_control_characters_in_genotype_text_are_refused(tmp_path, field, capsys):
    data = json.loads((REPO / "genotypes" / "bats_c10.json").read_text())
    data[field] = "nice\x1b]0;owned\x07\x1b[31m"
    path = tmp_path / "evil.json"
    path.write_text(json.dumps(data))
    code, out, err = cli(["genotype", "show", str(path)], capsys)
    one_line_error(code, err, "control characters")
    assert "\x1b" not in out + err


def test_markup_in_a_name_is_printed_literally(tmp_path, capsys):
    data = json.loads((REPO / "genotypes" / "bats_c10.json").read_text())
    data["name"] = "[link=http://evil.example]click[/link]"
    path = tmp_path / "g.json"
    path.write_text(json.dumps(data))
    code, out, _ = cli(["genotype", "show", str(path)], capsys)
    assert code == 0 and "[link=http://evil.example]click[/link]" in out and "\x1b]8" not in out


def test_safe_name_and_safe_text():
    from bats_cli.core.names import safe_name, safe_text

    assert safe_name("../..") == "run" and safe_name("a" * 500) == "a" * 64
    assert safe_name(".hidden/../x") == "hidden_._x"
    assert safe_text("ok\x1b[2J\x1b]0;title\x07 \x9b31m\nnext") == "ok ?31m next"


# --------------------------------------------------------------------------- checkpoints


def _tiny_checkpoint(path: Path, **tamper) -> Path:
    from bats_cli.core.zoo import resolve_genotype
    from bats_cli.models.modelio import model_tensors, network_settings
    from bats_cli.models.networks import build_network
    from bats_cli.storage.checkpoint import save_checkpoint

    g = resolve_genotype("bats_c10")
    model = build_network(g, layers=3, channels=6, num_classes=10, in_channels=1)
    tensors = model_tensors(model)
    tensors.update(tamper.pop("tensors", {}))
    config = {"network": network_settings(model), "data": {"name": "fashion-mini"}, "run": {}}
    config.update(tamper.pop("config", {}))
    return save_checkpoint(path, tensors, kind="train", config=config, epoch=1,
                           genotype_json=g.to_json(), extra=tamper.pop("extra", None))


def test_valid_tiny_checkpoint_loads(tmp_path):
    from bats_cli.models.modelio import load_model

    load_model(_tiny_checkpoint(tmp_path / "ok.safetensors"))


@pytest.mark.parametrize(
    "tamper, needle",
    [
        ({"tensors": {"model.classifier.weight": torch.full((10, 1), float("nan"))}}, "NaN"),
        ({"tensors": {"extra.inf": torch.tensor([float("inf")])}}, "NaN or infinite"),
        ({"tensors": {"model.classifier.bias": torch.zeros(10, dtype=torch.complex64)}}, "dtype"),
        ({"config": {"network": {"channels": "6"}}}, "config.network"),
        ({"config": {"network": {"channels": 60000, "layers": 3}}}, "config.network"),
        ({"config": {"data": {"image_size": -1}}}, "config.data"),
        ({"config": {"data": {"augment": {"cutout": 4, "evil": 1}}}}, "config.data"),
        ({"config": {"run": {"seed": "abc"}}}, "config.run"),
        ({"config": {"run": {"num_workers": 100000}}}, "config.run"),
        ({"extra": {"bats_running": json.dumps({"loss_sum": "x"})}}, "bats_running"),
        ({"extra": {"bats_optimizer": json.dumps({"state": {"w": {"step": {"__tensor__": 1, "dtype": "load"}}},
                                                  "param_groups": [{"params": ["w"]}]})}}, "not allowed"),
        ({"extra": {"bats_optimizer": "[" * 5000 + "]" * 5000}}, "nested deeper"),
        ({"extra": {"arch_state": json.dumps({"space": "bats", "steps": 4, "temperature_normal": -1,
                                              "temperature_reduce": 1, "candidates_normal": [],
                                              "candidates_reduce": []})}}, "arch_state"),
    ],
)
def test_tampered_checkpoints_are_refused_with_one_line(tmp_path, capsys, tamper, needle):
    path = tmp_path / "bad.safetensors"
    tensors = tamper.get("tensors", {})
    if "model.classifier.weight" in tensors:
        # Same shape as the real classifier, so only the values are wrong.
        from bats_cli.core.zoo import resolve_genotype
        from bats_cli.models.networks import build_network

        shape = build_network(resolve_genotype("bats_c10"), layers=3, channels=6, num_classes=10,
                              in_channels=1).classifier.weight.shape
        tensors["model.classifier.weight"] = torch.full(shape, float("nan"))
    if "config" in tamper and "network" in tamper["config"]:
        from bats_cli.core.zoo import resolve_genotype
        from bats_cli.models.modelio import network_settings
        from bats_cli.models.networks import build_network

        base = network_settings(build_network(resolve_genotype("bats_c10"), layers=3, channels=6,
                                              num_classes=10, in_channels=1))
        tamper["config"]["network"] = {**base, **tamper["config"]["network"]}
    _tiny_checkpoint(path, **tamper)
    one_line_error(*cli(["eval", str(path)], capsys)[::2], needle)


def test_integer_weights_are_refused_where_floats_are_expected(tmp_path, capsys):
    from bats_cli.core.zoo import resolve_genotype
    from bats_cli.models.networks import build_network

    shape = build_network(resolve_genotype("bats_c10"), layers=3, channels=6, num_classes=10,
                          in_channels=1).classifier.weight.shape
    path = _tiny_checkpoint(tmp_path / "int.safetensors",
                            tensors={"model.classifier.weight": torch.ones(shape, dtype=torch.int64)})
    one_line_error(*cli(["eval", str(path)], capsys)[::2], "classifier.weight", "int64")


@pytest.mark.parametrize("kind", ["fifo", "device", "too big"])
def test_special_files_as_inputs_are_refused_without_blocking(tmp_path, capsys, kind, alarm):
    if kind == "fifo":
        path = tmp_path / "input.json"
        os.mkfifo(path)
    elif kind == "device":
        path = Path("/dev/zero")
    else:
        from bats_cli.core.genotype import MAX_TEXT_BYTES

        path = tmp_path / "big.json"
        path.write_bytes(b" " * (MAX_TEXT_BYTES + 10))
    one_line_error(*cli(["genotype", "validate", str(path)], capsys)[::2], str(path))
    if kind != "too big":
        one_line_error(*cli(["eval", str(path)], capsys)[::2], "not a regular file")
        one_line_error(*cli(["genotype", "import", str(path)], capsys)[::2], "not a regular file")


# --------------------------------------------------------------------------- resource bombs


def test_absurd_network_sizes_are_refused_before_allocation(capsys):
    # Bigger than this machine: refused from the meta-device estimate.
    one_line_error(*cli(["flops", "bats_c10", "--channels", "9999"], capsys)[::2], "needs about")
    # Bigger than any network: refused before even the estimate is built.
    one_line_error(*cli(["flops", "bats_c10", "--channels", "60000"], capsys)[::2], "absurd")
    one_line_error(*cli(["flops", "bats_c10", "--layers", "1000000"], capsys)[::2], "absurd")
    one_line_error(*cli(["train", "bats_c10", "--image-size", "100000"], capsys)[::2], "--image-size", "4096")
    one_line_error(*cli(["train", "bats_c10", "--num-workers", "100000"], capsys)[::2], "--num-workers")
    one_line_error(*cli(["eval", "x", "--threads", "99999"], capsys)[::2], "--threads")


def test_huge_cells_are_refused(tmp_path, capsys):
    data = json.loads((REPO / "genotypes" / "bats_c10.json").read_text())
    data["normal"] = [["skip_connect", 0], ["skip_connect", 1]] * 500
    data["normal_concat"] = [2]
    path = tmp_path / "huge.json"
    path.write_text(json.dumps(data))
    one_line_error(*cli(["flops", str(path)], capsys)[::2], "at most 64")


def test_huge_supernet_is_refused_before_allocation():
    from bats_cli.models.supernet import SuperNet, SupernetConfig
    from bats_cli.utils.preflight import check_supernet_fits

    conf = SupernetConfig(channels=60000, layers=5, num_classes=10, in_channels=3)
    with pytest.raises(UserInputError, match="search supernet needs about"):
        check_supernet_fits(lambda: SuperNet(conf))


# Runs ``python -m bats_cli ARGS`` as its only child and prints the child's peak RSS (KiB) last.
_PEAK_RSS_OF_CHILD = (
    "import resource, subprocess, sys\n"
    "rc = subprocess.run([sys.executable, '-m', 'bats_cli', *sys.argv[1:]]).returncode\n"
    "print('maxrss', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n"
    "sys.exit(rc)\n"
)


def _bats_peak_rss(args):
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", _PEAK_RSS_OF_CHILD, *args], env=_env(),
                          capture_output=True, text=True, timeout=300)
    maxrss_kib = int(proc.stdout.strip().splitlines()[-1].split()[1])
    return proc, time.monotonic() - started, maxrss_kib * 1024


@pytest.mark.slow
def test_search_too_big_to_measure_is_refused_before_allocating(tmp_path):
    # Parameters under every size cap, but one measured step (supernet, copy, gradients,
    # activations) is ~1 TB: refused from the meta-device estimate, nothing built or measured.
    out = tmp_path / "big"
    args = ["search", "--preset", "tiny", "--channels", "15996", "--out", str(out), "--device", "cpu"]
    proc, seconds, peak = _bats_peak_rss([*args, "--dry-run"])
    # The plan's data line comes first (printed before the estimate), then one error line.
    *progress, last = proc.stderr.strip().splitlines()
    assert all(p.startswith("plan: ") for p in progress) and len(progress) <= 1, proc.stderr
    line = one_line_error(proc.returncode, last, "measuring one step", "--channels", "--layers")
    assert "GiB of RAM" in line and "Traceback" not in proc.stderr
    assert seconds < 120 and peak < 3 * 2**30, (seconds, peak)
    assert not out.exists()
    # --ignore-plan never measures what cannot fit either: the plan says it is an estimate.
    proc, seconds, peak = _bats_peak_rss([*args, "--dry-run", "--ignore-plan"])
    assert proc.returncode == 0, proc.stderr
    assert "plan: estimate only, not measured" in proc.stderr
    assert peak < 3 * 2**30 and not out.exists(), peak


def test_step_estimate_of_a_built_network_allocates_nothing():
    from bats_cli.core.zoo import resolve_genotype
    from bats_cli.models.networks import build_network
    from bats_cli.training.plan import estimate_step
    from bats_cli.utils.preflight import estimate_network_bytes

    net = build_network(resolve_genotype("bats_c10"), layers=3, channels=6, num_classes=10, in_channels=1)
    before = [p.detach().clone() for p in net.parameters()]
    step = estimate_step(net, input_shape=(1, 16, 16))
    assert step.built and step.batch == 4 and step.activation_bytes > 0
    assert step.params == sum(p.numel() for p in net.parameters())
    assert step.need_bytes == 2 * step.param_bytes + step.activation_bytes
    assert all(p.device.type == "cpu" and torch.equal(p, b) for p, b in zip(net.parameters(), before))
    # The meta twin has the real network's shapes: the same sizes as a fresh meta build.
    fresh = estimate_network_bytes(lambda: build_network(resolve_genotype("bats_c10"), layers=3, channels=6,
                                                         num_classes=10, in_channels=1),
                                   input_shape=(1, 16, 16), batch_size=4, training=False)
    assert (fresh.params, fresh.activation_bytes) == (step.params, step.activation_bytes)


def test_estimate_matches_the_real_network():
    from bats_cli.core.zoo import resolve_genotype
    from bats_cli.models.networks import build_network
    from bats_cli.utils.preflight import estimate_network_bytes

    g = resolve_genotype("bats_c10")

    def build():
        return build_network(g, layers=3, channels=6, num_classes=10, in_channels=1)

    est = estimate_network_bytes(build, input_shape=(1, 32, 32), batch_size=8)
    assert est.params == sum(p.numel() for p in build().parameters())
    assert est.param_bytes == 16 * est.params and est.activation_bytes > 0
    assert estimate_network_bytes(build, input_shape=(1, 32, 32), batch_size=16).activation_bytes == (
        2 * est.activation_bytes)


def test_corrupt_rng_state_in_a_checkpoint_is_one_line():
    from bats_cli.utils.runtime import restore_rng_state, rng_state_tensors

    state = rng_state_tensors()
    state["rng.python_mt"] = torch.zeros(3, dtype=torch.int64)
    with pytest.raises(UserInputError, match="random-number state is corrupt"):
        restore_rng_state(state)


def test_export_never_replaces_its_input(tmp_path, capsys):
    model = tmp_path / "model.packed.safetensors"
    model.write_bytes(b"precious")
    one_line_error(*cli(["export", str(model), "-o", str(model), "--force"], capsys)[::2], "own input")
    assert model.read_bytes() == b"precious"


def test_onnx_inputs_are_validated_like_checkpoints(tmp_path, capsys, alarm):
    fifo = tmp_path / "m.onnx"
    os.mkfifo(fifo)
    one_line_error(*cli(["eval", str(fifo)], capsys)[::2], "not a regular file")
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    model = helper.make_model(graph)
    g = (REPO / "genotypes" / "bats_c10.json").read_text()
    for key, value in {"bats_kind": "onnx", "bats_genotype": g,
                       "bats_config": json.dumps({"network": {"channels": -5}})}.items():
        model.metadata_props.add(key=key, value=value)
    path = tmp_path / "evil.onnx"
    onnx.save(model, str(path))
    one_line_error(*cli(["eval", str(path)], capsys)[::2], "config.network")


@pytest.mark.parametrize("name", [".lock", "metrics.csv"])
def test_planted_links_in_a_run_directory_redirect_no_write(tmp_path, name):
    from bats_cli.storage.rundir import RunDir

    victim = tmp_path / "bashrc"
    victim.write_text("keep me\n")
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text("{}")
    (run / name).symlink_to(victim)
    with pytest.raises(UserInputError, match="symbolic link"):
        RunDir(run, resume=True)
    assert victim.read_text() == "keep me\n"


def test_search_state_pointing_past_the_last_stage_is_refused(tmp_path):
    from bats_cli.storage.checkpoint import read_metadata, save_checkpoint

    state = {"stage": 63, "epoch": 0, "step": 0, "steps_per_epoch": 5, "stage_seconds": [],
             "in_channels": 1, "num_classes": 10}
    path = save_checkpoint(tmp_path / "s.safetensors", {"x": torch.zeros(1)}, kind="search",
                           config={"layers": [5, 11, 17]}, epoch=0,
                           extra={"search_state": json.dumps(state)})
    with pytest.raises(UserInputError, match="stage 63 does not exist"):
        read_metadata(path)


@pytest.mark.slow
def test_a_signal_while_the_process_shuts_down_still_exits_130():
    # A second SIGTERM (SLURM, docker stop) often lands after the checkpoint is saved, while
    # Python tears torch down: the default handler would make that 143.
    code = (
        "import atexit, os, signal, time\n"
        "import bats_cli.cli.lifecycle as cli\n"
        "def main():\n"
        "    atexit.register(lambda: (os.kill(os.getpid(), signal.SIGTERM), time.sleep(2)))\n"
        "cli.main = main\n"
        "cli.entry()\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 130, proc.stderr
    assert "Traceback" not in proc.stderr
