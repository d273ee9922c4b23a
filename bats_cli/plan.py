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

Terms added by arithmetic, not measured: Adam's two moments (2 x parameter bytes) and the
serialised checkpoint (weights + Adam state written as one safetensors buffer).

    plan = plan_run(command="train", model=model, train_images=50000, ...)
    print_plan(plan)
    check_fits(plan, force=False)      # UserInputError naming the largest batch that fits
"""

from __future__ import annotations

import copy
import json
import re
import sys
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
    seconds_per_epoch: float | None = None  # measured after the first steps of the real run
    network: str = ""
    measured: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def lines(self) -> list[str]:
        gib = 2**30
        avail = (f"{self.available_memory_bytes / gib:.1f} GiB available" if
                 self.available_memory_bytes is not None else "available memory unknown")
        out = [
            f"plan: {self.command} on {self.device}, {self.dataset} ({self.train_images:,} train / "
            f"{self.test_images:,} test images)",
            f"plan: network {self.network + ', ' if self.network else ''}{self.parameters:,} parameters",
            f"plan: {self.epochs} epochs x {self.steps_per_epoch:,} steps of batch {self.batch_size}"
            f" = {self.total_steps:,} steps",
            f"plan: estimated peak {self.memory} {self.peak_memory_bytes / gib:.2f} GiB ({avail}); "
            "ETA after the first steps",
        ]
        out += [f"plan: {note}" for note in self.notes]
        return out


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

        def step(batch: int, train: bool) -> int:
            x = torch.randn(batch, *input_shape, device=device)
            y = torch.randint(0, num_classes, (batch,), device=device)
            if cuda:
                torch.cuda.synchronize(device)
                torch.cuda.reset_peak_memory_stats(device)
            else:
                _reset_peak_rss()
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
            del grads, x, y
            return peak

        step(WARMUP_BATCH, True)
        measured = {}
        for train in (True, False):
            for b in batches:
                measured[f"{'train' if train else 'eval'}@{b}"] = step(b, train)
        del net, chosen
        if cuda:
            torch.cuda.empty_cache()

    def fit_line(kind: str) -> MemoryModel:
        b0, b1 = batches[0], batches[-1]
        m0, m1 = measured[f"{kind}@{b0}"], measured[f"{kind}@{b1}"]
        slope = max(0.0, (m1 - m0) / (b1 - b0))
        # The copy exists only while measuring; the real run holds one network, not two.
        return MemoryModel(fixed_bytes=m0 - slope * b0 - copy_bytes, per_image_bytes=slope,
                           measured=dict(measured))

    return fit_line("train"), fit_line("eval")


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
    est = estimate_network_bytes(build, input_shape=tuple(input_shape), batch_size=batch, training=False)
    return StepEstimate(est.params, est.param_bytes, est.activation_bytes, batch, built)


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
) -> Plan:
    """Measure and assemble the plan. ``models`` (search stages: networks or :class:`Candidate`
    builders, built one at a time) are measured too; the largest wins.

    A network whose measured step would not fit in the memory left is never measured: a
    UserInputError ending in ``advice`` (the settings to lower), or with ``force`` a plan from the
    meta-device estimate alone.
    """
    import torch

    device = torch.device(device)
    candidates = list(models) or [model]
    memory, available, in_use = _memory_room(device)
    steps = [estimate_step(c, input_shape=input_shape) for c in candidates]
    n_params = (sum(p.numel() for p in model.parameters()) if model is not None else steps[0].params)
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
                       for s in steps)
            return Plan(
                command=command, device=str(device), dataset=dataset, train_images=train_images,
                test_images=test_images, parameters=n_params, batch_size=batch_size,
                steps_per_epoch=steps_per_epoch, epochs=epochs,
                total_steps=total_steps if total_steps is not None else steps_per_epoch * epochs,
                peak_memory_bytes=peak, memory=memory, available_memory_bytes=available,
                largest_fitting_batch=0, fits=False, network=network,
                notes=[f"estimate only, not measured: one measured step would need about "
                       f"{_gib(worst.need_bytes)} of {memory} ({_gib(max(room, 0))} free)"],
            )
    best: tuple[int, MemoryModel, MemoryModel] | None = None
    for cand in candidates:
        net = cand.build() if isinstance(cand, Candidate) else cand
        train_m, eval_m = measure_memory(net, input_shape=input_shape, num_classes=num_classes,
                                         device=device, precision=precision, params=params)
        param_bytes = sum(p.numel() * p.element_size() for p in net.parameters())
        # Adam's moments live through the run; the checkpoint is serialised as one more copy
        # of weights and moments (safetensors builds the file in memory).
        extra = optimizer_moments * param_bytes
        save = (1 + optimizer_moments) * param_bytes
        peak = max(train_m.at(batch_size) + extra, eval_m.at(eval_batch_size) + extra,
                   train_m.fixed_bytes + extra + save)
        if best is None or peak > best[0]:
            best = (peak, train_m, eval_m, extra)  # type: ignore[assignment]
        del net
    peak, train_m, eval_m, extra = best  # type: ignore[misc]
    largest = None
    fits = True
    if available is not None:
        # 5 % below the line: a batch suggested at the very edge may not fit on a second measure.
        budget = 0.95 * HEADROOM * available - extra
        largest = max(0, train_m.largest_batch(budget))
        fits = peak <= HEADROOM * available
    return Plan(
        command=command, device=str(device), dataset=dataset, train_images=train_images,
        test_images=test_images, parameters=n_params, batch_size=batch_size,
        steps_per_epoch=steps_per_epoch, epochs=epochs,
        total_steps=total_steps if total_steps is not None else steps_per_epoch * epochs,
        peak_memory_bytes=int(peak), memory=memory, available_memory_bytes=available,
        largest_fitting_batch=largest, fits=fits, network=network,
        measured=train_m.measured,
    )


def check_fits(plan: Plan, *, force: bool = False) -> None:
    """UserInputError (exit 2) when the plan does not fit in memory, unless ``force``."""
    if plan.fits or force:
        return
    gib = 2**30
    largest = plan.largest_fitting_batch or 0
    hint = (f"use --batch-size {largest} (the largest that fits)" if largest >= 1 else
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
    its run directory is created.
    """

    def hook(**kwargs: Any) -> None:
        plan = plan_run(**kwargs, force=force)
        if dry_run:
            raise DryRun(plan)
        if not quiet:
            print_plan(plan)
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
    return dict(
        command="search", models=stages, device=device, dataset=spec.name,
        train_images=weight_images + arch_images, test_images=0,
        input_shape=(spec.in_channels, spec.image_size, spec.image_size),
        num_classes=spec.num_classes, batch_size=config.batch_size,
        eval_batch_size=config.batch_size, steps_per_epoch=steps,
        epochs=config.epochs * config.stages, precision=config.precision,
        network=f"supernet {','.join(map(str, config.layers))} cells, "
                f"{','.join(map(str, config.ops))} ops, C={config.channels}",
        advice="use fewer --channels, --layers or --nodes",
    )
