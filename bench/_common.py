"""Shared helpers of the bench scripts: timing, memory in a fresh process, output.

Every script prints one JSON object as the first line of stdout; ``--table`` adds a readable
table after it (so ``| head -1`` still gives the JSON).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from bats_cli.utils.memory import proc_kib, reset_peak_rss, trim_heap  # noqa: E402
from bats_cli.utils.runtime import memory_format  # noqa: E402


def add_common_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default: cpu)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--reps", type=int, default=5, help="timed repetitions per variant (interleaved)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed repetitions per variant first")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--table", action="store_true", help="also print a readable table")


def make_step(model, x, y, device, aux_weight: float = 0.4) -> Callable[[], None]:
    """One training step of ``model`` on the batch ``(x, y)`` (Adam; plus the auxiliary loss when the
    model returns one), in the memory format `bats train` picks (channels_last for the cells' grouped
    convs on CPU)."""
    fmt = memory_format(device, model)
    model = model.to(device, memory_format=fmt).train()
    x = x.contiguous(memory_format=fmt)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        out = model(x)
        if isinstance(out, tuple):
            loss = F.cross_entropy(out[0], y) + aux_weight * F.cross_entropy(out[1], y)
        else:
            loss = F.cross_entropy(out, y)
        loss.backward()
        optimizer.step()

    return step


def setup(args) -> torch.device:
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    name = args.device
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but CUDA is not available")
    return device


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved_medians(
    fns: dict[str, Callable[[], None]], *, reps: int, warmup: int, device: torch.device
) -> dict[str, list[float]]:
    """Time each function ``reps`` times, interleaved (ABBA order) so machine load hits all alike."""
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    sync(device)
    times: dict[str, list[float]] = {name: [] for name in names}
    for rep in range(reps):
        order = names if rep % 2 == 0 else names[::-1]
        for name in order:
            sync(device)
            start = time.perf_counter()
            fns[name]()
            sync(device)
            times[name].append(time.perf_counter() - start)
    return times


def median(values: list[float]) -> float:
    return statistics.median(values)


class _RssSampler(threading.Thread):
    """Fallback where VmHWM cannot be reset: sample the RSS every millisecond."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak = proc_kib("VmRSS") or 0
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            self.peak = max(self.peak, proc_kib("VmRSS") or 0)
            time.sleep(0.001)


def peak_memory_of(fn: Callable[[], None], *, warmup: int, steps: int, device: torch.device) -> int:
    """Peak memory in bytes that ``steps`` calls of ``fn`` add on top of what exists before them.

    ``warmup`` calls first allocate what stays (optimizer state, gradients, oneDNN kernels).
    CUDA: ``max_memory_allocated`` above the allocated memory before. CPU: peak RSS above the
    RSS before (free heap memory handed back first, the kernel's peak mark reset); run it in a
    fresh process per variant (``measure_in_subprocess``), so nothing of another variant is
    counted or reused.
    """
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        sync(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        for _ in range(steps):
            fn()
        sync(device)
        return torch.cuda.max_memory_allocated(device) - base
    gc.collect()
    trim_heap()
    base = proc_kib("VmRSS")
    if base is not None and reset_peak_rss():
        for _ in range(steps):
            fn()
        return max(0, (proc_kib("VmHWM") or 0) - base) * 1024
    sampler = _RssSampler()
    base = sampler.peak
    sampler.start()
    try:
        for _ in range(steps):
            fn()
    finally:
        sampler.stop.set()
        sampler.join()
    return max(0, sampler.peak - base) * 1024


# Large blocks straight from mmap and back to the system on free: RSS then follows the live
# tensors instead of what glibc's heap keeps around (only set for the measuring subprocess).
MEASURE_ENV = {"MALLOC_MMAP_THRESHOLD_": str(256 * 1024), "MALLOC_TRIM_THRESHOLD_": str(256 * 1024)}


def measure_in_subprocess(script: str, argv: list[str]) -> dict:
    """Run ``script argv`` in a fresh interpreter; it prints one JSON object, returned here."""
    proc = subprocess.run(
        [sys.executable, script, *argv], capture_output=True, text=True, check=False,
        env={**os.environ, **MEASURE_ENV},
    )
    if proc.returncode != 0:
        raise SystemExit(f"error: memory measurement failed:\n{proc.stderr.strip()}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def emit(result: dict, table_rows: list[tuple[str, ...]] | None, show_table: bool) -> None:
    print(json.dumps(result, sort_keys=False))
    if show_table and table_rows:
        widths = [max(len(str(row[i])) for row in table_rows) for i in range(len(table_rows[0]))]
        for k, row in enumerate(table_rows):
            print("  ".join(str(cell).ljust(w) for cell, w in zip(row, widths)))
            if k == 0:
                print("  ".join("-" * w for w in widths))


def machine() -> dict:
    return {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "python": sys.version.split()[0],
    }
