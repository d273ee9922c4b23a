"""Progress on stderr (so ``--json`` on stdout stays clean): a live line on a terminal, plain lines
otherwise, with the run's ETA."""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Iterator, Mapping
from typing import Any, TextIO

import torch

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
        from bats_cli.core.names import safe_text

        # Lines carry names read from files: no escape sequence reaches the terminal.
        print(safe_text(text), file=self.stream, flush=True)

    def warn(self, text: str) -> None:
        self.line(f"warning: {text}")

    def epoch_summary(self, metrics: Mapping[str, Any], *, desc: str | None = None) -> None:
        """One line of metrics computed outside an ``epoch`` context (e.g. a final test pass)."""
        text = format_metrics(metrics)
        self.line(f"{desc}  {text}" if desc else text)
