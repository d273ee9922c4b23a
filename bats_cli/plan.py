"""The preflight plan of a long run: what it will do, how much memory it needs, whether it fits.

Peak memory is *measured*, never guessed: one training step (forward + backward) and one
evaluation forward of a copy of the real network on the real device, at two small batch sizes,
fitted by a straight line in the batch size and extrapolated to the run's batch. A network whose
real batch cannot fit is therefore never run at that batch. On CPU the measure is the process's
peak resident set (``VmHWM``, reset through ``/proc/self/clear_refs`` between measurements), so
the estimate is the whole process's peak RSS — interpreter, torch, data set, network — which is
what the kernel's OOM killer looks at; the C heap is trimmed before each measured step so that
memory freed earlier cannot hide a step's growth. On CUDA it is ``torch.cuda.max_memory_allocated``.

Before anything is measured (or, for a search, even built) a meta-device forward sizes one
measured step — the network, its measuring copy, their gradients and the outputs of every layer
at the largest measured batch — so a network that could not survive its own measurement is one
error line instead of an out-of-memory kill (with ``--force``: an unmeasured estimate).

Measuring costs seconds to a minute on a CPU, so it is done only where it decides something:
the meta-device forward also gives a peak estimate with a band (layer outputs per image x 1.3 to
x 2.2, what measured steps of this project's networks span), and a run whose band lies far below
the memory available (it fits) or far above it (it does not) is decided from the band alone.
Either way one training step at batch 4 is timed (after a warm-up step) for the estimated time
per epoch and in all, labelled as such. A plan measured once is kept in the cache
(``$XDG_CACHE_HOME/bats/plans``, keyed by the network's shapes, data, batch, device, precision,
threads and versions), so ``--resume`` and a run after its ``--dry-run`` reuse it (and suggest the
same batch size).

What it is doing is printed before it is done: the plan's first lines (command, data, network,
steps) come before any estimate, and a line says what is measured or timed before it starts.

Terms added by arithmetic, not measured: Adam's two moments (2 x parameter bytes) and the
serialised checkpoint (weights + Adam state written as one safetensors buffer).

    plan = plan_run(command="train", model=model, train_images=50000, ...)
    print_plan(plan)
    check_fits(plan, force=False)      # UserInputError naming the largest batch that fits
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bats_cli.errors import UserInputError

# Batch sizes measured: small enough that no network that exists in this project runs out of
# memory on them; two points after a warm-up step give the line (one-off allocations excluded).
MEASURE_BATCHES = (2, 4)
WARMUP_BATCH = 2
# Keep this share of the available memory free (page cache, data loader, fragmentation).
HEADROOM = 0.9
# Measured train-step memory per image over the meta-device sum of layer outputs per image, for
# this project's networks (tiny 1.75, paper CIFAR 1.50, 6 cells C=12 2.03; supernets alike): the
# band within which the unmeasured estimate is trusted.
META_FACTOR_LOW = 1.3
META_FACTOR_HIGH = 2.2
# Decided without measuring when the band's top is below this share of the room (fits) or its
# bottom above this multiple of it (does not fit); in between the step is measured.
FAR_BELOW = 0.8
FAR_ABOVE = 1.25
# The batch timed for the time estimate (after a warm-up step at WARMUP_BATCH).
TIMED_BATCH = max(MEASURE_BATCHES)


@dataclass(frozen=True)
class Candidate:
    """A network the plan builds only after its meta-device estimate says measuring it fits.

    ``build_for_estimate`` builds the same shapes from modules the ``meta`` device supports
    (e.g. the reference mixed op instead of the fused one); default: ``build``.
    """

    build: Callable[[], Any]
    build_for_estimate: Callable[[], Any] | None = None


class DryRun(Exception):
    """Raised by a preflight hook with ``--dry-run``: carries the plan back to the command."""

    def __init__(self, plan: Plan) -> None:
        super().__init__("dry run")
        self.plan = plan


@dataclass
class MemoryModel:
    """``peak(batch) = fixed_bytes + per_image_bytes * batch`` (train step or eval pass)."""

    fixed_bytes: float
    per_image_bytes: float
    measured: dict[str, int] = field(default_factory=dict)  # "train@2" -> bytes, ...
    seconds: dict[str, float] = field(default_factory=dict)  # "train@4" -> seconds of that step

    def at(self, batch: int) -> int:
        return int(self.fixed_bytes + self.per_image_bytes * batch)

    def largest_batch(self, budget: float) -> int:
        if self.per_image_bytes <= 0:
            return sys.maxsize
        return int((budget - self.fixed_bytes) // self.per_image_bytes)


@dataclass
class Plan:
    """Everything printed before a long run (and, with ``--dry-run --json``, the JSON object)."""

    command: str
    device: str
    dataset: str
    train_images: int
    test_images: int
    parameters: int
    batch_size: int
    steps_per_epoch: int
    epochs: int
    total_steps: int
    peak_memory_bytes: int
    memory: str  # "RAM" or "GPU"
    available_memory_bytes: int | None
    largest_fitting_batch: int | None
    fits: bool
    seconds_per_epoch: float | None = None  # estimated from a timed step (None: not timed)
    network: str = ""
    measured: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    seconds_total: float | None = None  # estimated, like seconds_per_epoch
    memory_source: str = "measured"  # "measured" or "estimated" (the meta-device band)
    reused: bool = False  # taken from an earlier plan of the same network and data (the cache)
    data_note: str = ""  # replaces "(N train / M test images)" when set (the search's split)
    seconds_per_step: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def header_lines(self) -> list[str]:
        """What the run is, known before anything is estimated or measured."""
        return [data_line(self.command, self.device, self.dataset, self.train_images, self.test_images,
                          self.data_note),
                f"plan: network {self.network + ', ' if self.network else ''}{self.parameters:,} parameters",
                steps_line(self.epochs, self.steps_per_epoch, self.batch_size, self.total_steps)]

    def result_lines(self) -> list[str]:
        """The verdict (memory) and the time estimate."""
        gib = 2**30
        peak = f"{self.peak_memory_bytes / gib:.2f} GiB"
        how = {
            "measured": f"measured at batches {MEASURE_BATCHES[0]} and {MEASURE_BATCHES[-1]}, "
                        f"extrapolated to {self.batch_size}",
            "estimated": "meta-device estimate, upper end; not measured: far from the limit",
        }.get(self.memory_source, self.memory_source)
        if self.reused:
            how += "; from an earlier plan of this network and data"
        if self.available_memory_bytes is None:
            verdict = f"plan: peak {self.memory} about {peak} ({how}); available memory unknown"
        elif self.fits:
            verdict = (f"plan: fits: peak {self.memory} about {peak} of "
                       f"{self.available_memory_bytes / gib:.1f} GiB available ({how})")
        else:
            largest = self.largest_fitting_batch or 0
            fix = (f"`--batch-size {largest}` fits" if largest >= 1 else
                   "no batch size fits: use a smaller network or another device")
            verdict = (f"plan: does not fit: peak {self.memory} about {peak} at batch {self.batch_size}, "
                       f"{self.available_memory_bytes / gib:.1f} GiB available ({how}): the run would be "
                       f"refused; {fix} (or --force to try anyway)")
        out = [verdict]
        if self.seconds_per_epoch is not None and self.seconds_total is not None:
            out.append(
                f"plan: time, estimated: about {clock(self.seconds_per_epoch)} per epoch, "
                f"{clock(self.seconds_total)} in all (steps timed at batches {MEASURE_BATCHES[0]} and "
                f"{TIMED_BATCH}, extrapolated to batch {self.batch_size}; the run prints its measured "
                "speed after its first steps)")
        out += [f"plan: {note}" for note in self.notes]
        return out

    def lines(self) -> list[str]:
        return self.header_lines() + self.result_lines()


def data_line(command: str, device, dataset: str, train_images: int, test_images: int,
              data_note: str = "") -> str:
    images = data_note or f"{train_images:,} train / {test_images:,} test images"
    return f"plan: {command} on {device}, {dataset} ({images})"


def steps_line(epochs: int, steps_per_epoch: int, batch_size: int, total_steps: int) -> str:
    return (f"plan: {epochs} epoch{'' if epochs == 1 else 's'} x {steps_per_epoch:,} "
            f"step{'' if steps_per_epoch == 1 else 's'} of batch {batch_size} = {total_steps:,} "
            f"step{'' if total_steps == 1 else 's'}")


def clock(seconds: float) -> str:
    """``0:42``, ``12:05``, ``3:02:10``, ``2.5 days``: a duration the way a reader plans with it."""
    s = int(round(seconds))
    if s >= 2 * 86400:
        return f"{seconds / 86400:.1f} days"
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}:{m:02d}:{sec:02d}" if h else f"{m}:{sec:02d}"


def round_batch(batch: int) -> int:
    """A suggested batch size rounded down (multiples of 8 from 16 on, of 16 from 64 on): the
    suggestion is stable against the noise of a measurement, so a dry run and the real run agree."""
    for step, above in ((16, 64), (8, 16)):
        if batch >= above:
            return batch // step * step
    return max(batch, 0)


# --------------------------------------------------------------------------- memory available


def _proc_kib(field_name: str, path: str = "/proc/self/status") -> int | None:
    try:
        text = Path(path).read_text()
    except OSError:
        return None
    match = re.search(rf"^{field_name}:\s+(\d+)\s*kB", text, re.M)
    return int(match.group(1)) if match else None


def _cgroup_limit() -> int | None:
    """The memory limit of this process's cgroup (v2 or v1), if any."""
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(path).read_text().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) < 2**60:
            return int(text)
    return None


