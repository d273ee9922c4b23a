"""Checkpoints: round trip, validation of broken files, atomic saves, optimizer/scheduler state."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from bats_cli.core.errors import UserInputError
from bats_cli.storage import checkpoint as ck
from bats_cli.storage import optim_state


def _small_tensors() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {"w": torch.randn(3, 2), "b": torch.arange(4, dtype=torch.int64)}


def _save_small(path: Path, epoch: int = 1) -> Path:
    return ck.save_checkpoint(
        path, _small_tensors(), kind="train", config={"epochs": 5, "lr": 0.1}, epoch=epoch, step=7
    )


def test_round_trip_tensors_and_metadata(tmp_path):
    base = torch.randn(4, 6)
    tensors = {
        "a": base,
        "tied": base,  # same tensor twice, as with tied weights
        "view": base[1:3],  # a view into the same storage
        "t": base.t(),  # non-contiguous
        "mask": torch.tensor([True, False]),
        "half": torch.randn(3).to(torch.bfloat16),
        "empty": torch.zeros(0),
    }
    genotype = json.dumps({"normal": [["conv", 0]]})
    path = ck.save_checkpoint(
        tmp_path / "last.safetensors",
        tensors,
        kind="search",
        config={"epochs": 3, "nested": {"lr": 0.01}},
        epoch=2,
        step=11,
        genotype_json=genotype,
        extra={"stage": "2", "note": "hello"},
    )
    meta = ck.read_metadata(path)
    assert (meta.kind, meta.epoch, meta.step) == ("search", 2, 11)
    assert meta.config == {"epochs": 3, "nested": {"lr": 0.01}}
    assert meta.genotype_json == genotype
    assert meta.extra == {"stage": "2", "note": "hello"}
    assert meta.format == ck.FORMAT_VERSION
    assert set(meta.versions) == {"bats", "torch", "torchvision", "python"}
    loaded, meta2 = ck.load_checkpoint(path, expect_kind="search")
    assert meta2 == meta
    assert set(loaded) == set(tensors)
    for name, t in tensors.items():
        assert loaded[name].dtype == t.dtype
        assert torch.equal(loaded[name], t), name


def test_no_genotype_and_reserved_extra(tmp_path):
    path = _save_small(tmp_path / "c.safetensors")
    assert ck.read_metadata(path).genotype_json is None
    with pytest.raises(ValueError, match="reserved"):
        ck.save_checkpoint(path, {}, kind="train", config={}, epoch=0, extra={"bats_kind": "x"})
    with pytest.raises(ValueError, match="kind"):
        ck.save_checkpoint(path, {}, kind="weird", config={}, epoch=0)


def test_truncation_at_every_byte_is_a_user_error(tmp_path):
    good = _save_small(tmp_path / "good.safetensors")
    data = good.read_bytes()
    broken = tmp_path / "broken.safetensors"
    for n in range(len(data)):
        broken.write_bytes(data[:n])
        with pytest.raises(UserInputError, match="broken.safetensors"):
            ck.load_checkpoint(broken)
    assert len(data) > 200


def test_truncation_of_a_bigger_checkpoint_sampled(tmp_path):
    tensors = {f"layer{i}.weight": torch.randn(64, 64) for i in range(8)}
    good = ck.save_checkpoint(tmp_path / "g.safetensors", tensors, kind="train", config={}, epoch=0)
    data = good.read_bytes()
    broken = tmp_path / "b.safetensors"
    offsets = sorted({*range(0, 64), *range(64, len(data), 997), len(data) - 1})
    for n in offsets:
        broken.write_bytes(data[:n])
        with pytest.raises(UserInputError):
            ck.load_checkpoint(broken)


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "not a valid safetensors"),
        (b"hello world, definitely not safetensors", "not a valid safetensors"),
        (b"\xff" * 64, "not a valid safetensors"),
    ],
)
def test_garbage_files(tmp_path, content, message):
    path = tmp_path / "x.safetensors"
    path.write_bytes(content)
    with pytest.raises(UserInputError, match=message):
        ck.read_metadata(path)


def test_missing_directory_foreign_and_newer(tmp_path):
    with pytest.raises(UserInputError, match="no such checkpoint"):
        ck.load_checkpoint(tmp_path / "nope.safetensors")
    with pytest.raises(UserInputError, match="is a directory"):
        ck.load_checkpoint(tmp_path)
    foreign = tmp_path / "foreign.safetensors"
    save_file({"x": torch.ones(2)}, str(foreign))
    with pytest.raises(UserInputError, match="not a bats checkpoint"):
        ck.load_checkpoint(foreign)
    newer = tmp_path / "newer.safetensors"
    save_file(
        {"x": torch.ones(2)},
        str(newer),
        metadata={"bats_format": str(ck.FORMAT_VERSION + 1), "bats_kind": "train",
                  "bats_versions": json.dumps({"bats": "9.0"})},
    )
    with pytest.raises(UserInputError, match="newer bats .*9.0"):
        ck.load_checkpoint(newer)


def test_wrong_kind_names_both(tmp_path):
    path = ck.save_checkpoint(tmp_path / "s.safetensors", {}, kind="search", config={}, epoch=0)
    with pytest.raises(UserInputError) as info:
        ck.load_checkpoint(path, expect_kind={"packed", "train", "binarize"}, command="eval")
    msg = str(info.value)
    assert "s.safetensors is a search checkpoint" in msg
    assert "`bats eval` expects a train, binarize or packed checkpoint" in msg
    with pytest.raises(UserInputError, match="expected a train checkpoint"):
        ck.load_checkpoint(path, expect_kind="train")


def test_failed_replace_keeps_previous_good_file(tmp_path, monkeypatch):
    last = _save_small(tmp_path / "last.safetensors", epoch=1)
    before = last.read_bytes()

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    # A failed write is one line (exit 1) naming the file, not an internal error.
    from bats_cli.core.errors import RunFailure

    with pytest.raises(RunFailure, match="cannot write .*last.safetensors.*disk full"):
        _save_small(last, epoch=2)
    monkeypatch.undo()
    assert last.read_bytes() == before
    assert ck.read_metadata(last).epoch == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.safetensors"]  # temp cleaned up


_WRITER = r"""
import sys, torch
from bats_cli.storage.checkpoint import save_checkpoint
path = sys.argv[1]
big = {"w": torch.randn(2_000_000)}
print("ready", flush=True)
epoch = 100
while True:
    epoch += 1
    save_checkpoint(path, big, kind="train", config={}, epoch=epoch)
