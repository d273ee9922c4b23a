"""Every CUDA path of `bats` in one command, and the paper's settings measured on this GPU.

    python bench/gpu_check.py [--json] [--out DIR] [--precisions fp32,bf16,fp16]
                              [--skip-pipeline] [--skip-multi-gpu] [--skip-paper] [--reps N]
    python bench/gpu_check.py --device cpu --smoke    # the script itself, on a CPU, in minutes

On a machine with CUDA it runs, each part recorded in one JSON object:

1. ``pipeline``: per precision (fp32, bf16 where the GPU has it, fp16) the tiny pipeline as a user
   runs it, each step a ``bats`` subprocess on ``cuda``: ``search --preset tiny`` -> ``derive``
   -> ``train --preset tiny`` -> ``binarize --preset tiny`` -> ``eval`` of the packed artifact
   -> ``export`` to ONNX -> ``eval`` of the ONNX file. This exercises autocast and the custom
   autograd functions of the fast mixed op (bf16 / fp16), the fp16 grad scaler, channels-last
   on the GPU and pinned-memory loading. Per step: exit status, seconds, the headline number.
2. ``multi_gpu`` (2 GPUs or more): ``torchrun --nproc-per-node 2`` of ``train`` and ``search``
   ``--preset tiny`` (NCCL); the search's two ranks must report the same cell.
3. ``paper``: per precision, one search step (architecture step + weight step, as
   ``bats search`` takes them: :class:`bats_cli.nas.search.Searcher`) of each stage at §6.1's sizes
   (5 / 11 / 17 cells, 8 / 5 / 3 ops per edge, C = 18, batch 96, 32 px; for stages 2 and 3 a
   seeded choice of ops per edge, as ``bench/search_step.py``), and one training step of the
   paper's CIFAR network (``bats_c10`` at ``bats train``'s defaults, batch 256, auxiliary tower):
   median seconds and peak memory (``torch.cuda.max_memory_allocated``: model, optimiser state
   and activations). From them, ``projection``: the paper's search (3 stages × 25 epochs, the
   first 10 weight steps only, 260 steps per epoch on CIFAR-10's 25,000 + 25,000 split) and
   training (600 epochs × 195 steps of 256) on one GPU, step time only (no data loading,
   validation or checkpoints).

Without CUDA it prints ``{"skipped": true, ...}`` and exits 0 (unless ``--device cpu``: the same
checks on the CPU, fp16 left out as ``bats`` refuses it there, no peak memory). ``--smoke``
shrinks everything (pipeline on 8 px images and a few dozen of them, paper steps at 3 cells,
C = 6, batch 4): a test of this script, not a measurement. Exit status 1 if any check failed.
``--json`` prints only the JSON line; without it a table follows it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

PRECISIONS = ("fp32", "bf16", "fp16")
# §6.1 (search) and §6.2 (training) on CIFAR-10: 50,000 training images.
SEARCH_STAGES = {1: (5, 8), 2: (11, 5), 3: (17, 3)}
SEARCH_BATCH, SEARCH_EPOCHS, SEARCH_WARMUP = 96, 25, 10
SEARCH_STEPS_PER_EPOCH = 25_000 // SEARCH_BATCH  # each half of the 50/50 split
TRAIN_BATCH, TRAIN_EPOCHS = 256, 600
TRAIN_STEPS_PER_EPOCH = 50_000 // TRAIN_BATCH
TAIL = 2000  # characters of a failed command's stderr kept in the JSON


# --------------------------------------------------------------------------- subprocesses


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def _run(argv: list[str], *, cwd: Path, timeout: float) -> dict:
    """Run a command; its exit status, seconds, the JSON object it printed (if any), stderr tail."""
    start = time.perf_counter()
    try:
        proc = subprocess.run(argv, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"ok": False, "rc": None, "seconds": round(time.perf_counter() - start, 1),
                "error": f"timed out after {timeout:.0f} s"}
    record: dict = {"ok": proc.returncode == 0, "rc": proc.returncode,
                    "seconds": round(time.perf_counter() - start, 1)}
    objects = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if objects:
        try:
            record["result"] = json.loads(objects[-1])
        except ValueError:
            pass
    if proc.returncode != 0:
        record["stderr"] = proc.stderr[-TAIL:]
    return record


def _bats(*args: str) -> list[str]:
    return [sys.executable, "-m", "bats_cli", *args]


def _torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
            "-m", "bats_cli", *args]


def _pick(result: dict | None, *keys: str) -> dict:
    return {k: result[k] for k in keys if result and k in result}


# --smoke: the tiny presets on fewer, smaller images (seconds per command on a CPU).
SMOKE_SEARCH = ["--subset", "32", "--image-size", "8", "--batch-size", "8", "--layers", "3,3,3"]
SMOKE_TRAIN = ["--subset", "64", "--image-size", "8", "--epochs", "1"]


def pipeline(precision: str, work: Path, timeout: float, *, device: str = "cuda", smoke: bool = False) -> dict:
    """search -> derive -> train -> binarize -> eval -> export -> eval ONNX on ``device`` at ``precision``."""
    d = work / precision
    d.mkdir(parents=True, exist_ok=True)
    common = ["--device", device, "--precision", precision]
    small_search, small_train = (SMOKE_SEARCH, SMOKE_TRAIN) if smoke else ([], [])
    steps: dict[str, dict] = {}

    def step(name: str, argv: list[str], keys: tuple[str, ...]) -> bool:
        record = _run(argv, cwd=d, timeout=timeout)
        summary = _pick(record.get("result"), *keys)
        record.pop("result", None)
        steps[name] = {**record, **summary}
        return record["ok"]

    ok = (step("search", _bats("search", "--preset", "tiny", *small_search, *common, "--out", "search",
                               "--json", "-q"), ("total_seconds", "genotype_path"))
          and step("derive", _bats("derive", "search/last.safetensors", "-o", "derived.json", "--json"), ())
          and step("train", _bats("train", "derived.json", "--preset", "tiny", *small_train, *common,
                                  "--out", "train", "--json", "-q"), ("final_val_top1", "seconds"))
          and step("binarize", _bats("binarize", "train/last.safetensors", "--preset", "tiny", *common,
                                     "--out", "binarize", "-o", "model.packed.safetensors", "--json", "-q"),
                   ("binarized_top1", "step1_top1"))
          and step("eval", _bats("eval", "model.packed.safetensors", *common, "--json"), ("top1", "n_images")))
    if ok:
        ok = step("export", _bats("export", "model.packed.safetensors", "-o", "model.onnx", "--json"),
                  ("max_abs_diff",))
        if ok:
            step("eval_onnx", _bats("eval", "model.onnx", "--json"), ("top1", "n_images"))
    return {"ok": all(s["ok"] for s in steps.values()) and "eval" in steps, "steps": steps}


def multi_gpu(work: Path, timeout: float) -> dict:
    """torchrun on 2 GPUs (NCCL): train and search at --preset tiny."""
    d = work / "ddp"
    d.mkdir(parents=True, exist_ok=True)
    out: dict[str, dict] = {}
    train = _run(_torchrun("train", "bats_c10", "--preset", "tiny", "--device", "cuda", "--out", "train",
                           "--json", "-q"), cwd=d, timeout=timeout)
    out["train"] = {**{k: v for k, v in train.items() if k != "result"},
                    **_pick(train.get("result"), "world_size", "final_val_top1", "seconds")}
    search = _run(_torchrun("search", "--preset", "tiny", "--device", "cuda", "--out", "search", "--json", "-q"),
                  cwd=d, timeout=timeout)
    result = search.get("result") or {}
    digests = result.get("rank_genotype_sha256", [])
    same = len(digests) == 2 and digests[0] == digests[1]
    out["search"] = {**{k: v for k, v in search.items() if k != "result"},
                     **_pick(result, "world_size", "per_rank_batch", "total_seconds", "rank_genotype_sha256"),
                     "ranks_agree": same}
    out["search"]["ok"] = search["ok"] and same
    out["ok"] = out["train"]["ok"] and out["search"]["ok"]
    return out


# --------------------------------------------------------------------------- paper settings


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, *, warmup: int, reps: int, device: torch.device) -> tuple[list[float], int | None]:
    """(seconds of each of ``reps`` calls after ``warmup``, peak bytes allocated during all of
    them on CUDA, else None)."""
    for _ in range(warmup):
        fn()
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(reps):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return times, torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def _gb(peak: int | None) -> float | None:
    return None if peak is None else round(peak / 2**30, 3)


def _free(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def search_step_times(stage: int, precision: str, device: torch.device, *, warmup: int, reps: int,
                      smoke: bool = False) -> dict:
    """One architecture step and one weight step of ``bats search`` at §6.1's stage ``stage``."""
    from search_step import stage_candidates

    from bats_cli.nas.search import SearchConfig, Searcher

    layers, ops = SEARCH_STAGES[stage]
    batch = 4 if smoke else SEARCH_BATCH
    cfg = SearchConfig(device=device.type, precision=precision, batch_size=batch,
                       **({"layers": (3, 3, 3), "channels": 6} if smoke else {}))
    layers = cfg.layers[stage - 1]
    images = torch.utils.data.TensorDataset(torch.zeros(batch, 3, 32, 32),
                                            torch.zeros(batch, dtype=torch.long))
    with tempfile.TemporaryDirectory() as tmp:
        searcher = Searcher(cfg, run=None, out_dir=Path(tmp), device=device, data=(images, images),
                            in_channels=3, num_classes=10)
        searcher.stage = stage - 1
        searcher.candidates_normal, searcher.candidates_reduce = stage_candidates(cfg.space, ops, 0)
        searcher.build_stage(3, 10)
    searcher.model.train()
    gen = torch.Generator().manual_seed(stage)
    xa, xw = (torch.randn(batch, 3, 32, 32, generator=gen).to(device) for _ in range(2))
    ya, yw = (torch.randint(0, 10, (batch,), generator=gen).to(device) for _ in range(2))
    arch, _ = _timed(lambda: searcher.arch_step(xa, ya), warmup=warmup, reps=reps, device=device)
    weight, _ = _timed(lambda: searcher.weight_step(xw, yw), warmup=warmup, reps=reps, device=device)
    both, peak = _timed(lambda: (searcher.arch_step(xa, ya), searcher.weight_step(xw, yw)),
                        warmup=0, reps=reps, device=device)
    result = {"stage": stage, "layers": layers, "ops": ops, "batch": batch,
              "channels": cfg.channels, "arch_step_s": round(statistics.median(arch), 4),
              "weight_step_s": round(statistics.median(weight), 4),
              "step_s": round(statistics.median(both), 4), "peak_gb": _gb(peak)}
    del searcher
    _free(device)
    return result