def available_ram_bytes() -> int | None:
    """What this process may still grow by plus what it holds: MemAvailable + VmRSS, cgroup-capped."""
    avail = _proc_kib("MemAvailable", "/proc/meminfo")
    if avail is None:
        return None
    total = (avail + (_proc_kib("VmRSS") or 0)) * 1024
    limit = _cgroup_limit()
    return min(total, limit) if limit is not None else total


def available_gpu_bytes(device) -> int | None:
    import torch

    try:
        free, _total = torch.cuda.mem_get_info(device)
    except (RuntimeError, AssertionError):
        return None
    return int(free + torch.cuda.memory_allocated(device))


# --------------------------------------------------------------------------- measuring


def _trim_heap() -> None:
    """Give the C heap's free memory back to the OS (glibc ``malloc_trim``), so that a step's
    allocations grow the RSS instead of silently reusing memory freed earlier (data loading,
    earlier work in a long-lived process): without it the per-image slope is underestimated."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc: nothing to trim with


def _reset_peak_rss() -> bool:
    _trim_heap()
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # "5" resets the peak RSS (VmHWM) to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def _peak_rss_bytes() -> int:
    hwm = _proc_kib("VmHWM")
    if hwm is not None:
        return hwm * 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def default_loss(output, target):
    """Cross-entropy of the logits, plus the auxiliary head's when the network returns one."""
    import torch.nn.functional as F

    if isinstance(output, tuple):
        return F.cross_entropy(output[0].float(), target) + F.cross_entropy(output[1].float(), target)
    return F.cross_entropy(output.float(), target)


