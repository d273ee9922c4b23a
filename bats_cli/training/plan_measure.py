"""Measuring what one step of a network costs, and estimating it before measuring.

``estimate_step``: a meta-device forward (shapes only, no memory) sizes one measured step and
gives the band of the unmeasured estimate. ``measure_memory``: the process's peak memory over a
training step and an evaluation pass at two small batches, a line in the batch size (peak RSS
on CPU, the allocator's peak on CUDA). ``time_steps``: seconds of those steps, and
``time_estimate`` the time per step and epoch from them. Measuring works on a copy of the network
and restores the RNG states, so a seeded run is unchanged by its plan.
"""

from __future__ import annotations

import copy
import hashlib
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from bats_cli.utils.memory import peak_rss_bytes, reset_peak_rss

# Batch sizes measured: small enough that no network that exists in this project runs out of
# memory on them; two points after a warm-up step give the line (one-off allocations excluded).
MEASURE_BATCHES = (2, 4)
WARMUP_BATCH = 2
# Measured train-step memory per image over the meta-device sum of layer outputs per image, for
# this project's networks (tiny 1.75, paper CIFAR 1.50, 6 cells C=12 2.03; supernets alike): the
# band within which the unmeasured estimate is trusted.
META_FACTOR_LOW = 1.3
META_FACTOR_HIGH = 2.2
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

    from bats_cli.utils.runtime import autocast

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
                reset_peak_rss()
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
                peak = peak_rss_bytes()
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

    from bats_cli.utils.runtime import autocast

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


def meta_twin(model):
    """A copy of ``model`` whose parameters and buffers live on the ``meta`` device (no memory)."""
    import torch

    memo: dict[int, Any] = {}
    for p in model.parameters():
        memo[id(p)] = torch.nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
    for b in model.buffers():
        memo[id(b)] = torch.empty_like(b, device="meta")
    return copy.deepcopy(model, memo)


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
    from bats_cli.utils.preflight import estimate_network_bytes

    built = not isinstance(candidate, Candidate)
    if built:
        build = lambda: meta_twin(candidate)  # noqa: E731
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


def unmeasured_peak(step: StepEstimate, *, batch_size: int, optimizer_moments: int) -> int:
    """Peak of the real run from the meta estimate alone: weights, gradients, moments, activations."""
    per_image = step.activation_bytes / step.batch
    return int((2 + optimizer_moments) * step.param_bytes + per_image * batch_size)


def meta_band(step: StepEstimate, *, in_use: int, batch_size: int, optimizer_moments: int) -> tuple[int, int]:
    """(low, high) peak of the real run from the meta-device estimate: what the process holds,
    weights' gradients and moments (and the weights, unless built), layer outputs x the band."""
    per_image = step.activation_bytes / step.batch
    fixed = in_use + (1 + optimizer_moments + (0 if step.built else 1)) * step.param_bytes
    return (int(fixed + META_FACTOR_LOW * per_image * batch_size),
            int(fixed + META_FACTOR_HIGH * per_image * batch_size))


def meta_models(step: StepEstimate, *, in_use: int, param_bytes: int) -> tuple[MemoryModel, MemoryModel]:
    """Train / eval memory lines from the meta estimate, at the top of the band (so a batch it
    suggests fits): the process as it is, the weights unless built, the gradients, layer outputs."""
    per_image = META_FACTOR_HIGH * step.activation_bytes / step.batch
    held = in_use + (0 if step.built else param_bytes)
    train_m = MemoryModel(fixed_bytes=held + param_bytes, per_image_bytes=per_image)
    # Evaluation keeps no layer outputs for backward: a fraction of training's (measured 1/8-1/4).
    eval_m = MemoryModel(fixed_bytes=held, per_image_bytes=per_image / 4)
    return train_m, eval_m


def time_estimate(per_stage, *, batch_size: int, steps_per_epoch: int, test_images: int,
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