def train_step_times(precision: str, device: torch.device, *, warmup: int, reps: int,
                     smoke: bool = False) -> dict:
    """One step of ``bats train`` on the paper's CIFAR network (bats_c10 at the defaults)."""
    import torch.nn.functional as F

    from bats_cli.core.zoo import resolve_genotype
    from bats_cli.models.networks import build_network
    from bats_cli.pipeline.train import TrainConfig
    from bats_cli.utils.runtime import autocast, make_grad_scaler, memory_format

    cfg = TrainConfig(genotype="bats_c10", **({"layers": 3, "channels": 6} if smoke else {}))
    batch = 4 if smoke else TRAIN_BATCH
    torch.manual_seed(0)
    model = build_network(resolve_genotype("bats_c10"), kind="cifar", num_classes=10, in_channels=3,
                          width=cfg.width, layers=cfg.layers, channels=cfg.channels, real=cfg.real,
                          auxiliary=cfg.auxiliary, drop_path=cfg.drop_path, activation=cfg.activation)
    model = model.to(device)
    fmt = memory_format(device, model, precision=precision)
    model = model.to(memory_format=fmt).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr or 1e-3)
    scaler = make_grad_scaler(device, precision)
    x = torch.randn(batch, 3, 32, 32, device=device).contiguous(memory_format=fmt)
    y = torch.randint(0, 10, (batch,), device=device)

    def step() -> None:
        with autocast(device, precision):
            out = model(x)
        logits, aux = out if isinstance(out, tuple) else (out, None)
        loss = F.cross_entropy(logits.float(), y)
        if aux is not None:
            loss = loss + 0.4 * F.cross_entropy(aux.float(), y)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    times, peak = _timed(step, warmup=warmup, reps=reps, device=device)
    n_params = sum(p.numel() for p in model.parameters())
    del model, optimizer
    _free(device)
    return {"batch": batch, "parameters": n_params, "step_s": round(statistics.median(times), 4),
            "images_per_s": round(batch / statistics.median(times), 1), "peak_gb": _gb(peak)}