def measure_memory(
    model,
    *,
    input_shape: Sequence[int],
    num_classes: int,
    device,
    precision: str = "fp32",
    batches: Sequence[int] = MEASURE_BATCHES,
    loss_fn: Callable[[Any, Any], Any] = default_loss,
    params: Callable[[Any], Any] | None = None,
) -> tuple[MemoryModel, MemoryModel]:
    """(train-step model, eval-pass model) of the process's peak memory, measured on a copy.

    ``params(model)`` selects the tensors the step differentiates (default: all parameters).
    Global RNG states are restored afterwards, so a seeded run is unchanged by its plan.
    """
    import torch

    from bats_cli.runtime import autocast

    device = torch.device(device)
    cuda = device.type == "cuda"
    devices = [device] if cuda else []
    with torch.random.fork_rng(devices=devices):
        net = copy.deepcopy(model).to(device)
        copy_bytes = sum(t.numel() * t.element_size() for t in list(net.parameters()) + list(net.buffers()))
        chosen = list(params(net)) if params is not None else list(net.parameters())

        seconds: dict[str, float] = {}

        # The network is an argument, not a closure variable, so `del net` below really frees it.
        def step(net, chosen: list, batch: int, train: bool) -> int:
            x = torch.randn(batch, *input_shape, device=device)
            y = torch.randint(0, num_classes, (batch,), device=device)
            if cuda:
                torch.cuda.synchronize(device)
                torch.cuda.reset_peak_memory_stats(device)
            else:
                _reset_peak_rss()
            started = time.perf_counter()
            if train:
                net.train()
                with autocast(device, precision):
                    out = net(x)
                loss = loss_fn(out, y)
                grads = torch.autograd.grad(loss, chosen, allow_unused=True)
                del out, loss
            else:
                net.eval()
                with torch.no_grad(), autocast(device, precision):
                    out = net(x)
                grads = None
                del out
            if cuda:
                torch.cuda.synchronize(device)
                peak = torch.cuda.max_memory_allocated(device)
            else:
                peak = _peak_rss_bytes()
            seconds[f"{'train' if train else 'eval'}@{batch}"] = time.perf_counter() - started
            del grads, x, y
            return peak

        step(net, chosen, WARMUP_BATCH, True)
        measured = {}
        for train in (True, False):
            for b in batches:
                measured[f"{'train' if train else 'eval'}@{b}"] = step(net, chosen, b, train)
        del net, chosen
        if cuda:
            torch.cuda.empty_cache()

    def fit_line(kind: str) -> MemoryModel:
        b0, b1 = batches[0], batches[-1]
        m0, m1 = measured[f"{kind}@{b0}"], measured[f"{kind}@{b1}"]
        slope = max(0.0, (m1 - m0) / (b1 - b0))
        # The copy exists only while measuring; the real run holds one network, not two.
        return MemoryModel(fixed_bytes=m0 - slope * b0 - copy_bytes, per_image_bytes=slope,
                           measured=dict(measured), seconds=dict(seconds))

    return fit_line("train"), fit_line("eval")


