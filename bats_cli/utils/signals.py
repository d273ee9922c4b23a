"""SIGINT/SIGTERM as a flag the run loop polls (:class:`GracefulInterrupt`), and DataLoader workers
shielded from signals sent to the whole process group."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from bats_cli.core.errors import Interrupted

# --------------------------------------------------------------------------- signals


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists (on this host)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    except OSError:
        return False
    return True


# Under torchrun, a signal sent to the whole job (Ctrl-C, SLURM, ``kill -- -PGID``) reaches each
# worker twice: directly, and relayed by the launcher within milliseconds. The same signal again
# within this many seconds is that relay, not a second request.
RELAY_WINDOW_S = 2.0


def under_launcher() -> bool:
    """Whether this process is a worker started by torchrun (whose agent relays signals)."""
    return "TORCHELASTIC_RUN_ID" in os.environ


class GracefulInterrupt:
    """Turn SIGINT/SIGTERM into a flag the training loop polls after each step.

    A second signal raises ``KeyboardInterrupt`` at once (exit 130 without saving); under
    torchrun the same signal within :data:`RELAY_WINDOW_S` of the first is the launcher's relay
    of it and only repeats the request. Previous handlers are restored on exit. Outside the main thread it installs nothing (``requested``
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
        self._first: tuple[int, float] | None = None  # (signal, time.monotonic()) of the request
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
            if self._is_relay(signum):
                return
            raise KeyboardInterrupt
        self.requested = True
        self._first = (signum, time.monotonic())
        self.signal_name = signal.Signals(signum).name
        # os.write is safe inside a signal handler, unlike print (rich may hold the stream).
        msg = (
            f"\n{self.signal_name} received: stopping after this step and saving a checkpoint "
            "(send again to quit without saving)\n"
        )
        with contextlib.suppress(OSError):
            os.write(2, msg.encode())

    def _is_relay(self, signum: int) -> bool:
        if self._first is None or not under_launcher():
            return False
        first, at = self._first
        return signum == first and time.monotonic() - at < RELAY_WINDOW_S

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
        if os.getppid() != parent or not pid_alive(owner):
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
