"""The run directory of a long command: ``config.json``, ``metrics.csv``, checkpoints, and the lock
that keeps a second run out of it."""

from __future__ import annotations

import atexit
import contextlib
import csv
import io
import json
import math
import os
import platform
import sys
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bats_cli.errors import RunFailure, UserInputError
from bats_cli.fileio import atomic_write_json, atomic_write_text
from bats_cli.provenance import run_record, software_versions
from bats_cli.signals import pid_alive

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
    if isinstance(value, torch.Tensor):
        return value.item()
    if isinstance(value, np.generic):
        return value.item()
    return value


def _as_number(text: str | None) -> float | None:
    try:
        return float(text) if text not in (None, "") else None
    except ValueError:
        return None



LOCK_NAME = ".lock"


def _read_lock(path: Path) -> tuple[int | None, str]:
    """(pid, host) recorded in a lock file; (None, "") when unreadable or empty."""
    try:
        with open(path, "rb") as fh:
            text = fh.read(256).decode("utf-8", "replace")
    except OSError:
        return None, ""
    fields = dict(part.split("=", 1) for part in text.split() if "=" in part)
    try:
        pid = int(fields.get("pid", ""))
    except ValueError:
        pid = None
    return pid, fields.get("host", "")


class RunLock:
    """An exclusive lock on a run directory: ``<dir>/.lock`` holding ``pid=N host=H``.

    ``fcntl.flock`` does the locking, so the kernel releases it when the holder dies (kill -9
    included); the pid in the file then names a dead process and is reported as a stale lock
    taken over. A second process is refused with the holder's pid. Within one process the lock
    is re-entrant (a resumed run in the same Python session reuses it). Where the file system
    has no flock, an exclusively created file with a pid liveness check stands in.
    """

    _held: dict[str, tuple["RunLock", int]] = {}
    _guard = threading.Lock()

    def __init__(self, directory: Path, fd: int | None, path: Path) -> None:
        self.directory = directory
        self.path = path
        self._fd = fd

    @classmethod
    def acquire(cls, directory: str | os.PathLike[str], *, warn: Callable[[str], None] | None = None) -> RunLock:
        directory = Path(directory)
        key = os.path.realpath(directory)
        with cls._guard:
            held = cls._held.get(key)
            if held is not None:
                cls._held[key] = (held[0], held[1] + 1)
                return held[0]
            lock = cls._acquire_new(directory, warn or _warn_stderr)
            cls._held[key] = (lock, 1)
            return lock

    @classmethod
    def _acquire_new(cls, directory: Path, warn: Callable[[str], None]) -> RunLock:
        path = directory / LOCK_NAME
        _refuse_symlink(path)
        try:
            # O_NOFOLLOW: a planted .lock -> ~/.bashrc must not be truncated.
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | getattr(os, "O_NOFOLLOW", 0), 0o644)
        except OSError as exc:
            raise UserInputError(
                f"--out {directory} is not writable ({exc.strerror or exc}); choose another --out"
            ) from None
        try:
            import fcntl

            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except ImportError:  # pragma: no cover - not POSIX
            os.close(fd)
            return cls._acquire_exclusive_file(directory, path, warn)
        except BlockingIOError:
            os.close(fd)
            pid, host = _read_lock(path)
            raise UserInputError(_in_use_message(directory, pid, host)) from None
        except OSError as exc:
            os.close(fd)
            import errno

            if exc.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                return cls._acquire_exclusive_file(directory, path, warn)
            raise RunFailure(f"cannot lock {path}: {exc.strerror or exc}") from None
        old_pid, old_host = _read_lock(path)
        if old_pid is not None and old_pid != os.getpid():
            where = f" on {old_host}" if old_host and old_host != _host() else ""
            warn(
                f"{directory}: taking over the stale lock of pid {old_pid}{where} "
                "(that run ended without releasing it, e.g. killed)"
            )
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid={os.getpid()} host={_host()}\n".encode(), 0)
        except OSError as exc:
            os.close(fd)
            raise UserInputError(
                f"--out {directory} is not writable ({exc.strerror or exc}); choose another --out"
            ) from None
        return cls(directory, fd, path)

    @classmethod
    def _acquire_exclusive_file(cls, directory: Path, path: Path, warn: Callable[[str], None]) -> RunLock:
        content = f"pid={os.getpid()} host={_host()}\n".encode()
        for _ in range(2):
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
            except FileExistsError:
                pid, host = _read_lock(path)
                if pid is None or host != _host() or pid_alive(pid):
                    raise UserInputError(_in_use_message(directory, pid, host)) from None
                warn(f"{directory}: taking over the stale lock of pid {pid} (no longer running)")
                with contextlib.suppress(OSError):
                    path.unlink()
                continue
            except OSError as exc:
                raise UserInputError(
                    f"--out {directory} is not writable ({exc.strerror or exc}); choose another --out"
                ) from None
            os.write(fd, content)
            os.close(fd)
            return cls(directory, None, path)
        raise UserInputError(_in_use_message(directory, None, ""))

    def release(self) -> None:
        """Drop one hold; the last one removes the lock file and unlocks."""
        key = os.path.realpath(self.directory)
        with self._guard:
            lock, count = self._held.get(key, (None, 0))
            if lock is not self:
                return
            if count > 1:
                self._held[key] = (lock, count - 1)
                return
            del self._held[key]
        self._release_now()

    def _release_now(self) -> None:
        # Unlink while still holding the lock, so no other run ever sees our pid in a free lock.
        with contextlib.suppress(OSError):
            pid, _ = _read_lock(self.path)
            if pid == os.getpid():
                self.path.unlink()
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None

    @classmethod
    def release_all(cls) -> None:
        """Release every lock this process holds (at exit)."""
        with cls._guard:
            locks = [lock for lock, _ in cls._held.values()]
            cls._held.clear()
        for lock in locks:
            lock._release_now()