def time_steps(
    model,
    *,
    input_shape: Sequence[int],
    num_classes: int,
    device,
    precision: str = "fp32",
    loss_fn: Callable[[Any, Any], Any] = default_loss,
    params: Callable[[Any], Any] | None = None,
    channels_last: bool = False,
) -> dict[str, float]:
    """Seconds of one training step at each of ``MEASURE_BATCHES`` and one evaluation pass at
    ``TIMED_BATCH`` (after a warm-up step), on a copy of ``model`` (RNG states restored: a seeded run is unchanged).
    ``channels_last``: in the memory format ``bats train`` uses for grouped convs on a CPU."""
    import torch

    from bats_cli.runtime import autocast

    device = torch.device(device)
    cuda = device.type == "cuda"
    seconds: dict[str, float] = {}
    with torch.random.fork_rng(devices=[device] if cuda else []):
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        net = copy.deepcopy(model).to(device, memory_format=fmt)
        chosen = list(params(net)) if params is not None else list(net.parameters())
        # Two timed batch sizes: a step's fixed cost (per-op overhead, which dominates small
        # networks) and its cost per image are told apart.
        for batch, train, key in ((WARMUP_BATCH, True, None), (MEASURE_BATCHES[0], True, "train"),
                                  (TIMED_BATCH, True, "train"), (TIMED_BATCH, False, "eval")):
            x = torch.randn(batch, *input_shape, device=device).contiguous(memory_format=fmt)
            y = torch.randint(0, num_classes, (batch,), device=device)
            started = time.perf_counter()
            if train:
                net.train()
                with autocast(device, precision):
                    out = net(x)
                torch.autograd.grad(loss_fn(out, y), chosen, allow_unused=True)
            else:
                net.eval()
                with torch.no_grad(), autocast(device, precision):
                    net(x)
            if cuda:
                torch.cuda.synchronize(device)
            if key is not None:
                seconds[f"{key}@{batch}"] = time.perf_counter() - started
        del net, chosen
    return seconds


# --------------------------------------------------------------------------- before measuring


def _meta_twin(model):
    """A copy of ``model`` whose parameters and buffers live on the ``meta`` device (no memory)."""
    import torch

    memo: dict[int, Any] = {}
    for p in model.parameters():
        memo[id(p)] = torch.nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
    for b in model.buffers():
        memo[id(b)] = torch.empty_like(b, device="meta")
    return copy.deepcopy(model, memo)


def _memory_room(device) -> tuple[str, int | None, int]:
    """("RAM" or "GPU", memory this process may hold in all, what it holds now)."""
    import torch

    if device.type == "cuda":
        return "GPU", available_gpu_bytes(device), int(torch.cuda.memory_allocated(device))
    return "RAM", available_ram_bytes(), (_proc_kib("VmRSS") or 0) * 1024


@dataclass(frozen=True)
class StepEstimate:
    """What measuring one network needs beyond what the process holds now (meta forward)."""

    params: int
    param_bytes: int  # fp32 weights
    activation_bytes: int  # layer outputs at ``batch``
    batch: int
    built: bool  # the network already exists (its weights are in memory already)
    fingerprint: str = ""  # the network's module types and tensor shapes, hashed (the plan cache key)

    @property
    def need_bytes(self) -> int:
        # The network itself unless built, the measuring copy, the gradients, the activations.
        return (2 if self.built else 3) * self.param_bytes + self.activation_bytes


def estimate_step(candidate, *, input_shape: Sequence[int]) -> StepEstimate:
    """Meta-device estimate of measuring ``candidate`` (a built network or a :class:`Candidate`)."""
    from bats_cli.preflight import estimate_network_bytes

    built = not isinstance(candidate, Candidate)
    if built:
        build = lambda: _meta_twin(candidate)  # noqa: E731
    else:
        build = candidate.build_for_estimate or candidate.build
    batch = max(MEASURE_BATCHES)
    shapes: list[str] = []

    def build_and_describe():
        net = build()
        shapes.extend(f"{name}:{type(m).__name__}" for name, m in net.named_modules())
        shapes.extend(f"{name}:{tuple(t.shape)}" for name, t in
                      list(net.named_parameters()) + list(net.named_buffers()))
        return net

    est = estimate_network_bytes(build_and_describe, input_shape=tuple(input_shape), batch_size=batch,
                                 training=False)
    fingerprint = hashlib.sha256("\n".join(shapes).encode()).hexdigest()[:32]
    return StepEstimate(est.params, est.param_bytes, est.activation_bytes, batch, built, fingerprint)


