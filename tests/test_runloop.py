"""The shared run loop on a toy job: position, exact resume, cumulative clock, segments, best."""

from __future__ import annotations

import csv

import pytest
import torch
from torch import nn

from bats_cli.core.errors import Interrupted
from bats_cli.storage.checkpoint import load_checkpoint, read_metadata
from bats_cli.storage.rundir import RunDir
from bats_cli.training.runloop import Checkpoint, RunJob, RunLoop


class ToyJob(RunJob):
    """SGD on a linear model; two segments of ``epochs`` epochs of 4 steps each."""

    kind = "train"

    def __init__(self, epochs: int = 2, segments: int = 2) -> None:
        torch.manual_seed(0)
        self.model = nn.Linear(3, 1)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.1)
        self.epochs, self.segments, self.segment = epochs, segments, 0
        self.steps_per_epoch = 4
        self.x = torch.randn(16, 3, generator=torch.Generator().manual_seed(1))
        self.loss_sum = 0.0
        self.best = float("inf")
        self.events: list[str] = []

    def segment_done(self):
        return self.epoch >= self.epochs

    def next_segment(self):
        self.events.append(f"segment {self.segment} done")
        if self.segment + 1 >= self.segments:
            return False
        self.segment, self.epoch, self.step = self.segment + 1, 0, 0
        return True

    def metrics_epoch(self):
        return self.segment * self.epochs + self.epoch

    def begin_epoch(self):
        return f"epoch {self.epoch + 1}", iter(range(self.step, self.steps_per_epoch))

    def train_step(self, i):
        # Noise from the global RNG: resume must restore it for identical weights.
        x = self.x[4 * i: 4 * i + 4] + 0.01 * torch.randn(4, 3)
        loss = self.model(x).pow(2).mean()
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()
        self.loss_sum += float(loss.detach())
        return {"loss": float(loss.detach())}

    def end_epoch(self, bar):
        row = {"epoch": self.metrics_epoch(), "loss": self.loss_sum}
        self.loss_sum, self._improved = 0.0, self.loss_sum < self.best
        self.best = min(self.best, row["loss"])
        return row

    def after_epoch(self, row):
        return ("best",) if self._improved else ()

    def checkpoint(self, *, with_state):
        tensors = {f"model.{k}": v.detach().clone() for k, v in self.model.state_dict().items()}
        extra = {"toy": f"{self.segment},{self.loss_sum!r},{self.best!r}"}
        return Checkpoint(tensors=tensors, config={"toy": True}, epoch=self.epoch, step=self.step,
                          extra=extra)

    def restore(self, tensors, meta):
        self.model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
        segment, loss_sum, best = meta.extra["toy"].split(",")
        self.segment, self.loss_sum, self.best = int(segment), float(loss_sum), float(best)
        self.epoch, self.step = meta.epoch, meta.step


def _rows(run_dir):
    with open(run_dir / "metrics.csv") as f:
        return list(csv.DictReader(f))


def test_uninterrupted_run_writes_rows_last_and_best(tmp_path):
    job = ToyJob()
    run = RunDir(tmp_path / "run", resume=False)
    RunLoop(job, run_dir=run).run()
    assert [int(r["epoch"]) for r in _rows(run.path)] == [1, 2, 3, 4]
    assert job.events == ["segment 0 done", "segment 1 done"]
    assert run.last.exists() and run.best.exists()
    seconds = [float(r["seconds"]) for r in _rows(run.path)]
    assert seconds == sorted(seconds)


@pytest.mark.parametrize("stop_at", [1, 4, 6, 13])
def test_interrupt_then_resume_equals_uninterrupted(tmp_path, stop_at):
    torch.manual_seed(5)
    full = ToyJob()
    RunLoop(full, run_dir=RunDir(tmp_path / "full", resume=False)).run()

    torch.manual_seed(5)
    run = RunDir(tmp_path / "cut", resume=False)
    with pytest.raises(Interrupted, match="continue with --resume"):
        RunLoop(ToyJob(), run_dir=run, stop_after_steps=stop_at).run()
    meta = read_metadata(run.last)
    done = stop_at % 8  # steps into the segment: 2 epochs of 4
    # It stops after a step, before the epoch's end: step 4 of 4 resumes into that end.
    assert (meta.epoch, meta.step) == ((done - 1) // 4, (done - 1) % 4 + 1)

    resumed = ToyJob()
    loop = RunLoop(resumed, run_dir=RunDir(tmp_path / "cut", resume=True))
    loop.resume(load_checkpoint(run.last))
    loop.run()
    assert torch.equal(resumed.model.weight, full.model.weight)
    assert [r["loss"] for r in _rows(tmp_path / "cut")] == [r["loss"] for r in _rows(tmp_path / "full")]


def test_seconds_are_the_runs_cumulative_time_across_resume(tmp_path, monkeypatch):
    import bats_cli.training.runloop as runloop

    now = [1000.0]
    monkeypatch.setattr(runloop.time, "perf_counter", lambda: now[0])

    class Slow(ToyJob):
        def train_step(self, i):
            now[0] += 10.0  # every step takes 10 s of wall time
            return super().train_step(i)

    run = RunDir(tmp_path / "run", resume=False)
    with pytest.raises(Interrupted):
        RunLoop(Slow(segments=1), run_dir=run, stop_after_steps=6).run()
    now[0] += 5000.0  # the run sat interrupted for a while: not part of its time
    job = Slow(segments=1)
    loop = RunLoop(job, run_dir=RunDir(tmp_path / "run", resume=True))
    loop.resume(load_checkpoint(run.last))
    loop.run()
    assert [float(r["seconds"]) for r in _rows(run.path)] == [40.0, 80.0]
    assert loop.elapsed() == pytest.approx(80.0)


def test_a_signal_mid_epoch_stops_after_that_step_with_a_checkpoint(tmp_path):
    from bats_cli.utils.signals import GracefulInterrupt

    stop = GracefulInterrupt()  # a flag; set as a signal handler would

    class Flagging(ToyJob):
        def train_step(self, i):
            if self.epoch == 1 and self.step == 2:
                stop.requested, stop.signal_name = True, "SIGTERM"
            return super().train_step(i)

    job = Flagging()
    run = RunDir(tmp_path / "run", resume=False)
    with pytest.raises(Interrupted, match="interrupted by SIGTERM; checkpoint saved to"):
        RunLoop(job, run_dir=run, interrupt=stop).run()
    meta = read_metadata(run.last)
    assert (meta.epoch, meta.step) == (1, 3)
    assert len(_rows(run.path)) == 1


def test_a_long_run_checks_its_final_precision_not_the_flags(tmp_path):
    # `begin` knows only the flags; a resumed run's saved precision is checked by `settle`, before
    # any data is read or directory made (fp16 is refused on CPU).
    from bats_cli.core.errors import UserInputError
    from bats_cli.training.longrun import begin

    run = begin("train", out=tmp_path / "run", resume=True, default=lambda: tmp_path / "run", device="cpu",
                precision="fp32")
    assert run.opened is None and not (tmp_path / "run").exists()
    with pytest.raises(UserInputError, match="fp16 needs CUDA"):
        run.settle(precision="fp16", threads=None)
    threads = torch.get_num_threads()
    run.settle(precision="fp32", threads=threads)
