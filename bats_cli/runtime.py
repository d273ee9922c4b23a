"""Run infrastructure shared by the long commands (`search`, `train`, `binarize`, `eval`).

Atomic file writes, seeding and RNG-state capture, device / precision selection, SIGINT/SIGTERM
handling, run directories with ``config.json`` and ``metrics.csv``, and a progress reporter that
writes only to stderr (so ``--json`` output on stdout stays clean).
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import csv
import io
import json
import os
import platform
import random
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import torch

from bats_cli.errors import Interrupted, RunFailure, UserInputError

PRECISIONS = ("fp32", "bf16", "fp16")
DEVICES = ("auto", "cpu", "cuda")
CONFIG_NAME = "config.json"
METRICS_NAME = "metrics.csv"
LAST_NAME = "last.safetensors"
BEST_NAME = "best.safetensors"

# --------------------------------------------------------------------------- atomic writes

# Read once at import: os.umask can only be read by setting it, which races with threads later.
_UMASK = os.umask(0o022)
os.umask(_UMASK)


def _fsync_dir(directory: Path) -> None:
    # Makes the rename itself durable; some file systems refuse O_RDONLY dir fsync, which is fine.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_target(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temp path next to ``path``; on success fsync it and ``os.replace`` it over ``path``.

    On any exception the temp file is removed and ``path`` keeps its previous content.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Same directory so os.replace is a rename, never a cross-device copy; *.tmp is git-ignored.
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        # mkstemp creates 0600; result files should get the usual umask-derived mode.
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    _fsync_dir(path.parent)




def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (temp file + fsync + ``os.replace``)."""
    with atomic_target(path) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
    return Path(path)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write UTF-8 ``text`` to ``path`` atomically."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> Path:
    """Write ``obj`` as indented JSON (strict: NaN/inf become null) atomically."""
    return atomic_write_text(path, json.dumps(to_jsonable(obj), indent=2, allow_nan=False) + "\n")


def to_jsonable(obj: Any) -> Any:
    """Convert paths, tensors, numpy scalars, tuples and non-finite floats into strict JSON values."""
    if isinstance(obj, float):
        return obj if np.isfinite(obj) else None
    if obj is None or isinstance(obj, (str, bool, int)):
        return obj
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if isinstance(obj, torch.Tensor):
        return to_jsonable(obj.detach().cpu().tolist())
    if isinstance(obj, np.generic):
        return to_jsonable(obj.item())
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if hasattr(obj, "model_dump"):
        return to_jsonable(obj.model_dump(mode="json"))
    return str(obj)


def software_versions() -> dict[str, str]:
    """Versions recorded in every checkpoint and ``config.json``."""
    return dict(_collect_versions())


@functools.lru_cache(maxsize=1)
def _collect_versions() -> dict[str, str]:
    import bats_cli

    return {
        "bats": bats_cli.__version__,
        "torch": torch.__version__,
        "torchvision": _dist_version("torchvision"),
        "python": platform.python_version(),
    }


def _dist_version(name: str) -> str:
    # Package metadata, not an import: importing torchvision takes seconds (bad right after Ctrl-C).
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return "absent"


def run_record(device: Any = None) -> dict[str, Any]:
    """What ``config.json`` records about the start of a run: the command line as typed, start
    time, host, package version, git commit of the source (when it is a checkout) and device."""
    import shlex
    import socket

    import bats_cli

    return {
        "command_line": shlex.join([_program_name(), *sys.argv[1:]]),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "host": socket.gethostname(),
        "bats_version": bats_cli.__version__,
        "git_commit": git_commit(),
        "device": None if device is None else str(device),
    }


def _program_name() -> str:
    name = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "bats"
    # `python -m bats_cli` shows as __main__.py; the command a user retypes is `bats`.
    return "bats" if name in ("__main__.py", "-c", "") else name