def _gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB"


def _unmeasured_plan(step: StepEstimate, *, batch_size: int, optimizer_moments: int) -> int:
    """Peak of the real run from the meta estimate alone: weights, gradients, moments, activations."""
    per_image = step.activation_bytes / step.batch
    return int((2 + optimizer_moments) * step.param_bytes + per_image * batch_size)


# --------------------------------------------------------------------------- the plan


def plan_run(
    *,
    command: str,
    model=None,
    device,
    dataset: str,
    train_images: int,
    test_images: int,
    input_shape: Sequence[int],
    num_classes: int,
    batch_size: int,
    eval_batch_size: int,
    steps_per_epoch: int,
    epochs: int,
    total_steps: int | None = None,
    precision: str = "fp32",
    network: str = "",
    optimizer_moments: int = 2,
    models: Sequence[Any] = (),
    params: Callable[[Any], Any] | None = None,
    force: bool = False,
    advice: str = "use fewer --channels or --layers",
    data_note: str = "",
    step_passes: float = 1.0,
    announce: Callable[[str], None] | None = None,
    cache: bool = True,
    teacher=None,
) -> Plan:
    """Estimate, measure where it decides something, and assemble the plan. ``models`` (search
    stages: networks or :class:`Candidate` builders, built one at a time, each run for an equal
    share of the epochs) are planned too; the largest peak wins, their times add up.

    ``announce(line)`` receives the plan's first lines as soon as they are known and a line
    before anything is measured or timed. ``step_passes``: training passes per optimisation step
    (a search step is an architecture step plus a weight step). A network whose measured step
    would not fit in the memory left is never measured: a UserInputError ending in ``advice``
    (the settings to lower), or with ``force`` a plan from the meta-device estimate alone.
    ``teacher``: a frozen network that runs forward (no gradients) before every training step
    (distillation); its weights are counted through the run, its forward pass's layer outputs
    (meta-device estimate, an upper bound without autograd) on top of the step's fixed part.
    """
    import torch

    say = announce or (lambda line: None)
    device = torch.device(device)
    total_steps = total_steps if total_steps is not None else steps_per_epoch * epochs
    candidates = list(models) or [model]
    memory, available, in_use = _memory_room(device)
    # The data line at once: a search's three supernets take seconds to estimate.
    say(data_line(command, str(device), dataset, train_images, test_images, data_note))
    # The meta-device estimate first: shapes only, no memory, a second or two.
    steps = [estimate_step(c, input_shape=input_shape) for c in candidates]
    t_weights = t_forward = 0
    if teacher is not None:
        # Frozen weights through the run; its forward pass's layer outputs (meta estimate).
        t_step = estimate_step(teacher, input_shape=input_shape)
        t_weights = sum(t.numel() * t.element_size() for t in list(teacher.parameters()) + list(teacher.buffers()))
        t_forward = int(t_step.activation_bytes / t_step.batch * batch_size)
        t_note = (f"teacher counted: {t_step.params:,} parameters ({t_weights / 2**20:.1f} MiB, frozen) "
                  f"and its forward pass (up to {t_forward / 2**20:.1f} MiB at batch {batch_size}); "
                  "the time estimate leaves out its forward pass")
    n_params = (sum(p.numel() for p in model.parameters()) if model is not None else steps[0].params)
    base = dict(command=command, device=str(device), dataset=dataset, train_images=train_images,
                test_images=test_images, parameters=n_params, batch_size=batch_size,
                steps_per_epoch=steps_per_epoch, epochs=epochs, total_steps=total_steps, memory=memory,
                available_memory_bytes=available, network=network, data_note=data_note)
    if available is not None:
        room = HEADROOM * available - in_use
        worst = max(steps, key=lambda s: s.need_bytes)
        if worst.need_bytes > room:
            if not force:
                raise UserInputError(
                    f"{command}: measuring one step (batch {worst.batch}) needs about "
                    f"{_gib(worst.need_bytes)} of {memory} ({network + ': ' if network else ''}"
                    f"{worst.params:,} parameters, {_gib(worst.param_bytes)} each for weights, copy and "
                    f"gradients; activations {_gib(worst.activation_bytes)}) but {_gib(max(room, 0))} is "
                    f"free; {advice}"
                )
            peak = max(_unmeasured_plan(s, batch_size=batch_size, optimizer_moments=optimizer_moments)
                       for s in steps) + t_weights + t_forward
            for line in Plan(**base, peak_memory_bytes=0, largest_fitting_batch=None, fits=True).header_lines()[1:]:
                say(line)
            return Plan(
                **base, peak_memory_bytes=peak, largest_fitting_batch=0, fits=False,
                memory_source="estimated",
                notes=[f"estimate only, not measured: one measured step would need about "
                       f"{_gib(worst.need_bytes)} of {memory} ({_gib(max(room, 0))} free)"]
                + ([t_note] if teacher is not None else []),
            )
    for line in Plan(**base, peak_memory_bytes=0, largest_fitting_batch=None, fits=True).header_lines()[1:]:
        say(line)  # the data line went first

    key = _cache_key(command=command, steps=steps, device=device, dataset=dataset,
                     train_images=train_images, test_images=test_images, input_shape=input_shape,
                     num_classes=num_classes, precision=precision) if cache else None
    band = [_meta_band(s, in_use=in_use, batch_size=batch_size, optimizer_moments=optimizer_moments)
            for s in steps]
    high = max(b[1] for b in band)
    low = max(b[0] for b in band)
    decided = available is None or high <= FAR_BELOW * HEADROOM * available or \
        low >= FAR_ABOVE * HEADROOM * available
    cached = _load_cached(key)
    reused = cached is not None and (cached[0] == "measured" or decided)
    if reused:
        source, per_stage = cached
    else:
        source = "estimated" if decided else "measured"
        say(f"plan: timing a training step at batches {MEASURE_BATCHES[0]} and {TIMED_BATCH} "
            "(after a warm-up step)"
            + (f" of each of the {len(candidates)} networks" if len(candidates) > 1 else "") + "..."
            if decided else
            f"plan: measuring peak memory and speed: one training step at batches "
            f"{MEASURE_BATCHES[0]} and {MEASURE_BATCHES[-1]} and one evaluation pass, on a copy of the "
            + ("network" if len(candidates) == 1 else f"{len(candidates)} networks, one at a time") + "...")
        per_stage = []
        for cand, step in zip(candidates, steps):
            net = cand.build() if isinstance(cand, Candidate) else cand
            param_bytes = sum(p.numel() * p.element_size() for p in net.parameters())
            if decided:
                seconds = time_steps(net, input_shape=input_shape, num_classes=num_classes, device=device,
                                     precision=precision, params=params,
                                     channels_last=_runs_channels_last(cand, device, precision))
                train_m, eval_m = _meta_models(step, in_use=in_use, param_bytes=param_bytes)
            else:
                train_m, eval_m = measure_memory(net, input_shape=input_shape, num_classes=num_classes,
                                                 device=device, precision=precision, params=params)
                seconds = {k: v for k, v in {**eval_m.seconds, **train_m.seconds}.items()
                           if k.startswith("train@") or k == f"eval@{TIMED_BATCH}"}
            per_stage.append((train_m, eval_m, seconds, param_bytes))
            del net
        _store_cached(key, source, per_stage)

    best = None
    for train_m, eval_m, _seconds, param_bytes in per_stage:
        # Adam's moments live through the run; the checkpoint is serialised as one more copy
        # of weights and moments (safetensors builds the file in memory).
        extra = optimizer_moments * param_bytes
        save = (1 + optimizer_moments) * param_bytes
        peak = max(train_m.at(batch_size) + extra, eval_m.at(eval_batch_size) + extra,
                   train_m.fixed_bytes + extra + save)
        if best is None or peak > best[0]:
            best = (peak, train_m, extra)
    peak, train_m, extra = best
    notes: list[str] = [t_note] if teacher is not None else []
    if teacher is not None:
        peak = max(peak + t_weights, train_m.fixed_bytes + extra + t_weights + t_forward)
        extra += t_weights
    largest = None
    fits = True
    if available is not None:
        # 5 % below the line: a batch suggested at the very edge may not fit on a second measure.
        budget = 0.95 * HEADROOM * available - extra
        largest = round_batch(max(0, train_m.largest_batch(budget)))
        fits = peak <= HEADROOM * available
    per_epoch, per_step = _time_estimate(per_stage, batch_size=batch_size, steps_per_epoch=steps_per_epoch,
                                         test_images=test_images, step_passes=step_passes)
    return Plan(
        **base, peak_memory_bytes=int(peak), largest_fitting_batch=largest, fits=fits,
        measured=train_m.measured, memory_source=source, reused=reused, seconds_per_epoch=per_epoch,
        seconds_total=per_epoch * epochs if per_epoch is not None else None, seconds_per_step=per_step,
        notes=notes,
    )


