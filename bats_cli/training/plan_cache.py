"""The plan cache: a plan measured once is kept (``$XDG_CACHE_HOME/bats/plans``, keyed by the
network's shapes, data, batch, device, precision, threads and versions), so ``--resume`` and a run
after its ``--dry-run`` reuse it and suggest the same batch size. ``BATS_PLAN_CACHE=0`` turns it off.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict
from pathlib import Path

from bats_cli.training.plan_measure import MEASURE_BATCHES, TIMED_BATCH, MemoryModel


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "bats" / "plans"


def cache_key(*, command, steps, device, dataset, train_images, test_images, input_shape, num_classes,
               precision) -> str:
    import torch

    import bats_cli

    parts = [command, [s.fingerprint for s in steps], str(device), dataset, train_images, test_images,
             list(input_shape), num_classes, precision, torch.get_num_threads(), torch.__version__,
             bats_cli.__version__, MEASURE_BATCHES, TIMED_BATCH]
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:40]


def load_cached(key: str | None):
    """(source, per-stage lines) of an earlier plan with this key, or None."""
    if key is None or os.environ.get("BATS_PLAN_CACHE") == "0":
        return None
    try:
        data = json.loads((_cache_dir() / f"{key}.json").read_text())
        stages = [(MemoryModel(**st["train"]), MemoryModel(**st["eval"]),
                   {k: float(v) for k, v in st["seconds"].items()}, int(st["param_bytes"]))
                  for st in data["stages"]]
        if data["source"] not in ("measured", "estimated") or not stages:
            return None
        return data["source"], stages
    except (OSError, ValueError, KeyError, TypeError):
        return None  # no entry, or one this version cannot read: plan again


def store_cached(key: str | None, source: str, per_stage) -> None:
    if key is None or os.environ.get("BATS_PLAN_CACHE") == "0":
        return
    from bats_cli.core.fileio import atomic_write_json

    stages = [{"train": asdict(t), "eval": asdict(e), "seconds": s, "param_bytes": pb}
              for t, e, s, pb in per_stage]
    try:
        atomic_write_json(_cache_dir() / f"{key}.json", {"source": source, "stages": stages})
    except Exception:  # a read-only or full cache only costs the next plan a measurement
        pass
