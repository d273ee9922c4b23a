"""Mixed precision before any GPU: `--precision bf16` (CPU autocast) through search, train and
binarize, and the fast mixed op's custom autograd functions under autocast. CUDA variants (bf16,
fp16 with the grad scaler) run where CUDA exists (`bench/gpu_check.py` runs the whole pipeline)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import cli

from bats_cli.models.supernet import SuperNet, SupernetConfig
from bats_cli.storage.checkpoint import load_checkpoint, read_metadata

# --preset tiny, on fewer and smaller images so that the three commands take seconds.
SEARCH = ["--preset", "tiny", "--subset", "32", "--image-size", "8", "--batch-size", "8", "--layers", "3,3,3"]
TRAIN = ["--preset", "tiny", "--subset", "64", "--image-size", "8", "--epochs", "1"]


def _grads(net: SuperNet, x, y, device: str, dtype: torch.dtype | None):
    net.zero_grad(set_to_none=True)
    with torch.autocast(device, dtype=dtype or torch.float32, enabled=dtype is not None):
        loss = F.cross_entropy(net(x).float(), y)
    loss.backward()
    alpha = torch.cat([p.grad.flatten() for p in net.arch_parameters()])
    weights = torch.cat([p.grad.flatten() for p in net.weight_parameters() if p.grad is not None])
    return float(loss.detach()), alpha, weights


@pytest.mark.parametrize("mixed_op", ["fast", "reference"])
def test_supernet_gradients_under_bf16_autocast_follow_fp32(mixed_op):
    """The fast op's custom autograd functions leave autocast (they run float32 inside it): α and
    weight gradients stay finite and point where float32's do (binary activations make bf16's
    rounding flip a few signs, so they are close, not equal; the reference op alike)."""
    torch.manual_seed(0)
    net = SuperNet(SupernetConfig(channels=6, layers=3, mixed_op=mixed_op))
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 3, 16, 16, generator=gen), torch.randint(0, 10, (8,), generator=gen)
    loss32, a32, w32 = _grads(net, x, y, "cpu", None)
    loss16, a16, w16 = _grads(net, x, y, "cpu", torch.bfloat16)
    assert math.isfinite(loss16) and abs(loss16 - loss32) < 0.3
    assert torch.isfinite(a16).all() and torch.isfinite(w16).all()
    assert F.cosine_similarity(a32, a16, dim=0) > 0.8
    assert F.cosine_similarity(w32, w16, dim=0) > 0.8
    # Latent weights and α stay float32.
    assert all(p.dtype == torch.float32 for p in net.parameters())


@pytest.mark.slow
def test_search_train_binarize_in_bf16_on_cpu(tmp_path, capsys):
    cpu = ["--device", "cpu", "--precision", "bf16"]
    code, out, err = cli(["search", *SEARCH, *cpu, "--out", str(tmp_path / "s"), "--json", "-q"], capsys)
    assert code == 0, err
    searched = json.loads(out)
    meta = read_metadata(tmp_path / "s" / "last.safetensors")
    assert meta.config["precision"] == "bf16"
    tensors, _ = load_checkpoint(tmp_path / "s" / "last.safetensors")
    alpha = tensors["model.alpha_normal"]
    assert alpha.dtype == torch.float32 and torch.isfinite(alpha).all()
    # α learnt in bf16: it moved from its initial values in the last stage's search epoch.
    init = json.loads((tmp_path / "s" / "alphas" / "stage3_epoch00.json").read_text())
    last = json.loads((tmp_path / "s" / "alphas" / "stage3_epoch02.json").read_text())
    assert init["normal"] != last["normal"]

    code, out, err = cli(["train", searched["genotype_path"], *TRAIN, *cpu, "--out", str(tmp_path / "t"),
                          "--json", "-q"], capsys)
    assert code == 0, err
    trained = json.loads(out)
    assert 0 <= trained["final_val_top1"] <= 100
    assert read_metadata(tmp_path / "t" / "last.safetensors").config["run"]["precision"] == "bf16"

    code, out, err = cli(["binarize", trained["last"], "--preset", "tiny", *cpu, "--out", str(tmp_path / "b"),
                          "-o", str(tmp_path / "m.packed.safetensors"), "--json", "-q"], capsys)
    assert code == 0, err
    binarized = json.loads(out)
    assert 0 <= binarized["binarized_top1"] <= 100
    tensors, _ = load_checkpoint(tmp_path / "b" / "last.safetensors")
    assert all(v.dtype == torch.float32 for k, v in tensors.items()
               if k.startswith("model.") and v.is_floating_point())


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_search_steps_on_cuda(tmp_path, precision):
    """The fast mixed op under CUDA autocast (fp16 with the grad scaler): a short search runs."""
    from bats_cli.nas.search import SearchConfig, run_search
    from bats_cli.utils.runtime import check_precision

    try:
        check_precision(torch.device("cuda"), precision)
    except Exception as exc:  # bf16 on an old GPU
        pytest.skip(str(exc))
    cfg = SearchConfig(dataset="fashion-mini", subset=32, image_size=8, batch_size=8, epochs=2, warmup=1,
                       channels=6, layers=(3, 3), ops=(8, 3), device="cuda", precision=precision)
    result = run_search(cfg, out_dir=tmp_path / precision)
    tensors, _ = load_checkpoint(tmp_path / precision / "last.safetensors")
    assert torch.isfinite(tensors["model.alpha_normal"]).all()
    assert tensors["model.alpha_normal"].dtype == torch.float32
    assert result.genotype.normal


# --------------------------------------------------------------------------- bench/gpu_check.py

GPU_CHECK = Path(__file__).resolve().parents[1] / "bench" / "gpu_check.py"


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only answer")
def test_gpu_check_skips_cleanly_without_cuda():
    proc = subprocess.run([sys.executable, str(GPU_CHECK), "--json"], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 1
    result = json.loads(lines[0])
    assert result["skipped"] is True and result["ok"] is True and "no CUDA" in result["reason"]


@pytest.mark.slow
def test_gpu_check_paper_steps_run_on_cpu_at_toy_size():
    """The paper-setting timing code (the part that first runs on a GPU) works: at toy sizes, bf16."""
    proc = subprocess.run([sys.executable, str(GPU_CHECK), "--device", "cpu", "--smoke", "--skip-pipeline",
                           "--precisions", "bf16", "--reps", "1", "--warmup", "0", "--json"],
                          capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.splitlines()[0])
    assert result["ok"] and result["precisions"] == ["bf16"]
    part = result["paper"]["bf16"]
    assert [s["stage"] for s in part["search"]] == [1, 2, 3]
    assert all(s["step_s"] > 0 and s["peak_gb"] is None for s in part["search"])
    assert part["train"]["step_s"] > 0