def _runs_channels_last(candidate, device, precision: str) -> bool:
    """Whether the run moves this network to channels-last (train / binarize on a CPU with grouped
    convs); the search's supernets (given as :class:`Candidate`) handle their layout inside."""
    import torch

    from bats_cli.runtime import memory_format

    if isinstance(candidate, Candidate):
        return False
    return memory_format(device, candidate, precision=precision) == torch.channels_last


def _meta_band(step: StepEstimate, *, in_use: int, batch_size: int, optimizer_moments: int) -> tuple[int, int]:
    """(low, high) peak of the real run from the meta-device estimate: what the process holds,
    weights' gradients and moments (and the weights, unless built), layer outputs x the band."""
    per_image = step.activation_bytes / step.batch
    fixed = in_use + (1 + optimizer_moments + (0 if step.built else 1)) * step.param_bytes
    return (int(fixed + META_FACTOR_LOW * per_image * batch_size),
            int(fixed + META_FACTOR_HIGH * per_image * batch_size))


def _meta_models(step: StepEstimate, *, in_use: int, param_bytes: int) -> tuple[MemoryModel, MemoryModel]:
    """Train / eval memory lines from the meta estimate, at the top of the band (so a batch it
    suggests fits): the process as it is, the weights unless built, the gradients, layer outputs."""
    per_image = META_FACTOR_HIGH * step.activation_bytes / step.batch
    held = in_use + (0 if step.built else param_bytes)
    train_m = MemoryModel(fixed_bytes=held + param_bytes, per_image_bytes=per_image)
    # Evaluation keeps no layer outputs for backward: a fraction of training's (measured 1/8-1/4).
    eval_m = MemoryModel(fixed_bytes=held, per_image_bytes=per_image / 4)
    return train_m, eval_m


