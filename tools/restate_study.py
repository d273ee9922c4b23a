#!/usr/bin/env python3
"""Restate a committed study summary (results.json) whose run directories no longer exist.

Studies summarised before `bats ablate` recorded executed commands and paired statistics keep
their per-job numbers; this recomputes what can be computed from those numbers alone, with the
same code `bats ablate` uses today, and removes what should not be in a committed file:

* adds ``comparisons`` / ``comparisons_step1`` (paired differences, bootstrap interval, t, exact
  Wilcoxon, wins, verdict) from the per-job top-1s (no per-image predictions: no McNemar) and each
  job's ``top1_se`` (binomial, from the number of test images given);
* drops each job's ``command`` (it was regenerated from the code of the day, not recorded);
* makes paths relative: job ``dir`` to the study, ``reused_from`` to the study's parent, and
  ``data_dir`` to ``../shared/datasets/<name>``;
* rewrites results.md beside it.

    python tools/restate_study.py docs/ablations/temperature --test-images 2000
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from bats_cli.core.fileio import atomic_write_json, atomic_write_text
from bats_cli.studies.compare import compare
from bats_cli.studies.jobs import StudyOptions
from bats_cli.studies.results import markdown
from bats_cli.studies.stats import binomial_se


def _relative(path: str | None, marker: str) -> str | None:
    """The part of an absolute ``path`` after its ``marker`` directory (None stays None)."""
    if not path:
        return path
    parts = Path(path).parts
    return "/".join(parts[parts.index(marker) + 1:]) if marker in parts else path


def restate(study_dir: Path, test_images: int) -> dict:
    summary = json.loads((study_dir / "results.json").read_text(encoding="utf-8"))
    study = summary["study"]
    if summary.get("data_dir"):
        summary["data_dir"] = "../shared/datasets/" + Path(summary["data_dir"]).name
    for job in summary["jobs"]:
        job.pop("command", None)
        g = job.get("genotype")
        if isinstance(g, dict) and isinstance(g.get("source"), str):
            g["source"] = re.sub(r"/\S*/ablations-run/", "", g["source"])
        job["dir"] = f"{job['variant']}/seed{job['seed']}"
        if job.get("reused_from"):
            job["reused_from"] = "../" + _relative(job["reused_from"], "ablations-run")
        if job.get("binary_top1") is not None:
            job["n_images"] = test_images
            job["top1_se"] = round(binomial_se(job["binary_top1"], test_images), 4)
    o = StudyOptions(study=study, out=study_dir, preset=summary["preset"], seeds=summary["seeds"])
    names = [v["variant"] for v in summary["variants"]]
    summary["comparisons"] = compare(study, names, summary["jobs"], study_dir)
    summary["comparisons_step1"] = compare(study, names, summary["jobs"], study_dir, metric="step1_top1")
    for v in summary["variants"]:
        ses = [j["top1_se"] for j in summary["jobs"] if j["variant"] == v["variant"] and j.get("top1_se")]
        v["top1_se_mean"] = sum(ses) / len(ses) if ses else None
    summary["restated"] = ("per-job numbers as measured; statistics recomputed by tools/restate_study.py; "
                           "commands were not recorded when this study ran")
    atomic_write_json(study_dir / "results.json", summary)
    atomic_write_text(study_dir / "results.md", markdown(summary))
    del o
    return summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("study_dir", type=Path)
    p.add_argument("--test-images", type=int, required=True, help="images of the test split the jobs were scored on")
    a = p.parse_args(argv)
    s = restate(a.study_dir, a.test_images)
    for c in s["comparisons"]:
        print(c["verdict"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
