"""The run directory's lock: ``<dir>/.lock`` holding ``pid=N host=H``, taken with ``flock`` (the
kernel drops it when the holder dies), re-entrant within a process; ``in_use_message`` and
``check_run_dir_free`` ask about it without taking it."""

from __future__ import annotations

import atexit
import contextlib
import os
import platform
import sys
import threading
from collections.abc import Callable
from pathlib import Path

from bats_cli.core.errors import RunFailure, UserInputError
from bats_cli.core.fileio import refuse_non_regular
from bats_cli.utils.signals import pid_alive

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
        refuse_non_regular(path)
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
    from bats_cli.core.names import safe_name

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
    from bats_cli.core.names import safe_text

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
