"""`torchrun --nproc-per-node 2 -m bats_cli search ...` on CPU (gloo): one model on every rank,
exact resume after SIGTERM, and the same search as one process whose BatchNorm sees half batches."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from bats_cli.storage.checkpoint import load_checkpoint, read_metadata

pytestmark = pytest.mark.slow  # torchrun processes

# 16 images per half, batch 8 (4 per process): 2 steps per epoch, 2 stages of 2 epochs.
FLAGS = ["--dataset", "fashion-mini", "--subset", "32", "--image-size", "8", "--batch-size", "8",
         "--epochs", "2", "--warmup", "1", "--channels", "6", "--layers", "3,3", "--ops", "8,3",
         "--threads", "1", "--device", "cpu"]
CONFIG = dict(dataset="fashion-mini", subset=32, image_size=8, batch_size=8, epochs=2, warmup=1,
              channels=6, layers=(3, 3), ops=(8, 3), threads=1, device="cpu")


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    return env


def _torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
            "-m", "bats_cli", "search", *args]


def _model(path: Path) -> dict[str, torch.Tensor]:
    """α and weights (BatchNorm running statistics excluded: rank 0's, updated per half batch)."""
    tensors, _ = load_checkpoint(path, expect_kind="search")
    return {k: v for k, v in tensors.items()
            if k.startswith("model.") and v.is_floating_point() and "running_" not in k}


@pytest.mark.timeout(900)
@pytest.mark.slow
def test_two_processes_agree_resume_after_sigterm_and_match_one(tmp_path, monkeypatch):
    out = tmp_path / "ddp"
    # SIGTERM to the whole job (as SLURM or Ctrl-C send it): every worker gets it directly and
    # again from torchrun, which must still count as one request (save, then exit 130).
    proc = subprocess.Popen(_torchrun(*FLAGS, "--out", str(out), "--json"), cwd=tmp_path, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    deadline = time.monotonic() + 300
    while not (out / "alphas" / "stage1_epoch01.json").exists() and proc.poll() is None:
        assert time.monotonic() < deadline, "no epoch finished"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode != 0, stdout
    assert stderr.count("continue with --resume") == 1, stderr[-3000:]  # rank 0 saved, once
    assert "KeyboardInterrupt" not in stderr  # torchrun's relay was not taken for a second signal
    meta = read_metadata(out / "last.safetensors")
    assert meta.kind == "search"
    stopped_at = (int(meta.extra["stage"]), meta.epoch, meta.step)
    assert stopped_at >= (1, 1, 0) and stopped_at < (2, 2, 0)

    resumed = subprocess.run(_torchrun("--out", str(out), "--resume", "--json", "-q"), cwd=tmp_path,
                             env=_env(), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    lines = [line for line in resumed.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1, resumed.stdout  # rank 0 prints
    result = json.loads(lines[0])
    assert (result["world_size"], result["per_rank_batch"]) == (2, 4)
    # Both ranks derived the same final cell (checked at every epoch end, too).
    digests = result["rank_genotype_sha256"]
    assert len(digests) == 2 and digests[0] == digests[1]
    saved = json.loads((out / "genotype.json").read_text())
    assert (saved["normal"], saved["reduce"]) == (result["genotype"]["normal"], result["genotype"]["reduce"])
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3, 4]

    # One process whose BatchNorm normalises each half of a batch on its own takes the steps the
    # two ranks take together (averaging the halves' gradients = the gradient of the batch mean).
    from bats_cli.models.supernet import SuperNet
    from bats_cli.nas.search import SearchConfig, run_search

    forward = SuperNet.forward
    monkeypatch.setattr(SuperNet, "forward",
                        lambda self, x, *a, **k: torch.cat([forward(self, c, *a, **k) for c in x.chunk(2)]))
    one = run_search(SearchConfig(**CONFIG), out_dir=tmp_path / "one")
    assert (one.genotype.normal, one.genotype.reduce) == (tuple(map(tuple, saved["normal"])),
                                                         tuple(map(tuple, saved["reduce"])))
    for name in ("stage1.safetensors", "last.safetensors"):
        a, b = _model(out / name), _model(tmp_path / "one" / name)
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6, msg=f"{name} {key}")
    # The running sums survived the interruption: every epoch's row covers all of its images.
    one_rows = list(csv.DictReader(open(tmp_path / "one" / "metrics.csv")))
    for r, o in zip(rows, one_rows):
        assert r["train_acc"] == o["train_acc"] and r["arch_acc"] == o["arch_acc"]
        assert float(r["train_loss"]) == pytest.approx(float(o["train_loss"]), rel=1e-5)


def test_batch_must_split_over_the_processes(tmp_path):
    from bats_cli.core.errors import UserInputError
    from bats_cli.nas.search_records import check_search_batch
    from bats_cli.utils.distributed import Dist

    check_search_batch(8, Dist(0, 2))
    with pytest.raises(UserInputError, match="global batch and must be divisible by the number of processes"):
        check_search_batch(9, Dist(0, 2))


# --------------------------------------------------------------------------- helpers, 2 gloo ranks


class _Supernet(torch.nn.Module):
    """What check_ranks_agree reads of a SuperNet."""

    def __init__(self, shift: float):
        super().__init__()
        self.alpha_normal = torch.nn.Parameter(torch.zeros(2, 3) + shift)
        self.alpha_reduce = torch.nn.Parameter(torch.ones(2, 3))
        self.w = torch.nn.Parameter(torch.full((4,), 2.0))

    def weight_parameters(self):
        return [self.w]


def _ranks(rank: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    from bats_cli.core.errors import RunFailure
    from bats_cli.core.genotype import Genotype
    from bats_cli.core.zoo import resolve_genotype
    from bats_cli.nas.search_records import check_ranks_agree
    from bats_cli.utils.distributed import (
        Dist,
        average_gradients,
        rank_digests,
        rank_divergence,
    )

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    d, cpu = Dist(rank, 2), torch.device("cpu")
    found: dict = {}
    p = torch.nn.Parameter(torch.zeros(3))
    q = torch.nn.Parameter(torch.zeros(2))  # no gradient on any rank: skipped
    p.grad = torch.full((3,), float(rank + 1))
    average_gradients([p, q], d)
    found["mean_grad"] = p.grad.tolist()
    found["divergence"] = rank_divergence(torch.tensor([0.0, float(rank)]), d, cpu)
    found["digests"] = rank_digests("same", d, cpu) + rank_digests(f"rank {rank}", d, cpu)
    g = resolve_genotype("bats_c10")
    other = g.to_dict()
    other["normal"] = [list(e) for e in other["normal"]]
    other["normal"][0][0] = "max_pool_3x3" if other["normal"][0][0] != "max_pool_3x3" else "avg_pool_3x3"
    cases = {
        "another_cell": (_Supernet(0.0), g if rank == 0 else Genotype.from_dict(other)),
        "another_alpha": (_Supernet(1e-3 * rank), g),
        "float_noise": (_Supernet(1e-9 * rank), g),
    }
    for name, (model, genotype) in cases.items():
        try:
            found[name] = check_ranks_agree(model, genotype, d, cpu, where="stage 1, epoch 3")
            found[name + "_alpha"] = model.alpha_normal.detach().flatten().tolist()
        except RunFailure as exc:
            found[name] = f"RunFailure: {exc}"
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(found))
    dist.destroy_process_group()


def test_rank_helpers_and_the_divergence_check_on_two_gloo_ranks(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_ranks, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["mean_grad"] == r1["mean_grad"] == [1.5, 1.5, 1.5]
    assert r0["divergence"] == r1["divergence"] == 1.0
    same, differ = r0["digests"][:2], r0["digests"][2:]
    assert same[0] == same[1] and differ[0] != differ[1] and r1["digests"] == r0["digests"]
    for r in (r0, r1):
        assert r["another_cell"].startswith("RunFailure: data-parallel search: rank 1 derived another cell "
                                            "than rank 0 at stage 1, epoch 3"), r["another_cell"]
        assert "different models at stage 1, epoch 3" in r["another_alpha"], r["another_alpha"]
        assert "α differs from rank 0's by up to 0.001" in r["another_alpha"]
        # Float noise passes, and then every rank holds rank 0's α exactly.
        assert isinstance(r["float_noise"], list) and r["float_noise"][0] == r["float_noise"][1]
        assert r["float_noise_alpha"] == [0.0] * 6