def projection(search: list[dict], train: dict) -> dict:
    """Hours of the paper's search and training on one GPU from the measured step times."""
    search_s = sum(
        SEARCH_STEPS_PER_EPOCH * (SEARCH_WARMUP * s["weight_step_s"] + (SEARCH_EPOCHS - SEARCH_WARMUP) * s["step_s"])
        for s in search
    )
    train_s = TRAIN_EPOCHS * TRAIN_STEPS_PER_EPOCH * train["step_s"]
    return {"search_hours": round(search_s / 3600, 2), "train_hours": round(train_s / 3600, 2),
            "search_steps_per_epoch": SEARCH_STEPS_PER_EPOCH, "train_steps_per_epoch": TRAIN_STEPS_PER_EPOCH,
            "note": "step time only: no data loading, validation or checkpoints"}


def paper(precision: str, device: torch.device, *, warmup: int, reps: int, smoke: bool = False) -> dict:
    try:
        search = [search_step_times(k, precision, device, warmup=warmup, reps=reps, smoke=smoke)
                  for k in SEARCH_STAGES]
        train = train_step_times(precision, device, warmup=warmup, reps=reps, smoke=smoke)
    except Exception as exc:  # report it and go on with the other precisions
        _free(device)
        return {"ok": False, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"}
    part = {"ok": True, "search": search, "train": train}
    if not smoke:
        part["projection"] = projection(search, train)
    return part


# --------------------------------------------------------------------------- main


def _machine() -> dict:
    info = {"torch": torch.__version__, "cuda": torch.version.cuda, "python": sys.version.split()[0],
            "gpus": torch.cuda.device_count() if torch.cuda.is_available() else 0}
    if info["gpus"]:
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_memory_gb=round(props.total_memory / 2**30, 1),
                    capability=f"{props.major}.{props.minor}", bf16=torch.cuda.is_bf16_supported())
    return info


