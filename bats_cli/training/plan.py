"""The preflight plan of a long run: what it will do, how much memory it needs, whether it fits.

A meta-device estimate first (:mod:`bats_cli.training.plan_measure`); peak memory measured on a copy of the
network only where the estimate's band straddles the limit, a training step timed either way; the
result cached (:mod:`bats_cli.training.plan_cache`). Lines are printed as they are known. How and why:
docs/reliability.md, "How the plan measures".

    plan = plan_run(command="train", model=model, train_images=50000, ...)
    print_plan(plan)
    check_fits(plan, force=False)      # UserInputError naming the largest batch that fits
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from bats_cli.core.errors import UserInputError
from bats_cli.training.plan_cache import cache_key, load_cached, store_cached
from bats_cli.training.plan_measure import (
    MEASURE_BATCHES,
    TIMED_BATCH,
    Candidate,
    estimate_step,
    measure_memory,
    meta_band,
    meta_models,
    time_estimate,
    time_steps,
    unmeasured_peak,
)
from bats_cli.utils import memory as probes
from bats_cli.utils.memory import format_bytes

# Keep this share of the available memory free (page cache, data loader, fragmentation).
HEADROOM = 0.9
# Decided without measuring when the band's top is below this share of the room (fits) or its
# bottom above this multiple of it (does not fit); in between the step is measured.
FAR_BELOW = 0.8
FAR_ABOVE = 1.25


class DryRun(Exception):
    """Raised by a preflight hook with ``--dry-run``: carries the plan back to the command."""

    def __init__(self, plan: Plan) -> None:
        super().__init__("dry run")
        self.plan = plan


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
        peak = format_bytes(self.peak_memory_bytes, 2)
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
                       f"{format_bytes(self.available_memory_bytes)} available ({how})")
        else:
            largest = self.largest_fitting_batch or 0
            fix = (f"`--batch-size {largest}` fits" if largest >= 1 else
                   "no batch size fits: use a smaller network or another device")
            verdict = (f"plan: does not fit: peak {self.memory} about {peak} at batch {self.batch_size}, "
                       f"{format_bytes(self.available_memory_bytes)} available ({how}): the run would be "
                       f"refused; {fix} (or --ignore-plan to try anyway)")
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


def _memory_room(device) -> tuple[str, int | None, int]:
    """("RAM" or "GPU", memory this process may hold in all, what it holds now)."""
    import torch

    if device.type == "cuda":
        return "GPU", probes.available_gpu_bytes(device), int(torch.cuda.memory_allocated(device))
    return "RAM", probes.available_ram_bytes(), probes.rss_bytes()


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
        t_note = (f"teacher counted: {t_step.params:,} parameters ({format_bytes(t_weights, 2)}, frozen) "
                  f"and its forward pass (up to {format_bytes(t_forward, 2)} at batch {batch_size}); "
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
                    f"{format_bytes(worst.need_bytes)} of {memory} ({network + ': ' if network else ''}"
                    f"{worst.params:,} parameters, {format_bytes(worst.param_bytes)} each for weights, copy and "
                    f"gradients; activations {format_bytes(worst.activation_bytes)}) but "
                    f"{format_bytes(max(room, 0))} is free; {advice}"
                )
            peak = max(unmeasured_peak(s, batch_size=batch_size, optimizer_moments=optimizer_moments)
                       for s in steps) + t_weights + t_forward
            for line in Plan(**base, peak_memory_bytes=0, largest_fitting_batch=None, fits=True).header_lines()[1:]:
                say(line)
            return Plan(
                **base, peak_memory_bytes=peak, largest_fitting_batch=0, fits=False,
                memory_source="estimated",
                notes=[f"estimate only, not measured: one measured step would need about "
                       f"{format_bytes(worst.need_bytes)} of {memory} ({format_bytes(max(room, 0))} free)"]
                + ([t_note] if teacher is not None else []),
            )
    for line in Plan(**base, peak_memory_bytes=0, largest_fitting_batch=None, fits=True).header_lines()[1:]:
        say(line)  # the data line went first

    key = cache_key(command=command, steps=steps, device=device, dataset=dataset,
                     train_images=train_images, test_images=test_images, input_shape=input_shape,
                     num_classes=num_classes, precision=precision) if cache else None
    band = [meta_band(s, in_use=in_use, batch_size=batch_size, optimizer_moments=optimizer_moments)
            for s in steps]
    high = max(b[1] for b in band)
    low = max(b[0] for b in band)
    decided = available is None or high <= FAR_BELOW * HEADROOM * available or \
        low >= FAR_ABOVE * HEADROOM * available
    cached = load_cached(key)
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
                train_m, eval_m = meta_models(step, in_use=in_use, param_bytes=param_bytes)
            else:
                train_m, eval_m = measure_memory(net, input_shape=input_shape, num_classes=num_classes,
                                                 device=device, precision=precision, params=params)
                seconds = {k: v for k, v in {**eval_m.seconds, **train_m.seconds}.items()
                           if k.startswith("train@") or k == f"eval@{TIMED_BATCH}"}
            per_stage.append((train_m, eval_m, seconds, param_bytes))
            del net
        store_cached(key, source, per_stage)

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
    per_epoch, per_step = time_estimate(per_stage, batch_size=batch_size, steps_per_epoch=steps_per_epoch,
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

    from bats_cli.utils.runtime import memory_format

    if isinstance(candidate, Candidate):
        return False
    return memory_format(device, candidate, precision=precision) == torch.channels_last


def check_fits(plan: Plan, *, force: bool = False) -> None:
    """UserInputError (exit 2) when the plan does not fit in memory, unless ``force``."""
    if plan.fits or force:
        return
    largest = plan.largest_fitting_batch or 0
    hint = (f"use --batch-size {largest} (it fits)" if largest >= 1 else
            "no batch size fits: use a smaller network (--width, --layers, --channels) or another device")
    raise UserInputError(
        f"{plan.command} needs about {format_bytes(plan.peak_memory_bytes)} of {plan.memory} at "
        f"batch {plan.batch_size} but {format_bytes(plan.available_memory_bytes)} is available; "
        f"{hint}, or --ignore-plan to try anyway"
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
    from bats_cli.core.spaces import get_space
    from bats_cli.models.supernet import SuperNet, SupernetConfig

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
