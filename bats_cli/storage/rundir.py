"""The run directory of a long command: ``config.json``, ``metrics.csv``, checkpoints, and the lock
that keeps a second run out of it."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bats_cli.core.errors import UserInputError
from bats_cli.core.fileio import atomic_write_json, atomic_write_text, refuse_non_regular
from bats_cli.storage.runlock import RunLock, check_run_dir_free
from bats_cli.utils.provenance import run_record, software_versions

CONFIG_NAME = "config.json"
METRICS_NAME = "metrics.csv"
LAST_NAME = "last.safetensors"
BEST_NAME = "best.safetensors"

# --------------------------------------------------------------------------- run directory


class MetricsCSV:
    """``metrics.csv``: one row per epoch; header from the first row's keys.

    Rows are appended and fsynced; a row with new keys rewrites the file (atomically) with the
    widened header, so the file always parses.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    def read(self) -> list[dict[str, str]]:
        if not self.path.exists():
            return []
        with open(self.path, newline="", encoding="utf-8") as fh:
            return list(csv.DictReader(fh))

    def _header(self) -> list[str]:
        if not self.path.exists():
            return []
        with open(self.path, newline="", encoding="utf-8") as fh:
            return next(csv.reader(fh), [])

    def append(self, row: Mapping[str, Any]) -> None:
        row = {k: _csv_value(v) for k, v in row.items()}
        header = self._header()
        if header and set(row) <= set(header):
            with open(self.path, "a", newline="", encoding="utf-8") as fh:
                csv.DictWriter(fh, fieldnames=header).writerow(row)
                fh.flush()
                os.fsync(fh.fileno())
            return
        rows = self.read()
        header = header + [k for k in row if k not in header]
        self._rewrite(header, [*rows, row])

    def epochs(self, *, key: str = "epoch") -> int:
        """The highest epoch number a row records (0 for none, or an unreadable file)."""
        try:
            numbers = [_as_number(r.get(key)) for r in self.read()]
        except (OSError, ValueError, csv.Error):
            return 0
        finite = [int(n) for n in numbers if n is not None and n == n and abs(n) < 1e12]
        return max(finite, default=0)

    def truncate_after(self, epoch: int, *, key: str = "epoch") -> None:
        """Drop rows whose ``key`` column is greater than ``epoch`` (used when resuming)."""
        rows = self.read()
        kept = [r for r in rows if _as_number(r.get(key)) is None or _as_number(r[key]) <= epoch]
        if len(kept) != len(rows):
            self._rewrite(self._header(), kept)

    def _rewrite(self, header: list[str], rows: list[Mapping[str, Any]]) -> None:
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=header, restval="")
        writer.writeheader()
        writer.writerows(rows)
        atomic_write_text(self.path, buf.getvalue())


def _csv_value(value: Any) -> Any:
    # Tensors and numpy scalars become Python numbers (duck-typed: no torch import for a CSV).
    return value.item() if hasattr(value, "item") else value


def _as_number(text: str | None) -> float | None:
    try:
        return float(text) if text not in (None, "") else None
    except ValueError:
        return None


# Names of files, not of run directories: an --out ending so was meant as -o.
FILE_SUFFIXES = (".safetensors", ".json", ".onnx", ".npy", ".csv", ".png", ".svg", ".html")


def check_run_dir_path(path: str | os.PathLike[str], resume: bool) -> None:
    """Refuse an ``--out`` that is a file, holds a run (without ``--resume``), holds files that
    are not a bats run (with ``--resume``: nothing there may be overwritten), or is locked."""
    from bats_cli.utils.outputs import check_writable_dir

    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserInputError(f"--out {path} is a file, not a directory")
    if not path.exists() and path.suffix.lower() in FILE_SUFFIXES:
        # `--out model.packed.safetensors` where `-o` was meant would make a directory of that name.
        raise UserInputError(
            f"--out {path} looks like a file name, but --out names the run directory (-o names an "
            f"output file); give a directory name without {path.suffix}"
        )
    # Checked before the work starts, not when the first checkpoint is due.
    check_writable_dir(path, flag=f"--out {path}")
    if not path.is_dir():
        return
    try:
        entries = [p.name for p in path.iterdir() if not p.name.startswith(".")]
    except OSError as exc:
        raise UserInputError(f"--out {path}: cannot read it ({exc.strerror or exc})") from None
    markers = (CONFIG_NAME, LAST_NAME, METRICS_NAME)
    if entries and not resume and not any((path / m).is_file() for m in markers):
        shown = ", ".join(sorted(entries)[:3]) + (", ..." if len(entries) > 3 else "")
        raise UserInputError(
            f"--out {path} is not empty and holds no bats run ({shown}); choose a new --out"
        )
    if entries and not resume:
        raise UserInputError(
            f"{path} already holds a run; use --resume to continue it or choose another --out"
        )
    if entries and resume and not any((path / m).is_file() for m in markers):
        raise UserInputError(
            f"--out {path} holds files but no bats run (no {', '.join(markers)}); "
            "--resume would overwrite them: choose another --out"
        )
    check_run_dir_free(path)