"""


@pytest.mark.slow
def test_killed_writer_never_leaves_a_broken_last(tmp_path):
    last = _save_small(tmp_path / "last.safetensors", epoch=1)
    proc = subprocess.Popen(
        [sys.executable, "-c", _WRITER, str(last)],
        stdout=subprocess.PIPE,
        cwd=Path(__file__).resolve().parents[1],
    )
    try:
        assert proc.stdout.readline().strip() == b"ready"
        # Kill while a temp file is being written (or as soon after as we can see one).
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not list(tmp_path.glob(".*.tmp")):
            time.sleep(0.002)
        seen_temp = bool(list(tmp_path.glob(".*.tmp")))
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    assert seen_temp
    tensors, meta = ck.load_checkpoint(last)
    assert meta.epoch == 1 or meta.epoch > 100


# --------------------------------------------------------------------------- optimizer state


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))


def _steps(model, opt, sched, n, seed):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(n):
        x = torch.randn(5, 4, generator=gen)
        loss = model(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()


def _make_opt(model, kind, reverse=False):
    params = list(model.named_parameters())
    weights = [p for n, p in params if n.endswith("weight")]
    biases = [p for n, p in params if n.endswith("bias")]
    if reverse:  # a resumed run may list parameters in another order
        weights, biases = weights[::-1], biases[::-1]
    groups = [{"params": weights}, {"params": biases, "lr": 0.05, "weight_decay": 0.0}]
    if kind == "adam":
        opt = torch.optim.Adam(groups, lr=0.01, betas=(0.9, 0.99), weight_decay=1e-4)
    else:
        opt = torch.optim.SGD(groups, lr=0.1, momentum=0.9, nesterov=True)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10)
    return opt, sched


@pytest.mark.parametrize("kind", ["adam", "sgd"])
def test_optimizer_round_trip_is_bit_identical(tmp_path, kind):
    ref = _model()
    opt, sched = _make_opt(ref, kind)
    _steps(ref, opt, sched, 3, seed=1)

    named = dict(ref.named_parameters())
    opt_tensors, opt_json = optim_state.optimizer_state_tensors(opt, named)
    assert "optim.0.weight.exp_avg" in opt_tensors if kind == "adam" else True
    tensors = {**{f"model.{k}": v for k, v in ref.state_dict().items()}, **opt_tensors}
    path = ck.save_checkpoint(
        tmp_path / "last.safetensors",
        tensors,
        kind="train",
        config={},
        epoch=1,
        extra={"optimizer": opt_json, "scheduler": optim_state.state_to_json(sched.state_dict())},
    )

    loaded, meta = ck.load_checkpoint(path, expect_kind="train")
    resumed = _model(seed=123)
    resumed.load_state_dict({k[6:]: v for k, v in loaded.items() if k.startswith("model.")})
    opt2, sched2 = _make_opt(resumed, kind, reverse=True)
    optim_state.load_optimizer_state(opt2, dict(resumed.named_parameters()), loaded, meta.extra["optimizer"])
    sched2.load_state_dict(optim_state.state_from_json(meta.extra["scheduler"]))

    _steps(ref, opt, sched, 4, seed=2)
    _steps(resumed, opt2, sched2, 4, seed=2)
    for (name, a), b in zip(ref.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), name
    assert sched.get_last_lr() == sched2.get_last_lr()
    assert opt.param_groups[0]["betas" if kind == "adam" else "momentum"] == opt2.param_groups[0][
        "betas" if kind == "adam" else "momentum"
    ]


def test_optimizer_state_refuses_other_parameters(tmp_path):
    model = _model()
    opt, _ = _make_opt(model, "adam")
    _steps(model, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda e: 1.0), 1, seed=0)
    tensors, text = optim_state.optimizer_state_tensors(opt, dict(model.named_parameters()))
    other = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3),
                                torch.nn.Linear(3, 3))
    opt2, _ = _make_opt(other, "adam")
    with pytest.raises(UserInputError, match="only in checkpoint: -|not in checkpoint: 3"):
        optim_state.load_optimizer_state(opt2, dict(other.named_parameters()), tensors, text)


def test_state_json_round_trip():
    state = {"a": (1, 2.5), "b": torch.tensor(3.0), 4: [None, True, "x"], "c": {"d": 1e-300}}
    back = optim_state.state_from_json(optim_state.state_to_json(state))
    assert back["a"] == (1, 2.5) and back[4] == [None, True, "x"] and back["c"] == {"d": 1e-300}
    assert back["b"].dtype == torch.float32 and back["b"].item() == 3.0
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    assert optim_state.state_from_json(optim_state.state_to_json(scaler.state_dict())) == scaler.state_dict()
