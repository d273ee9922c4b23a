"""Run infrastructure shared by the long commands (`search`, `train`, `binarize`, `eval`).

Atomic file writes, seeding and RNG-state capture, device / precision selection, SIGINT/SIGTERM
handling, run directories with ``config.json`` and ``metrics.csv``, and a progress reporter that
writes only to stderr (so ``--json`` output on stdout stays clean).
"""

from __future__ import annotations

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

from bats_cli.errors import Interrupted, UserInputError

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
    """
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

    Ctrl-C and SLURM's SIGTERM reach every process of the job; a worker that dies at once makes
    the main process fail with "DataLoader worker exited unexpectedly" instead of saving.
    Workers ignore SIGINT and exit cleanly ``WORKER_SIGTERM_GRACE_S`` after a SIGTERM.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _exit_soon)


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


class RunDir:
    """The ``--out`` directory of a long run: ``config.json``, ``metrics.csv``, checkpoints.

    Without ``resume`` an existing non-empty run directory is refused. With ``resume`` a
    directory holding ``last.safetensors`` is continued; one without any (or a missing one)
    starts fresh, so the same command line works for the first run and every requeue.

    Per epoch, append the metrics row *before* saving ``last.safetensors``: a crash in between
    then repeats the epoch and :meth:`resumed_at` drops its stale row (the other order would
    lose the row for good).
    """

    def __init__(self, path: str | os.PathLike[str], *, resume: bool) -> None:
        self.path = Path(path)
        if self.path.exists() and not self.path.is_dir():
            raise UserInputError(f"--out {self.path} is a file, not a directory")
        existing = self.path.is_dir() and any(
            not p.name.startswith(".") for p in self.path.iterdir()
        )
        if existing and not resume:
            raise UserInputError(
                f"{self.path} already holds a run; use --resume to continue it "
                "or choose another --out"
            )
        self.path.mkdir(parents=True, exist_ok=True)
        self.resuming = resume and self.last.exists()
        self.metrics = MetricsCSV(self.path / METRICS_NAME)
        if not self.resuming:
            # --resume without a checkpoint starts over: rows of the lost attempt would mislead.
            self.metrics.path.unlink(missing_ok=True)

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

    def write_config(self, config: Any, **extra: Any) -> Path:
        """``config.json``: the full resolved config plus software versions (and ``extra``)."""
        return self.write_json(
            CONFIG_NAME, {"config": config, "versions": software_versions(), **extra}
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
        self.set(**metrics)
        if self._progress is not None:
            self._progress.update(self._task, advance=n, metrics=format_metrics(self.metrics))

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

    Each ``epoch`` context prints exactly one line when it ends (on a TTY the transient bar is
    replaced by it), so logs look the same under CI, nohup and SLURM. ``quiet`` prints nothing.
    """

    def __init__(
        self, *, quiet: bool = False, stream: TextIO | None = None, tty: bool | None = None
    ) -> None:
        self.quiet = quiet
        self.stream = stream if stream is not None else sys.stderr
        if tty is None:
            tty = bool(getattr(self.stream, "isatty", lambda: False)())
            tty = tty and os.environ.get("TERM") != "dumb"
        self.tty = tty
        self._console: Any = None

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
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            TextColumn("{task.fields[metrics]}"),
            console=self._rich_console(),
            transient=True,
        )
        bar._progress = progress
        bar._task = progress.add_task(desc, total=total_steps, metrics="")
        ok = False
        try:
            with progress:
                yield bar
            ok = True
        finally:
            self.line(bar.summary_line(interrupted=not ok))

    def line(self, text: str) -> None:
        """One plain line on stderr (nothing when quiet)."""
        if self.quiet:
            return
        print(text, file=self.stream, flush=True)

    def warn(self, text: str) -> None:
        self.line(f"warning: {text}")

    def epoch_summary(self, metrics: Mapping[str, Any], *, desc: str | None = None) -> None:
        """One line of metrics computed outside an ``epoch`` context (e.g. a final test pass)."""
        text = format_metrics(metrics)
        self.line(f"{desc}  {text}" if desc else text)