def _gb_text(gb: float | None) -> str:
    return "n/a" if gb is None else f"{gb:.2f} GB"


def _table(result: dict) -> list[str]:
    lines = []
    for precision, part in result.get("pipeline", {}).items():
        for name, s in part.get("steps", {}).items():
            extra = ", ".join(f"{k} {v}" for k, v in s.items() if k not in ("ok", "rc", "seconds", "stderr"))
            lines.append(f"pipeline {precision:4s} {name:9s} {'ok' if s['ok'] else 'FAILED':6s} "
                         f"{s['seconds']:7.1f} s  {extra}")
    for name, s in (result.get("multi_gpu") or {}).items():
        if isinstance(s, dict):
            lines.append(f"2 GPUs   {name:14s} {'ok' if s['ok'] else 'FAILED':6s} {s['seconds']:7.1f} s")
    for precision, part in result.get("paper", {}).items():
        if not part.get("ok"):
            lines.append(f"paper    {precision:4s} FAILED {part.get('error', '')}")
            continue
        for s in part["search"]:
            lines.append(f"paper    {precision:4s} search stage {s['stage']} ({s['layers']} cells, {s['ops']} ops, "
                         f"batch {s['batch']}): {s['step_s']:.3f} s/step, peak {_gb_text(s['peak_gb'])}")
        t = part["train"]
        lines.append(f"paper    {precision:4s} train (batch {t['batch']}): {t['step_s']:.3f} s/step, "
                     f"{t['images_per_s']:.0f} img/s, peak {_gb_text(t['peak_gb'])}")
        p = part.get("projection")
        if p:
            lines.append(f"paper    {precision:4s} projection: search {p['search_hours']:.1f} h, "
                         f"train {p['train_hours']:.1f} h (step time only)")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print only the JSON line")
    parser.add_argument("--out", type=Path, default=None,
                        help="keep the runs here (default: a temporary directory, removed)")
    parser.add_argument("--precisions", default=",".join(PRECISIONS),
                        help="comma-separated subset of fp32,bf16,fp16 (default: all)")
    parser.add_argument("--skip-pipeline", action="store_true")
    parser.add_argument("--skip-multi-gpu", action="store_true")
    parser.add_argument("--skip-paper", action="store_true")
    parser.add_argument("--reps", type=int, default=3, help="timed steps per measurement (median)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per bats command")
    parser.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto",
                        help="auto (default): CUDA, or skip without it; cpu: the checks on the CPU")
    parser.add_argument("--smoke", action="store_true", help="toy sizes: a test of this script")
    args = parser.parse_args(argv)
    precisions = [p for p in args.precisions.split(",") if p]
    bad = [p for p in precisions if p not in PRECISIONS]
    if bad:
        parser.error(f"--precisions: unknown {', '.join(bad)} (choose from {', '.join(PRECISIONS)})")

    started = time.perf_counter()
    result: dict = {"bench": "gpu_check", "machine": _machine(), "smoke": args.smoke}
    if args.device != "cpu" and not torch.cuda.is_available():
        if args.device == "cuda":
            print("error: --device cuda but CUDA is not available", file=sys.stderr)
            return 2
        result.update(skipped=True, ok=True, reason="no CUDA device: nothing to check (torch "
                      f"{torch.__version__}, built with CUDA {torch.version.cuda})")
        print(json.dumps(result))
        return 0
    result["skipped"] = False
    device = torch.device("cpu") if args.device == "cpu" else torch.device("cuda", 0)
    result["device"] = str(device)
    if device.type == "cpu" and "fp16" in precisions:
        precisions.remove("fp16")
        result["fp16"] = "left out: bats refuses fp16 on a CPU"
    if device.type == "cuda" and "bf16" in precisions and not torch.cuda.is_bf16_supported():
        precisions.remove("bf16")
        result["bf16"] = "left out: this GPU has no bfloat16"
    result["precisions"] = precisions
    work = args.out or Path(tempfile.mkdtemp(prefix="bats-gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        if not args.skip_pipeline:
            result["pipeline"] = {p: pipeline(p, work / "pipeline", args.timeout, device=device.type,
                                              smoke=args.smoke) for p in precisions}
        if not args.skip_multi_gpu:
            if device.type == "cuda" and torch.cuda.device_count() >= 2:
                result["multi_gpu"] = multi_gpu(work, args.timeout)
            else:
                gpus = torch.cuda.device_count() if device.type == "cuda" else 0
                result["multi_gpu"] = {"skipped": True, "reason": f"{gpus} GPU(s); 2 needed"}
        if not args.skip_paper:
            result["paper"] = {p: paper(p, device, warmup=args.warmup, reps=args.reps, smoke=args.smoke)
                               for p in precisions}
    finally:
        if args.out is None:
            shutil.rmtree(work, ignore_errors=True)
    parts = [*result.get("pipeline", {}).values(), *result.get("paper", {}).values()]
    if isinstance(result.get("multi_gpu"), dict) and not result["multi_gpu"].get("skipped"):
        parts.append(result["multi_gpu"])
    result["ok"] = all(part.get("ok") for part in parts)
    result["seconds"] = round(time.perf_counter() - started, 1)
    print(json.dumps(result))
    if not args.json:
        print("\n".join(_table(result)))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