@functools.lru_cache(maxsize=1)
def git_commit() -> str | None:
    """The commit of the checkout this package runs from, or None (installed copy, no git)."""
    import subprocess

    source = Path(__file__).resolve().parent.parent
    if not (source / ".git").exists():
        return None
    try:
        proc = subprocess.run(["git", "-C", str(source), "rev-parse", "HEAD"], capture_output=True,
                              text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    commit = proc.stdout.strip()
    return commit if proc.returncode == 0 and commit else None


# --------------------------------------------------------------------------- seeding / RNG state


def seed_everything(seed: int) -> None:
    """Seed python ``random``, numpy's global RNG and torch (CPU and every CUDA device)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state_tensors() -> dict[str, torch.Tensor]:
    """Capture every global RNG as tensors (no pickle), keys prefixed ``rng.``."""
    version, mt, gauss = random.getstate()
    _, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state(legacy=True)
    out = {
        "rng.torch_cpu": torch.get_rng_state(),
        "rng.python_mt": torch.tensor([version, *mt], dtype=torch.int64),
        "rng.python_gauss": torch.tensor(
            [0.0 if gauss is None else 1.0, 0.0 if gauss is None else gauss], dtype=torch.float64
        ),
        "rng.numpy_keys": torch.from_numpy(np_keys.astype(np.int64)),
        "rng.numpy_pos": torch.tensor([np_pos, np_has_gauss], dtype=torch.int64),
        "rng.numpy_gauss": torch.tensor([np_gauss], dtype=torch.float64),
    }
    # Only touch CUDA when it is already initialised: querying it otherwise costs seconds.
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            out[f"rng.torch_cuda.{i}"] = state
    return out


def restore_rng_state(tensors: Mapping[str, torch.Tensor]) -> None:
    """Restore what :func:`rng_state_tensors` captured; other keys in ``tensors`` are ignored.

    CUDA states are restored for the devices present now (a CPU-only resume skips them).
    A malformed state (a tampered or truncated checkpoint) is one UserInputError.
    """
    try:
        _restore_rng_state(tensors)
    except (ValueError, TypeError, RuntimeError, IndexError, OverflowError, KeyError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserInputError(f"cannot resume: the checkpoint's random-number state is corrupt ({reason})") from None


def _restore_rng_state(tensors: Mapping[str, torch.Tensor]) -> None:
    if "rng.torch_cpu" in tensors:
        torch.set_rng_state(tensors["rng.torch_cpu"].cpu().to(torch.uint8))
    if "rng.python_mt" in tensors:
        mt = [int(v) for v in tensors["rng.python_mt"].tolist()]
        has_gauss, gauss = tensors["rng.python_gauss"].tolist()
        random.setstate((mt[0], tuple(mt[1:]), gauss if has_gauss else None))
    if "rng.numpy_keys" in tensors:
        keys = tensors["rng.numpy_keys"].cpu().numpy().astype(np.uint32)
        pos, has_gauss = (int(v) for v in tensors["rng.numpy_pos"].tolist())
        np.random.set_state(("MT19937", keys, pos, has_gauss, float(tensors["rng.numpy_gauss"][0])))
    cuda_keys = sorted(k for k in tensors if k.startswith("rng.torch_cuda."))
    if cuda_keys and torch.cuda.is_available():
        for key in cuda_keys:
            index = int(key.rsplit(".", 1)[1])
            if index < torch.cuda.device_count():
                torch.cuda.set_rng_state(tensors[key].cpu().to(torch.uint8), index)


# --------------------------------------------------------------------------- device / precision


def select_device(name: str = "auto") -> torch.device:
    """``auto`` picks CUDA when present, else CPU; ``cuda`` / ``cuda:N`` must exist."""
    name = (name or "auto").strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise UserInputError(
                f"--device {name}: CUDA is not available (torch {torch.__version__}); "
                "use --device cpu or --device auto"
            )
        device = torch.device(name)
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserInputError(
                f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) present"
            )
        return device
    raise UserInputError(f"--device {name}: choose auto, cpu, cuda or cuda:N")


def check_precision(device: torch.device, precision: str) -> None:
    """Refuse precision/device pairs that do not work; call it before a run starts.

    bf16 on CPU is allowed (CPU autocast runs conv/linear in bf16, verified with the binary ops
    and backward); fp16 on CPU is refused: slow kernels and no loss scaling there.
    """
    if precision not in PRECISIONS:
        raise UserInputError(f"--precision {precision}: choose one of {', '.join(PRECISIONS)}")
    if device.type == "cpu" and precision == "fp16":
        raise UserInputError("--precision fp16 needs CUDA; use --precision fp32 (or bf16) on CPU")
    if device.type == "cuda" and precision == "bf16" and not torch.cuda.is_bf16_supported():
        raise UserInputError(
            "--precision bf16: this GPU does not support bfloat16; use --precision fp16 or fp32"
        )


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager[Any]:
    """Mixed-precision context for the forward pass (a no-op for fp32)."""
    check_precision(device, precision)
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def make_grad_scaler(device: torch.device, precision: str) -> torch.amp.GradScaler:
    """A GradScaler that is enabled only for fp16 on CUDA; disabled ones pass through unchanged.

    So the loop is always ``scaler.scale(loss).backward(); scaler.step(opt); scaler.update()``.
    """
    check_precision(device, precision)
    enabled = precision == "fp16" and device.type == "cuda"
    return torch.amp.GradScaler(device.type, enabled=enabled)


def memory_format(
    device: torch.device, model_kind: str | torch.nn.Module = "grouped", *, precision: str = "fp32"
) -> torch.memory_format:
    """Memory format to move model and inputs to.

    ``model_kind`` is ``"grouped"`` (networks with grouped/depthwise convs: every BATS cell),
    ``"dense"``, or a module (inspected for grouped convs). channels_last is ~2x faster for
    grouped convs on CPU; on CUDA it pays off with tensor cores (bf16/fp16).
    """
    if isinstance(model_kind, torch.nn.Module):
        # ``grouped_conv``: modules that stand in for grouped convs (the bitwise engine's).
        grouped = any(
            (isinstance(m, torch.nn.Conv2d) and m.groups > 1) or getattr(m, "grouped_conv", False)
            for m in model_kind.modules()
        )
    elif model_kind in ("grouped", "dense"):
        grouped = model_kind == "grouped"
    else:
        raise ValueError(f"model_kind must be 'grouped', 'dense' or a module, not {model_kind!r}")
    if device.type == "cpu":
        return torch.channels_last if grouped else torch.contiguous_format
    if device.type == "cuda" and precision in ("bf16", "fp16"):
        return torch.channels_last
    return torch.contiguous_format


# --------------------------------------------------------------------------- signals


class GracefulInterrupt:
    """Turn SIGINT/SIGTERM into a flag the training loop polls after each step.

    A second signal raises ``KeyboardInterrupt`` at once (exit 130 without saving). Previous
    handlers are restored on exit. Outside the main thread it installs nothing (``requested``
    stays False), because Python only allows signal handlers there.

    >>> with GracefulInterrupt() as stop:
    ...     for step in steps:
    ...         train_step()
    ...         stop.raise_if_requested(save_fn=lambda: save(...))
    """

    def __init__(self, signals: tuple[int, ...] = (signal.SIGINT, signal.SIGTERM)) -> None:
        self.signals = signals
        self.requested = False
        self.signal_name: str | None = None
        self._previous: dict[int, Any] = {}
        self._pid = os.getpid()

    def __enter__(self) -> GracefulInterrupt:
        self._pid = os.getpid()
        if threading.current_thread() is not threading.main_thread():
            return self
        for sig in self.signals:
            self._previous[sig] = signal.getsignal(sig)
            signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            # None means the handler was installed outside Python; default is the safe fallback.
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        self._previous.clear()

    def _handle(self, signum: int, frame: object) -> None:
        if os.getpid() != self._pid:
            # A forked DataLoader worker inherited this handler: the parent decides what to do.
            if signum == signal.SIGTERM:
                _exit_soon(signum, frame)
            return
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        self.signal_name = signal.Signals(signum).name
        # os.write is safe inside a signal handler, unlike print (rich may hold the stream).
        msg = (
            f"\n{self.signal_name} received: stopping after this step and saving a checkpoint "
            "(send again to quit without saving)\n"
        )
        with contextlib.suppress(OSError):
            os.write(2, msg.encode())

    def raise_if_requested(self, save_fn: Callable[[], Any] | None = None) -> None:
        """If a signal arrived: call ``save_fn`` (may return the checkpoint path), raise Interrupted."""
        if not self.requested:
            return
        saved = save_fn() if save_fn is not None else None
        where = f"; checkpoint saved to {saved}; continue with --resume" if saved else ""
        raise Interrupted(f"interrupted by {self.signal_name}{where}")


# Seconds a DataLoader worker keeps serving after SIGTERM: long enough for the main process to
# receive the batch in flight (its tensors are shared through the worker), short enough not to
# stall shutdown, which also terminates workers with SIGTERM.
WORKER_SIGTERM_GRACE_S = 10.0


def shield_worker_from_signals(worker_id: int = 0) -> None:
    """``DataLoader(worker_init_fn=...)``: keep workers alive through Ctrl-C / SIGTERM to the group.

    Ctrl-C, SLURM, systemd and ``kill -- -PGID`` signal every process of the job; a worker that
    dies at once makes the main process fail with "DataLoader worker exited unexpectedly"
    instead of saving. So the main process owns shutdown: workers ignore SIGINT, and a thread
    takes SIGTERM synchronously (``sigtimedwait``) and exits only when it comes from the parent
    (the DataLoader terminating a stuck worker) or when the parent is gone. torch's own worker
    handler is replaced; it kills the worker on any SIGTERM not sent by the parent.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if not (hasattr(signal, "pthread_sigmask") and hasattr(signal, "sigtimedwait")):
        signal.signal(signal.SIGTERM, _exit_soon)  # pragma: no cover - not POSIX
        return
    # Blocked in this (the worker's only) thread, so in every thread started later too.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    threading.Thread(
        target=_watch_worker_signals, args=(_loader_pid(), os.getppid()), daemon=True,
        name="bats-worker-signals",
    ).start()


