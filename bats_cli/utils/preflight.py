"""Memory estimates made before anything is allocated: absurd sizes are refused up front.

``estimate_network_bytes`` builds a network on torch's ``meta`` device (shapes only, no memory)
and, given an input shape, runs a meta forward pass to size the activations. ``check_estimate_fits``
compares an estimate with what the device has. ``bats_cli.models.networks.build_network`` and the
search supernet call it first, so ``--channels 60000`` (or a checkpoint that claims such a
network, or a genotype with huge cells) is one error line instead of an out-of-memory kill.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from bats_cli.core.errors import UserInputError
from bats_cli.utils.memory import format_bytes, memory_limit_bytes

# Sizes far beyond any BATS/DARTS network (20 cells, C <= 256, 4-5 nodes); checked before even
# the meta-device build, whose Python objects alone would exhaust memory for a million cells.
MAX_CHANNELS = 16384
MAX_LAYERS = 1000
MAX_NODES = 64

# Bytes per parameter while training with Adam in fp32: weight, gradient, two moment buffers.
TRAIN_BYTES_PER_PARAM = 16
# Bytes per parameter when only evaluating (or counting): the fp32 weight.
EVAL_BYTES_PER_PARAM = 4

_state = threading.local()


@dataclass(frozen=True)
class MemoryEstimate:
    """Parameters and bytes of a network; ``activation_bytes`` is 0 without an input shape."""

    params: int
    param_bytes: int
    activation_bytes: int
    batch_size: int

    @property
    def total_bytes(self) -> int:
        return self.param_bytes + self.activation_bytes


def check_sizes(*, channels: int | None = None, layers: int | None = None,
                nodes: int | None = None, what: str = "the network") -> None:
    """UserInputError for sizes no network here can have (before anything is built)."""
    for value, limit, flag in ((channels, MAX_CHANNELS, "--channels"), (layers, MAX_LAYERS, "--layers"),
                               (nodes, MAX_NODES, "--nodes")):
        if value is not None and value > limit:
            raise UserInputError(
                f"{what}: {flag.lstrip('-')} {value:,} is absurd (at most {limit:,}); use fewer {flag}"
            )


def estimating() -> bool:
    """True inside :func:`estimate_network_bytes` (builders skip their own check then)."""
    return bool(getattr(_state, "active", False))


@contextlib.contextmanager
def _estimating():
    previous = estimating()
    _state.active = True
    try:
        yield
    finally:
        _state.active = previous


def estimate_network_bytes(
    build: Callable[[], nn.Module],
    *,
    input_shape: tuple[int, ...] | None = None,
    batch_size: int = 1,
    training: bool = True,
) -> MemoryEstimate:
    """Memory ``build()`` would need, from a meta-device build (nothing is allocated).

    Parameters count ``TRAIN_BYTES_PER_PARAM`` each when ``training`` (weights, gradients,
    Adam's two buffers), else 4. With ``input_shape`` (C, H, W) a meta forward pass sums the
    outputs of every leaf module for ``batch_size`` images: what backward keeps, roughly.
    """
    with _estimating(), torch.device("meta"):
        model = build()
    params = sum(p.numel() for p in model.parameters())
    param_bytes = params * (TRAIN_BYTES_PER_PARAM if training else EVAL_BYTES_PER_PARAM)
    activation_bytes = 0
    if input_shape is not None:
        activation_bytes = _activation_bytes(model, input_shape, batch_size)
    return MemoryEstimate(params, param_bytes, activation_bytes, batch_size)


def _activation_bytes(model: nn.Module, input_shape: tuple[int, ...], batch_size: int) -> int:
    total = 0

    def count(_module, _inputs, output) -> None:
        nonlocal total
        for t in output if isinstance(output, (tuple, list)) else (output,):
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()

    hooks = [m.register_forward_hook(count) for m in model.modules() if not list(m.children())]
    try:
        with torch.no_grad():
            model(torch.empty((batch_size, *input_shape), device="meta"))
    except Exception:
        return 0  # a module without meta support: parameters alone still bound the estimate
    finally:
        for h in hooks:
            h.remove()
    return total


def check_estimate_fits(
    estimate: MemoryEstimate,
    *,
    what: str,
    advice: str,
    device: torch.device | str = "cpu",
) -> None:
    """UserInputError when ``estimate`` exceeds the device's memory (unknown memory: no check)."""
    limit = memory_limit_bytes(device)
    if limit is None or estimate.total_bytes <= limit:
        return
    parts = f"{estimate.params:,} parameters: {format_bytes(estimate.param_bytes)}"
    if estimate.activation_bytes:
        parts += f", activations for batch {estimate.batch_size}: {format_bytes(estimate.activation_bytes)}"
    raise UserInputError(
        f"{what} needs about {format_bytes(estimate.total_bytes)} ({parts}) but {torch.device(device).type} "
        f"memory is {format_bytes(limit)}; {advice}"
    )


def check_supernet_fits(build: Callable[[], nn.Module], device: torch.device | str = "cpu", *,
                        channels: int | None = None, layers: int | None = None,
                        nodes: int | None = None) -> None:
    """The search supernet's parameters (trained with Adam) must fit the device."""
    check_sizes(channels=channels, layers=layers, nodes=nodes, what="the search supernet")
    try:
        estimate = estimate_network_bytes(build, training=True)
    except ImportError:
        return  # the builder reports a missing optional part itself
    check_estimate_fits(estimate, what="the search supernet", device=device,
               advice="use fewer --channels, --layers or --nodes")