class RunDir:
    """The ``--out`` directory of a long run: ``config.json``, ``metrics.csv``, checkpoints.

    Without ``resume`` an existing non-empty run directory is refused. With ``resume`` a
    directory holding ``last.safetensors`` is continued; one without any (or a missing one)
    starts fresh (the CLI's ``--resume-or-start``; its ``--resume`` refuses that case first).

    Per epoch, append the metrics row *before* saving ``last.safetensors``: a crash in between
    then repeats the epoch and :meth:`resumed_at` drops its stale row (the other order would
    lose the row for good).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        resume: bool,
        warn: Callable[[str], None] | None = None,
    ) -> None:
        self.path = Path(path)
        self._lock: RunLock | None = None
        check_run_dir_path(self.path, resume)
        self.created = not self.path.exists()
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UserInputError(
                f"--out {self.path}: cannot create it ({exc.strerror or exc}); choose another --out"
            ) from None
        # Locked before anything is read or written: two runs never share a directory.
        self._lock = RunLock.acquire(self.path, warn=warn)
        try:
            # Checked again under the lock: another run may have filled it meanwhile.
            check_run_dir_path(self.path, resume)
            refuse_non_regular(self.path / METRICS_NAME)
            self.resuming = resume and self.last.exists()
            self.metrics = MetricsCSV(self.path / METRICS_NAME)
            if not self.resuming:
                # --resume without a checkpoint starts over: rows of the lost attempt would mislead.
                self.metrics.path.unlink(missing_ok=True)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Release the run directory's lock (also done at exit and when garbage-collected)."""
        lock, self._lock = getattr(self, "_lock", None), None
        if lock is not None:
            lock.release()

    def __enter__(self) -> RunDir:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()

    def discard_if_unstarted(self) -> bool:
        """Remove the directory if this RunDir created it and no checkpoint was saved yet.

        Call on a failed start so that failures leave no empty run directories behind.
        """
        if not getattr(self, "created", False) or self.last.exists() or not self.path.is_dir():
            return False
        import shutil

        self.close()  # the lock lives inside the directory
        shutil.rmtree(self.path, ignore_errors=True)
        return True

    @property
    def last(self) -> Path:
        return self.path / LAST_NAME

    @property
    def best(self) -> Path:
        return self.path / BEST_NAME

    @property
    def config_path(self) -> Path:
        return self.path / CONFIG_NAME

    def checkpoint_to_resume(self) -> Path | None:
        """``last.safetensors`` when resuming, else None."""
        return self.last if self.resuming else None

    def write_config(self, config: Any, *, device: Any = None, **extra: Any) -> Path:
        """``config.json``: the full resolved config, software versions, how and where the run
        started (:func:`run_record`, with the resolved ``device``), and ``extra``."""
        return self.write_json(
            CONFIG_NAME,
            {"config": config, "versions": software_versions(), "run": run_record(device), **extra},
        )

    def read_config(self) -> dict[str, Any] | None:
        if not self.config_path.exists():
            return None
        try:
            return json.loads(self.config_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise UserInputError(f"{self.config_path}: unreadable ({exc})") from None

    def write_json(self, name: str, obj: Any) -> Path:
        """Atomically write ``obj`` as JSON to ``<run>/<name>``."""
        return atomic_write_json(self.path / name, obj)

    def append_metrics(self, row: Mapping[str, Any]) -> None:
        self.metrics.append(row)

    def resumed_at(self, epoch: int) -> None:
        """Call after loading the checkpoint: drops metrics rows beyond ``epoch`` (no duplicates)."""
        self.metrics.truncate_after(epoch)


# --------------------------------------------------------------------------- reading a run's files

# A run's own files are small (metrics.csv: one row per epoch); these bound what a copied or
# tampered run directory can make a reader (`bats report`) hold.
MAX_RUN_FILE_BYTES = 64 * 1024 * 1024
MAX_METRICS_ROWS = 1_000_000
MAX_ALPHA_FILES = 100_000


@dataclass
class RunFiles:
    """What ``config.json``, ``metrics.csv``, ``result.json`` and ``alphas/*.json`` hold, checked:
    ``rows`` hold finite numbers (or None, or short text), ``alphas`` one snapshot per file."""

    record: dict[str, Any]
    rows: list[dict[str, Any]]
    result: dict[str, Any] | None
    alphas: list[dict[str, Any]]


def _number(text: str | None) -> Any:
    """A metrics.csv cell: an int or a finite float, None when empty or not finite, else the text."""
    if text in (None, ""):
        return None
    try:
        value = float(text)
    except ValueError:
        return text[:200]
    if not math.isfinite(value):
        return None
    return int(value) if value.is_integer() and abs(value) < 2**63 and text.strip().lstrip("-").isdigit() else value


def read_json_file(file: Path, *, what: str) -> Any:
    """A run file's JSON: a regular file read bounded (64 MB), UTF-8, size and depth limits."""
    from bats_cli.core.fileio import read_bounded
    from bats_cli.storage.metadata import load_json

    raw = read_bounded(file, MAX_RUN_FILE_BYTES, what=what)
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise UserInputError(f"{file}: not a UTF-8 text file; expected {what}") from None
    return load_json(text, where=str(file), max_bytes=MAX_RUN_FILE_BYTES)


def _alpha_snapshot(doc: Any, file: Path) -> dict[str, Any]:
    """``alphas/stageK_epochNN.json``: stage, epoch, and per cell a list of edges
    ``{"node": int, "input": int, "weights": {op: finite number}}``."""
    bad = UserInputError(f"{file}: not an α snapshot of bats search (stage, epoch, normal, reduce edges)")
    if not isinstance(doc, dict) or not all(type(doc.get(k)) is int for k in ("stage", "epoch")):
        raise bad
    for cell in ("normal", "reduce"):
        edges = doc.get(cell)
        if not isinstance(edges, list) or not edges or len(edges) > 10_000:
            raise bad
        for edge in edges:
            if not (isinstance(edge, dict) and type(edge.get("node")) is int and type(edge.get("input")) is int
                    and abs(edge["node"]) < 10**6 and abs(edge["input"]) < 10**6
                    and isinstance(edge.get("weights"), dict) and edge["weights"]
                    and all(isinstance(k, str) and type(v) in (int, float) and math.isfinite(v)
                            for k, v in edge["weights"].items())):
                raise bad
    return doc


def read_run_files(path: str | os.PathLike[str]) -> RunFiles:
    """The files of a run directory, each bounded in size and checked in shape; every problem is
    one UserInputError naming the file. The directory must hold ``config.json`` and ``metrics.csv``."""
    path = Path(path)
    config_path, metrics_path = path / CONFIG_NAME, path / METRICS_NAME
    record = read_json_file(config_path, what="a run's config.json")
    if not isinstance(record, dict):
        raise UserInputError(f"{config_path}: expected a JSON object (a run's config.json)")
    network = record.get("network")
    if network is not None:
        from bats_cli.storage.metadata import NetworkRecord, validate

        validate(NetworkRecord, network, where=f"{config_path}: network")
    from bats_cli.core.fileio import read_bounded

    raw = read_bounded(metrics_path, MAX_RUN_FILE_BYTES, what="a run's metrics.csv")
    try:
        text = raw.decode("utf-8-sig")
        reader = csv.DictReader(io.StringIO(text, newline=""))
        rows = []
        for row in reader:
            if len(rows) >= MAX_METRICS_ROWS:
                raise UserInputError(f"{metrics_path}: more than {MAX_METRICS_ROWS:,} rows")
            rows.append({str(k)[:200]: _number(v if isinstance(v, str) else None)
                         for k, v in row.items() if k is not None})
    except UnicodeDecodeError:
        raise UserInputError(f"{metrics_path}: not a UTF-8 text file; expected a run's metrics.csv") from None
    except csv.Error as exc:
        raise UserInputError(f"{metrics_path}: unreadable CSV ({str(exc)[:100]})") from None
    result = None
    if (path / "result.json").is_file():
        result = read_json_file(path / "result.json", what="a run's result.json")
        if not isinstance(result, dict):
            raise UserInputError(f"{path / 'result.json'}: expected a JSON object")
    alphas = []
    files = sorted((path / "alphas").glob("stage*_epoch*.json"))[:MAX_ALPHA_FILES + 1]
    if len(files) > MAX_ALPHA_FILES:
        raise UserInputError(f"{path / 'alphas'}: more than {MAX_ALPHA_FILES:,} snapshots")
    for file in files:
        alphas.append(_alpha_snapshot(read_json_file(file, what="an α snapshot"), file))
    if alphas:
        shape = [len(alphas[0][c]) for c in ("normal", "reduce")]
        if any([len(d[c]) for c in ("normal", "reduce")] != shape for d in alphas):
            raise UserInputError(f"{path / 'alphas'}: the snapshots disagree on the cells' edges")
    return RunFiles(record=record, rows=rows, result=result, alphas=alphas)