def _refuse_symlink(path: Path) -> None:
    # Files a run appends to or locks in place: a link would redirect the write elsewhere, and
    # a FIFO or device is no file to write.
    import stat

    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    except OSError as exc:
        raise UserInputError(f"{path}: cannot inspect it ({exc.strerror or exc})") from None
    if not stat.S_ISREG(mode):
        what = "a symbolic link" if stat.S_ISLNK(mode) else "not a regular file"
        raise UserInputError(
            f"{path} is {what}; a run writes this file in place, so it must be a plain file "
            "(remove it)"
        )


def check_run_dir_free(directory: str | os.PathLike[str]) -> None:
    """UserInputError naming the holder's pid if another process holds ``directory``'s lock.

    A quick early check (before data is loaded); :class:`RunDir` takes the lock for real.
    """
    directory = Path(directory)
    path = directory / LOCK_NAME
    if not path.is_file() or os.path.realpath(directory) in RunLock._held:
        return
    try:
        import fcntl

        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except (ImportError, OSError):
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        pid, host = _read_lock(path)
        raise UserInputError(_in_use_message(directory, pid, host)) from None
    except OSError:
        return
    finally:
        os.close(fd)


def _host() -> str:
    from bats_cli.names import safe_name

    return safe_name(platform.node() or "localhost", default="localhost")


def in_use_message(directory: str | os.PathLike[str]) -> str | None:
    """The refusal :meth:`RunLock.acquire` would give if another live run holds ``directory``, else None
    (asked before anything else, so a busy directory is reported as busy, not as incomplete)."""
    path = Path(directory) / LOCK_NAME
    if not path.is_file() or path.is_symlink():
        return None
    if os.path.realpath(directory) in RunLock._held or _read_lock(path)[0] == os.getpid():
        return None  # this process's own (re-entrant) lock
    try:
        import fcntl

        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except (ImportError, OSError):
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    except BlockingIOError:
        pid, host = _read_lock(path)
        return _in_use_message(Path(directory), pid, host)
    except OSError:
        return None
    finally:
        os.close(fd)


def _in_use_message(directory: Path, pid: int | None, host: str) -> str:
    from bats_cli.names import safe_text

    who = f"pid {pid}" if pid is not None else "another process"
    if host and host != _host():
        who += f" on {safe_text(host, max_chars=64)}"
    return (
        f"{directory} is in use by another bats run ({who}); wait for it to finish, "
        "or choose another --out"
    )


def _warn_stderr(text: str) -> None:
    with contextlib.suppress(OSError, ValueError):
        print(f"warning: {text}", file=sys.stderr, flush=True)


atexit.register(RunLock.release_all)


# Names of files, not of run directories: an --out ending so was meant as -o.
FILE_SUFFIXES = (".safetensors", ".json", ".onnx", ".npy", ".csv", ".png", ".svg", ".html")


def check_run_dir_path(path: str | os.PathLike[str], resume: bool) -> None:
    """Refuse an ``--out`` that is a file, holds a run (without ``--resume``), holds files that
    are not a bats run (with ``--resume``: nothing there may be overwritten), or is locked."""
    from bats_cli.outputs import check_writable_dir

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
            _refuse_symlink(self.path / METRICS_NAME)
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

    @staticmethod
    def check(path: str | os.PathLike[str], *, resume: bool) -> None:
        """Refuse what ``RunDir(path, resume=resume)`` would refuse, without creating anything."""
        check_run_dir_path(path, resume)

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
    from bats_cli.fileio import read_bounded
    from bats_cli.metadata import load_json

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
        from bats_cli.metadata import NetworkRecord, validate

        validate(NetworkRecord, network, where=f"{config_path}: network")
    from bats_cli.fileio import read_bounded

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
