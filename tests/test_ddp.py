"""`torchrun --nproc-per-node 2 -m bats_cli train ...` on CPU (gloo) against one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from bats_cli.core.zoo import resolve_genotype
from bats_cli.data import sharded_loader
from bats_cli.pipeline.train import TrainConfig, train
from bats_cli.storage.checkpoint import load_checkpoint
from bats_cli.utils.distributed import Dist

pytestmark = pytest.mark.slow  # torchrun processes

ARGS = ["--dataset", "fashion-mini", "--layers", "3", "--channels", "6", "--batch-size", "32", "--subset", "128",
        "--epochs", "1", "--device", "cpu"]


def test_shards_cover_the_single_process_batches():
    data = list(range(100))
    single = [b for b in sharded_loader(data, batch_size=8, seed=3, epoch=2, skip=0, dist_info=Dist())]
    ranks = [list(sharded_loader(data, batch_size=8, seed=3, epoch=2, skip=0, dist_info=Dist(r, 2)))
             for r in range(2)]
    assert len(single) == 12 == len(ranks[0]) == len(ranks[1])  # 100 // 8, last partial dropped
    for s, a, b in zip(single, *ranks):
        assert torch.equal(torch.cat([a, b]), s)
    # set_epoch semantics: another epoch, another order; skip resumes mid-epoch
    other = list(sharded_loader(data, batch_size=8, seed=3, epoch=3, skip=0, dist_info=Dist()))
    assert not torch.equal(other[0], single[0])
    later = list(sharded_loader(data, batch_size=8, seed=3, epoch=2, skip=5, dist_info=Dist(1, 2)))
    assert all(torch.equal(x, y) for x, y in zip(later, ranks[1][5:])) and len(later) == 7


def test_torchrun_two_gloo_processes_match_one(tmp_path):
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "bats_cli", "train", "bats_c10", *ARGS, "--out", str(tmp_path / "ddp"), "--json"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1, proc.stdout  # rank 0 only
    ddp = json.loads(lines[0])
    assert ddp["world_size"] == 2

    cfg = TrainConfig(genotype="bats_c10", dataset="fashion-mini", layers=3, channels=6, batch_size=32, subset=128,
                      epochs=1, device="cpu", threads=1)
    one = train(cfg, genotype=resolve_genotype("bats_c10"), out=tmp_path / "one", quiet=True,
                handle_signals=False)
    assert set(ddp) == set(one)
    for key in ("epochs", "steps_per_epoch", "train_images", "test_images", "parameters", "network"):
        assert ddp[key] == one[key], key
    assert 0 <= ddp["final_val_top1"] <= 100
    a, _ = load_checkpoint(tmp_path / "ddp" / "last.safetensors")
    b, _ = load_checkpoint(tmp_path / "one" / "last.safetensors")
    assert {k: v.shape for k, v in a.items() if not k.startswith("rng.")} == {
        k: v.shape for k, v in b.items() if not k.startswith("rng.")}
    rows = (tmp_path / "ddp" / "metrics.csv").read_text().splitlines()
    assert len(rows) == 2  # header + 1 epoch, written once (rank 0)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_on_cuda(tmp_path, precision):
    cfg = TrainConfig(genotype="bats_c10", dataset="fashion-mini", layers=3, channels=6, batch_size=32, subset=128,
                      epochs=1, device="cuda", precision=precision)
    res = train(cfg, genotype=resolve_genotype("bats_c10"), out=tmp_path / precision, quiet=True,
                handle_signals=False)
    assert res["final_val_top1"] is not None
    tensors, _ = load_checkpoint(tmp_path / precision / "last.safetensors")
    # Latent weights stay fp32 under autocast.
    assert all(v.dtype == torch.float32 for k, v in tensors.items()
               if k.startswith("model.") and v.is_floating_point())


@pytest.mark.parametrize("command", ["train", "binarize"])
def test_dry_run_under_torchrun_stops_every_rank_with_exit_0(tmp_path, command):
    """Rank 0 plans and stops; rank 1 follows it instead of waiting in a collective for it."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    if command == "train":
        args = ["train", "bats_c10", *ARGS]
    else:
        cfg = TrainConfig(genotype="bats_c10", dataset="fashion-mini", layers=3, channels=6, batch_size=32,
                          subset=64, epochs=1, device="cpu", threads=1)
        train(cfg, genotype=resolve_genotype("bats_c10"), out=tmp_path / "step1", quiet=True, handle_signals=False)
        args = ["binarize", str(tmp_path / "step1" / "last.safetensors"), "--device", "cpu"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "bats_cli", *args, "--out", str(tmp_path / "dry"), "--dry-run"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "plan: fits" in proc.stderr and "internal error" not in proc.stderr
    assert not (tmp_path / "dry").exists()  # nothing started
