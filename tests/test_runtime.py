"""Runtime: atomic writes, RNG state, device/precision, signals, run directory, reporter."""

from __future__ import annotations

import io
import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from bats_cli.core import fileio
from bats_cli.core.errors import Interrupted, UserInputError
from bats_cli.storage import rundir
from bats_cli.storage.checkpoint import load_checkpoint, save_checkpoint
from bats_cli.utils import progress, runtime, signals

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- atomic writes


def test_atomic_write_and_failure_keeps_old(tmp_path, monkeypatch):
    target = tmp_path / "sub" / "a.json"
    fileio.atomic_write_json(target, {"x": float("nan"), "p": Path("/y"), "t": torch.tensor([1, 2])})
    assert json.loads(target.read_text()) == {"x": None, "p": "/y", "t": [1, 2]}
    monkeypatch.setattr(os, "replace", lambda *a: (_ for _ in ()).throw(OSError("nope")))
    from bats_cli.core.errors import RunFailure

    with pytest.raises(RunFailure, match="nope"):  # one clear runtime error naming the file
        fileio.atomic_write_text(target, "new")
    monkeypatch.undo()
    assert json.loads(target.read_text())["p"] == "/y"
    assert sorted(p.name for p in target.parent.iterdir()) == ["a.json"]


# --------------------------------------------------------------------------- RNG


def _draw() -> tuple:
    return (
        torch.rand(3).tolist(),
        random.random(),
        random.gauss(0, 1),
        np.random.rand(2).tolist(),
        float(np.random.standard_normal()),
    )


def test_rng_state_round_trip_through_a_checkpoint(tmp_path):
    runtime.seed_everything(7)
    random.gauss(0, 1)  # leaves a cached gaussian in python's state
    np.random.standard_normal()  # numpy's legacy RNG also caches one
    state = runtime.rng_state_tensors()
    expected = _draw()
    path = save_checkpoint(tmp_path / "c.safetensors", state, kind="train", config={}, epoch=0)
    runtime.seed_everything(99)
    _draw()
    loaded, _ = load_checkpoint(path)
    runtime.restore_rng_state({**loaded, "model.w": torch.ones(1)})  # other keys ignored
    assert _draw() == expected


def test_seed_everything_is_deterministic():
    runtime.seed_everything(3)
    a = _draw()
    runtime.seed_everything(3)
    assert _draw() == a


# --------------------------------------------------------------------------- device / precision


def test_select_device():
    assert runtime.select_device("cpu") == torch.device("cpu")
    assert runtime.select_device("auto").type in ("cpu", "cuda")
    with pytest.raises(UserInputError, match="--device tpu"):
        runtime.select_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(UserInputError, match="CUDA is not available.*--device cpu"):
            runtime.select_device("cuda")


def test_precision_on_cpu():
    cpu = torch.device("cpu")
    with pytest.raises(UserInputError, match="fp16 needs CUDA; use --precision fp32"):
        runtime.autocast(cpu, "fp16")
    with pytest.raises(UserInputError, match="choose one of"):
        runtime.check_precision(cpu, "int8")
    conv = torch.nn.Conv2d(4, 4, 3, groups=2)
    with runtime.autocast(cpu, "bf16"):
        assert conv(torch.randn(1, 4, 8, 8)).dtype == torch.bfloat16
    with runtime.autocast(cpu, "fp32"):
        assert conv(torch.randn(1, 4, 8, 8)).dtype == torch.float32
    assert not runtime.make_grad_scaler(cpu, "bf16").is_enabled()


def test_memory_format():
    cpu = torch.device("cpu")
    assert runtime.memory_format(cpu, "grouped") == torch.channels_last
    assert runtime.memory_format(cpu, "dense") == torch.contiguous_format
    assert runtime.memory_format(cpu, torch.nn.Conv2d(4, 4, 3, groups=4)) == torch.channels_last
    assert runtime.memory_format(cpu, torch.nn.Conv2d(4, 4, 3)) == torch.contiguous_format