def _loader_pid() -> int:
    # The process that started this worker; with forkserver/spawn that is not os.getppid().
    import multiprocessing

    parent = multiprocessing.parent_process()
    return parent.pid if parent is not None and parent.pid else os.getppid()


def _watch_worker_signals(owner: int, parent: int) -> None:
    while True:
        info = signal.sigtimedwait({signal.SIGTERM}, 1.0)
        if info is not None and info.si_pid == owner:
            os._exit(0)  # the DataLoader shuts this worker down (it was stuck, e.g. on a FIFO)
        # The main process is gone (even kill -9; a zombie still answers kill 0, hence ppid too).
        if os.getppid() != parent or not _pid_alive(owner):
            os._exit(0)


@contextlib.contextmanager
def signals_blocked(signals: tuple[int, ...] = (signal.SIGINT, signal.SIGTERM)) -> Iterator[None]:
    """Hold ``signals`` back in this thread (delivered on exit); children forked inside start
    with them blocked, so a signal cannot reach a DataLoader worker before it is shielded."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(
        signal, "pthread_sigmask"
    ):
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, set(signals))
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


_exit_timer: threading.Timer | None = None


def _exit_soon(signum: int, frame: object) -> None:
    global _exit_timer
    if _exit_timer is None:
        # Exit status 0 is not reported as a worker failure by DataLoader's SIGCHLD check.
        _exit_timer = threading.Timer(WORKER_SIGTERM_GRACE_S, os._exit, args=(0,))
        _exit_timer.daemon = True
        _exit_timer.start()


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


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    except OSError:
        return False
    return True


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
                if pid is None or host != _host() or _pid_alive(pid):
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


def check_run_dir_path(path: str | os.PathLike[str], resume: bool) -> None:
    """Refuse an ``--out`` that is a file, holds a run (without ``--resume``), holds files that
    are not a bats run (with ``--resume``: nothing there may be overwritten), or is locked."""
    from bats_cli.outputs import check_writable_dir

    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserInputError(f"--out {path} is a file, not a directory")
    # Checked before the work starts, not when the first checkpoint is due.
    check_writable_dir(path, flag=f"--out {path}")
    if not path.is_dir():
        return
    try:
        entries = [p.name for p in path.iterdir() if not p.name.startswith(".")]
    except OSError as exc:
        raise UserInputError(f"--out {path}: cannot read it ({exc.strerror or exc})") from None
    if entries and not resume:
        raise UserInputError(
            f"{path} already holds a run; use --resume to continue it or choose another --out"
        )
    markers = (CONFIG_NAME, LAST_NAME, METRICS_NAME)
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


# --------------------------------------------------------------------------- progress reporting


def _fmt_value(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        value = value.item()
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def format_metrics(metrics: Mapping[str, Any]) -> str:
    """``loss=0.1234 acc=0.9`` style text."""
    return " ".join(f"{k}={_fmt_value(v)}" for k, v in metrics.items())


def _fmt_seconds(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def _clip(text: str, width: int) -> str:
    if width <= 0:
        return ""
    return text if len(text) <= width else text[: width - 1] + "…"


def _line_column(console: Any) -> Any:
    """The live progress line: ``desc  7/50 0:03 eta 0:21  run ...  metrics``.

    One column laid out by hand so that the step count and clocks are never cut: the description,
    run summary and metrics give way (ellipsis) when the terminal is narrow.
    """
    from rich.progress import ProgressColumn
    from rich.text import Text

    class LineColumn(ProgressColumn):
        def render(self, task: Any) -> Text:
            total = int(task.total) if task.total is not None else None
            done = int(task.completed)
            remaining = task.time_remaining
            eta = _fmt_seconds(remaining) if remaining is not None and done else "-"
            steps = f"{done}/{total}" if total else f"{done}"
            clock = f"  {steps}  {_fmt_seconds(task.elapsed or 0.0)}  eta {eta}"
            width = max(console.width - 1, len(clock))
            desc = _clip(task.description, width - len(clock))
            room = width - len(desc) - len(clock)
            extra = "".join(f"  {part}" for part in (task.fields.get("run", ""),
                                                      task.fields.get("metrics", "")) if part)
            return Text(desc + clock + _clip(extra, room))

    return LineColumn()


class EpochBar:
    """Handle yielded by :meth:`Reporter.epoch`."""

    def __init__(self, reporter: Reporter, desc: str, total: int | None) -> None:
        self.reporter = reporter
        self.desc = desc
        self.total = total
        self.done = 0
        self.metrics: dict[str, Any] = {}
        self.start = time.perf_counter()
        self._progress: Any = None
        self._task: Any = None

    def update(self, n: int = 1, **metrics: Any) -> None:
        """Advance ``n`` steps and set the live metrics shown next to the bar."""
        self.done += n
        self.metrics.update(metrics)
        self.reporter._advance(self, n)
        if self._progress is not None:
            self._progress.update(self._task, advance=n, metrics=format_metrics(self.metrics),
                                  run=self.reporter.run_text())

    def set(self, **metrics: Any) -> None:
        """Set metrics without advancing (e.g. validation results for the epoch's line)."""
        self.metrics.update(metrics)
        if self._progress is not None and metrics:
            self._progress.update(self._task, metrics=format_metrics(self.metrics))

    def summary_line(self, interrupted: bool = False) -> str:
        elapsed = time.perf_counter() - self.start
        steps = f"{self.done}/{self.total}" if self.total else f"{self.done}"
        parts = [self.desc, f"{steps} steps", _fmt_seconds(elapsed)]
        if self.metrics:
            parts.append(format_metrics(self.metrics))
        if interrupted:
            parts.append("(stopped)")
        return "  ".join(parts)


class Reporter:
    """Progress on stderr: a live rich bar per epoch on a TTY, plain lines otherwise.

    Each ``epoch`` context prints one line when it ends (on a TTY the transient bar is replaced
    by it), so logs look the same under CI, nohup and SLURM. Without a TTY a plain progress
    line also comes every ``every_steps`` steps or ``every_seconds`` seconds, whichever is first.
    After :meth:`start_run` the lines and the bar carry the whole run's step count, images/s,
    elapsed time and ETA, and one line reports the measured speed after the first steps.
    ``quiet`` prints nothing.
    """

    def __init__(
        self, *, quiet: bool = False, stream: TextIO | None = None, tty: bool | None = None,
        every_steps: int = 100, every_seconds: float = 60.0,
    ) -> None:
        self.quiet = quiet
        self.stream = stream if stream is not None else sys.stderr
        if tty is None:
            tty = bool(getattr(self.stream, "isatty", lambda: False)())
            tty = tty and os.environ.get("TERM") != "dumb"
        self.tty = tty
        self.every_steps = max(1, every_steps)
        self.every_seconds = every_seconds
        self._console: Any = None
        self._live: Any = None
        # run-level progress (start_run)
        self.run_total: int | None = None
        self.run_done = 0
        self.images_per_step: int | None = None
        self.started = time.perf_counter()
        self._rate_t0: float | None = None
        self._rate_base = 0
        self._last_line_t = time.perf_counter()
        self._last_line_step = 0
        self._speed_reported = False
        self.seconds_per_step: float | None = None

    # -- run-level progress ---------------------------------------------------------------
    def start_run(self, total_steps: int, *, done: int = 0, images_per_step: int | None = None,
                  started: float | None = None) -> None:
        """Declare the whole run: ``total_steps`` optimizer steps, ``done`` already taken.

        ``started`` (a ``time.perf_counter()`` value) is when the command started, so elapsed
        time includes start-up; default: when this Reporter was made.
        """
        self.run_total = int(total_steps)
        self.run_done = int(done)
        self.images_per_step = images_per_step
        if started is not None:
            self.started = started
        self._rate_t0 = None
        self._last_line_step = self.run_done

    def _advance(self, bar: EpochBar, n: int) -> None:
        if self.run_total is None:
            return
        self.run_done += n
        now = time.perf_counter()
        if self._rate_t0 is None or n != 1:
            # The speed is timed from the first real step on: the first call may be a resumed
            # epoch's skip, and the first step pays one-off costs.
            self._rate_t0, self._rate_base = now, self.run_done
            return
        steps = self.run_done - self._rate_base
        if steps > 0:
            self.seconds_per_step = (now - self._rate_t0) / steps
        if not self._speed_reported and steps >= 5 and (steps >= 20 or now - self._rate_t0 >= 5):
            self._speed_reported = True
            self._emit(self.speed_line(bar.total))
        if not self.tty and (now - self._last_line_t >= self.every_seconds
                             or self.run_done - self._last_line_step >= self.every_steps):
            self._last_line_t, self._last_line_step = now, self.run_done
            line = self.step_line(bar)
            if line:
                self._emit(line)

    def eta_seconds(self) -> float | None:
        if self.run_total is None or self.seconds_per_step is None:
            return None
        return max(0, self.run_total - self.run_done) * self.seconds_per_step

    def images_per_second(self) -> float | None:
        if not self.images_per_step or not self.seconds_per_step:
            return None
        return self.images_per_step / self.seconds_per_step

    def run_text(self) -> str:
        """``run 120/9000  512 img/s  eta 1:23:00`` (empty before start_run)."""
        if self.run_total is None:
            return ""
        parts = [f"run {self.run_done}/{self.run_total}"]
        ips = self.images_per_second()
        if ips is not None:
            parts.append(f"{ips:.0f} img/s")
        eta = self.eta_seconds()
        parts.append(f"eta {_fmt_seconds(eta)}" if eta is not None else "eta -")
        return "  ".join(parts)

    def step_line(self, bar: EpochBar) -> str:
        """The periodic plain line: step/total, metrics, images/s, elapsed and ETA of the run."""
        if self.run_total is None:
            return ""
        parts = [f"step {self.run_done}/{self.run_total}", f"({bar.desc} {bar.done}/{bar.total})"]
        if bar.metrics:
            parts.append(format_metrics(bar.metrics))
        ips = self.images_per_second()
        if ips is not None:
            parts.append(f"{ips:.0f} img/s")
        parts.append(f"elapsed {_fmt_seconds(time.perf_counter() - self.started)}")
        eta = self.eta_seconds()
        parts.append(f"eta {_fmt_seconds(eta)}" if eta is not None else "eta -")
        return "  ".join(parts)

    def speed_line(self, steps_per_epoch: int | None = None) -> str:
        sps = self.seconds_per_step or 0.0
        eta = self.eta_seconds() or 0.0
        ips = self.images_per_second()
        speed = f"{sps:.3g} s/step" + (f" ({ips:.0f} images/s)" if ips is not None else "")
        if steps_per_epoch:
            speed += f", {_fmt_seconds(sps * steps_per_epoch)} per epoch"
        finish = time.strftime("%Y-%m-%d %H:%M", time.localtime(time.time() + eta))
        return f"measured: {speed}; ETA of the run {_fmt_seconds(eta)} (about {finish})"

    def _emit(self, text: str) -> None:
        if self.quiet:
            return
        if self._live is not None:
            self._live.console.print(text, markup=False, highlight=False)
        else:
            print(text, file=self.stream, flush=True)

    def _rich_console(self) -> Any:
        if self._console is None:
            from rich.console import Console

            self._console = Console(file=self.stream, force_terminal=self.tty, highlight=False)
        return self._console

    @contextlib.contextmanager
    def epoch(self, desc: str, total_steps: int | None) -> Iterator[EpochBar]:
        bar = EpochBar(self, desc, total_steps)
        if self.quiet:
            yield bar
            return
        if not self.tty:
            ok = False
            try:
                yield bar
                ok = True
            finally:
                self.line(bar.summary_line(interrupted=not ok))
            return
        from rich.progress import Progress

        progress = Progress(
            _line_column(self._rich_console()),
            console=self._rich_console(),
            transient=True,
        )
        bar._progress = progress
        bar._task = progress.add_task(desc, total=total_steps, metrics="", run=self.run_text())
        ok = False
        try:
            with progress:
                self._live = progress
                try:
                    yield bar
                finally:
                    self._live = None
            ok = True
        finally:
            self.line(bar.summary_line(interrupted=not ok))

    def line(self, text: str) -> None:
        """One plain line on stderr (nothing when quiet)."""
        if self.quiet:
            return
        from bats_cli.names import safe_text

        # Lines carry names read from files: no escape sequence reaches the terminal.
        print(safe_text(text), file=self.stream, flush=True)

    def warn(self, text: str) -> None:
        self.line(f"warning: {text}")

    def epoch_summary(self, metrics: Mapping[str, Any], *, desc: str | None = None) -> None:
        """One line of metrics computed outside an ``epoch`` context (e.g. a final test pass)."""
        text = format_metrics(metrics)
        self.line(f"{desc}  {text}" if desc else text)