def _time_estimate(per_stage, *, batch_size: int, steps_per_epoch: int, test_images: int,
                   step_passes: float) -> tuple[float | None, float | None]:
    """(seconds per epoch, seconds per step), averaged over the stages, from the timed steps."""
    epochs, steps = [], []
    small, large = MEASURE_BATCHES[0], TIMED_BATCH
    for _train_m, _eval_m, seconds, _param_bytes in per_stage:
        train_s = seconds.get(f"train@{large}")
        if train_s is None:
            return None, None
        eval_s = seconds.get(f"eval@{large}", train_s / 3)
        # A line through the two timed steps: fixed cost + cost per image. When noise makes the
        # smaller batch the slower one, the larger step's time per image alone (an upper bound).
        per_image = (train_s - seconds.get(f"train@{small}", train_s)) / (large - small)
        if per_image <= 0:
            fixed, per_image = 0.0, train_s / large
        else:
            fixed = max(train_s - per_image * large, 0.0)
        step = step_passes * (fixed + per_image * batch_size)
        steps.append(step)
        epochs.append(step * steps_per_epoch + eval_s / TIMED_BATCH * test_images)
    return sum(epochs) / len(epochs), sum(steps) / len(steps)


# --------------------------------------------------------------------------- the plan cache


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "bats" / "plans"


def _cache_key(*, command, steps, device, dataset, train_images, test_images, input_shape, num_classes,
               precision) -> str:
    import torch

    import bats_cli

    parts = [command, [s.fingerprint for s in steps], str(device), dataset, train_images, test_images,
             list(input_shape), num_classes, precision, torch.get_num_threads(), torch.__version__,
             bats_cli.__version__, MEASURE_BATCHES, TIMED_BATCH]
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:40]


def _load_cached(key: str | None):
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


def _store_cached(key: str | None, source: str, per_stage) -> None:
    if key is None or os.environ.get("BATS_PLAN_CACHE") == "0":
        return
    from bats_cli.fileio import atomic_write_json

    stages = [{"train": asdict(t), "eval": asdict(e), "seconds": s, "param_bytes": pb}
              for t, e, s, pb in per_stage]
    try:
        atomic_write_json(_cache_dir() / f"{key}.json", {"source": source, "stages": stages})
    except Exception:  # a read-only or full cache only costs the next plan a measurement
        pass