# --------------------------------------------------------------------------- signals


def test_graceful_interrupt_in_process():
    previous = signal.getsignal(signal.SIGINT)
    with signals.GracefulInterrupt() as stop:
        assert not stop.requested
        stop.raise_if_requested(lambda: pytest.fail("must not save"))
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.requested and stop.signal_name == "SIGINT"
        with pytest.raises(Interrupted, match="SIGINT; checkpoint saved to X"):
            stop.raise_if_requested(lambda: "X")
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)  # the second one stops at once
    assert signal.getsignal(signal.SIGINT) is previous


# The end of both scripts: run(), exiting as the CLI does on a BatsError (130 when interrupted).
_RUN_THEN_EXIT = r"""
try:
    run()
except BatsError as exc:
    print(f"error: {exc}", file=sys.stderr)
    sys.exit(exc.exit_code)
"""


def _start_script(script, ckpt, **popen):
    """``python -c script CKPT`` from the repository, once it printed "ready"."""
    proc = subprocess.Popen([sys.executable, "-c", script, str(ckpt)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, cwd=REPO, **popen)
    assert proc.stdout.readline().strip() == b"ready"
    return proc


_LOOP = r"""
import sys, time, torch
from bats_cli.core.errors import BatsError
from bats_cli.utils.signals import GracefulInterrupt
from bats_cli.storage.checkpoint import save_checkpoint
out = sys.argv[1]
w = torch.zeros(3)
def run():
    with GracefulInterrupt() as stop:
        for step in range(1, 100000):
            w.add_(1.0)
            time.sleep(0.01)
            if step == 3:
                print("ready", flush=True)
            stop.raise_if_requested(lambda: save_checkpoint(
                out, {"w": w}, kind="train", config={"lr": 0.1}, epoch=0, step=step))
""" + _RUN_THEN_EXIT


@pytest.mark.slow
def test_sigterm_saves_checkpoint_and_exits_130(tmp_path):
    ckpt = tmp_path / "last.safetensors"
    proc = _start_script(_LOOP, ckpt)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert b"interrupted by SIGTERM; checkpoint saved to" in err
    tensors, meta = load_checkpoint(ckpt, expect_kind="train")
    assert meta.step >= 3 and tensors["w"][0].item() == meta.step


_LOADER_LOOP = r"""
import sys, time, torch
from torch.utils.data import DataLoader, TensorDataset
from bats_cli.core.errors import BatsError
from bats_cli.utils.signals import GracefulInterrupt, shield_worker_from_signals
from bats_cli.storage.checkpoint import save_checkpoint
out = sys.argv[1]
loader = DataLoader(TensorDataset(torch.arange(100000.0)), batch_size=1, num_workers=2,
                    worker_init_fn=shield_worker_from_signals)
def run():
    batches = iter(loader)  # workers start before the handler is installed: they need the init fn
    with GracefulInterrupt() as stop:
        for step, (x,) in enumerate(batches, 1):
            time.sleep(0.01)
            if step == 3:
                print("ready", flush=True)
            stop.raise_if_requested(lambda: save_checkpoint(
                out, {"x": x}, kind="search", config={}, epoch=0, step=step))
""" + _RUN_THEN_EXIT


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_to_process_group_with_dataloader_workers(tmp_path, sig):
    ckpt = tmp_path / "last.safetensors"
    proc = _start_script(_LOADER_LOOP, ckpt, start_new_session=True)  # its own process group, like a terminal job
    # What Ctrl-C (or SLURM's scancel) does: signal the main process and its workers.
    os.killpg(proc.pid, sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert err.count(f"{sig.name} received".encode()) == 1, err
    _, meta = load_checkpoint(ckpt, expect_kind="search")
    assert meta.step >= 3


# --------------------------------------------------------------------------- run directory


def test_run_dir_refuses_overwrite_without_resume(tmp_path):
    run = rundir.RunDir(tmp_path / "run", resume=False)
    run.write_config({"epochs": 5})
    saved = json.loads(run.config_path.read_text())
    assert saved["config"] == {"epochs": 5} and "torch" in saved["versions"]
    with pytest.raises(UserInputError, match="use --resume to continue it or choose another --out"):
        rundir.RunDir(tmp_path / "run", resume=False)
    again = rundir.RunDir(tmp_path / "run", resume=True)
    assert not again.resuming and again.checkpoint_to_resume() is None  # nothing saved yet
    save_checkpoint(again.last, {}, kind="train", config={}, epoch=1)
    assert rundir.RunDir(tmp_path / "run", resume=True).checkpoint_to_resume() == again.last
    (tmp_path / "empty").mkdir()
    assert not rundir.RunDir(tmp_path / "empty", resume=False).resuming
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserInputError, match="is a file"):
        rundir.RunDir(tmp_path / "file", resume=False)


def test_metrics_csv_no_duplicates_after_resume(tmp_path):
    run = rundir.RunDir(tmp_path / "run", resume=False)
    for epoch in (1, 2, 3):
        run.append_metrics({"epoch": epoch, "loss": 1.0 / epoch, "acc": torch.tensor(0.5)})
    # Crash after epoch 3's row but the checkpoint says epoch 2 finished: redo epoch 3.
    save_checkpoint(run.last, {}, kind="train", config={}, epoch=2)
    resumed = rundir.RunDir(tmp_path / "run", resume=True)
    resumed.resumed_at(2)
    resumed.append_metrics({"epoch": 3, "loss": 0.3, "acc": 0.6})
    resumed.append_metrics({"epoch": 4, "loss": 0.25, "acc": 0.7, "lr": 0.01})  # new column
    rows = resumed.metrics.read()
    assert [r["epoch"] for r in rows] == ["1", "2", "3", "4"]
    assert rows[2]["loss"] == "0.3" and rows[0]["lr"] == "" and rows[3]["lr"] == "0.01"
    assert (tmp_path / "run" / "metrics.csv").read_text().splitlines()[0] == "epoch,loss,acc,lr"


def test_resume_without_checkpoint_starts_fresh(tmp_path):
    run = rundir.RunDir(tmp_path / "run", resume=False)
    run.append_metrics({"epoch": 1, "loss": 1.0})  # crashed before its first checkpoint
    again = rundir.RunDir(tmp_path / "run", resume=True)
    assert not again.resuming and again.metrics.read() == []


# --------------------------------------------------------------------------- reporter


def test_reporter_plain_one_line_per_epoch():
    stream = io.StringIO()
    rep = progress.Reporter(stream=stream, tty=False)
    for epoch in (1, 2):
        with rep.epoch(f"epoch {epoch}/2", total_steps=3) as bar:
            for _ in range(3):
                bar.update(loss=0.5, acc=0.25)
            bar.set(val_acc=0.75)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("epoch 1/2  3/3 steps") and "val_acc=0.75" in lines[0]
    rep.epoch_summary({"test_acc": 0.9}, desc="final")
    assert stream.getvalue().splitlines()[-1] == "final  test_acc=0.9"


def test_reporter_quiet_and_tty():
    quiet = io.StringIO()
    rep = progress.Reporter(stream=quiet, quiet=True, tty=False)
    with rep.epoch("e", 2) as bar:
        bar.update(loss=1.0)
    rep.line("x")
    assert quiet.getvalue() == ""
    tty = io.StringIO()
    rep = progress.Reporter(stream=tty, tty=True)
    with pytest.raises(RuntimeError):
        with rep.epoch("epoch 1/1", 4) as bar:
            bar.update(loss=2.0)
            raise RuntimeError("boom")
    assert "epoch 1/1  1/4 steps" in tty.getvalue() and "(stopped)" in tty.getvalue()