def check_fits(plan: Plan, *, force: bool = False) -> None:
    """UserInputError (exit 2) when the plan does not fit in memory, unless ``force``."""
    if plan.fits or force:
        return
    gib = 2**30
    largest = plan.largest_fitting_batch or 0
    hint = (f"use --batch-size {largest} (it fits)" if largest >= 1 else
            "no batch size fits: use a smaller network (--width, --layers, --channels) or another device")
    raise UserInputError(
        f"{plan.command} needs about {plan.peak_memory_bytes / gib:.1f} GiB of {plan.memory} at "
        f"batch {plan.batch_size} but {plan.available_memory_bytes / gib:.1f} GiB is available; "
        f"{hint}, or --force to try anyway"
    )


def print_plan(plan: Plan, *, stream=None, as_json: bool = False) -> None:
    """The plan as lines on stderr (or, ``as_json``, one JSON object on stdout)."""
    if as_json:
        sys.stdout.write(json.dumps(plan.to_dict()) + "\n")
        sys.stdout.flush()
        return
    stream = stream if stream is not None else sys.stderr
    for line in plan.lines():
        print(line, file=stream, flush=True)


def make_preflight(*, dry_run: bool, force: bool, as_json: bool, quiet: bool) -> Callable[..., None]:
    """The hook a long command passes to its library function: plan, print, refuse or stop.

    The library calls ``hook(**plan_run_arguments)`` once its data and network exist and before
    its run directory is created. The plan's lines go to stderr as they are known (unless
    ``quiet``; with ``--dry-run --quiet`` all at the end); ``--dry-run --json`` prints the plan as
    one JSON object on stdout (the command does, from :class:`DryRun`).
    """

    def hook(**kwargs: Any) -> None:
        say = None if quiet else (lambda line: print(line, file=sys.stderr, flush=True))
        plan = plan_run(**kwargs, force=force, announce=say)
        if say is not None:
            for line in plan.result_lines():
                say(line)
        elif dry_run and not as_json:
            print_plan(plan)
        if dry_run:
            raise DryRun(plan)
        check_fits(plan, force=force)

    return hook


def search_plan_args(config, spec, device, weight_images: int, arch_images: int) -> dict[str, Any]:
    """:func:`plan_run` arguments for ``bats search``: every stage's supernet is measured.

    Which ops survive a stage is not known before the search, so each stage is measured with
    the costliest candidates (the last ones of the space's list: the convolutions).
    """
    from bats_cli.spaces import get_space
    from bats_cli.supernet import SuperNet, SupernetConfig

    space = get_space(config.space)
    n_edges = sum(2 + i for i in range(config.nodes))

    def builder(layers: int, ops: list[str], mixed_op: str) -> Callable[[], Any]:
        sconf = SupernetConfig(
            space=config.space, channels=config.channels, layers=layers,
            num_classes=spec.num_classes, in_channels=spec.in_channels, steps=config.nodes,
            spec=config.spec, temperature_normal=config.temp_normal,
            temperature_reduce=config.temp_reduce, activation=config.activation,
            channels_per_group=config.channels_per_group, mixed_op=mixed_op,
        )
        return lambda: SuperNet(sconf, candidates_normal=[list(ops) for _ in range(n_edges)],
                                candidates_reduce=[list(ops) for _ in range(n_edges)])

    stages = []
    for layers, k in zip(config.layers, config.ops):
        ops = list(space.candidates)[-k:] if k < len(space.candidates) else list(space.candidates)
        # The fused mixed op does not run on the meta device; the reference one has its shapes.
        stages.append(Candidate(build=builder(layers, ops, config.mixed_op),
                                build_for_estimate=builder(layers, ops, "reference")))
    steps = min(weight_images // config.batch_size, arch_images // config.batch_size)
    # Warm-up epochs train the weights only; the others add an architecture step to each step.
    search_epochs = max(config.epochs, 1)
    passes = (config.warmup + 2 * max(config.epochs - config.warmup, 0)) / search_epochs
    return dict(
        command="search", models=stages, device=device, dataset=spec.name,
        train_images=weight_images + arch_images, test_images=0,
        data_note=f"{weight_images:,} + {arch_images:,} images: the weights' and the architecture's "
                  "halves of the training split", step_passes=passes,
        input_shape=(spec.in_channels, spec.image_size, spec.image_size),
        num_classes=spec.num_classes, batch_size=config.batch_size,
        eval_batch_size=config.batch_size, steps_per_epoch=steps,
        epochs=config.epochs * config.stages, precision=config.precision,
        network=f"supernet {','.join(map(str, config.layers))} cells, "
                f"{','.join(map(str, config.ops))} ops, C={config.channels}",
        advice="use fewer --channels, --layers or --nodes",
    )
