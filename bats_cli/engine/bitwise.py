"""The bitwise inference engine: every binary conv of a model as XNOR + popcount.

:func:`to_bitwise` swaps each binary :class:`~bats_cli.quant.QuantConv2d` (binary weights and
binary activations: a packed artifact or a ``binarize`` checkpoint) for a :class:`BitwiseConv2d`
whose weights are packed to bits once, at conversion. At run time the conv's input is packed to
sign bits (``x >= 0`` -> 1, the same sign as training: 0 maps to +1) and the C++ kernel of
``bitwise.cpp`` computes the integer ``sign(x) ⊛ sign(W)`` with the padding correction, then
multiplies by the XNOR-Net++ scale α. Everything else (BatchNorm, PReLU, pools, the f(x) + x
adds, concatenations, the real stem and classifier) stays in PyTorch, in float.

Integer sums are exact in float32 too (|sum| < 2^24), so a converted model's outputs equal the
float-emulated binary model's (``tests/test_engine.py`` checks this per op and end to end).
"""

from __future__ import annotations

import torch
from torch import nn

from bats_cli.engine._build import EngineUnavailable, load_extension
from bats_cli.errors import UserInputError
from bats_cli.quant import QuantConv2d

ENGINES = ("float", "bitwise", "auto")


def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


class BitwiseConv2d(nn.Module):
    """A binary conv (sign(x) ⊛ sign(W) × α) run by the bitwise kernel; inference only."""

    def __init__(self, conv: QuantConv2d) -> None:
        super().__init__()
        if conv.input_quantizer is None or conv.kernel_quantizer is None:
            raise UserInputError(
                "the bitwise engine needs binary weights and binary activations (a packed "
                "artifact or a binarize checkpoint), not a step-1 model with real weights"
            )
        if isinstance(conv.padding, str) or conv.padding_mode != "zeros" or conv.bias is not None:
            raise UserInputError("the bitwise engine supports zero-padded convs without bias only")
        kh, kw = conv.kernel_size
        sh, sw = _pair(conv.stride)
        ph, pw = _pair(conv.padding)
        dh, dw = _pair(conv.dilation)
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.params = [conv.groups, kh, kw, sh, sw, ph, pw, dh, dw]
        # Run the model in the memory format the float path picks for it (runtime.memory_format),
        # so the float layers around the convs round exactly as they do there.
        self.grouped_conv = conv.groups > 1
        ext = load_extension()
        self.register_buffer("packed_weight",
                             ext.pack_weight(conv.weight.detach().cpu(), conv.in_channels, self.params))
        self.register_buffer("scale", conv.scale.detach().cpu().float().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu":
            raise UserInputError("the bitwise engine runs on the CPU; use --device cpu")
        return load_extension().binary_conv(x.float(), self.packed_weight, self.scale, self.params)

    def extra_repr(self) -> str:
        g, kh, kw, sh, sw, ph, pw, dh, dw = self.params
        return (f"{self.in_channels}, {self.out_channels}, kernel_size=({kh}, {kw}), "
                f"stride=({sh}, {sw}), padding=({ph}, {pw}), dilation=({dh}, {dw}), groups={g}")


def binary_conv_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, QuantConv2d) and m.is_binary]


@torch.no_grad()
def to_bitwise(model: nn.Module) -> nn.Module:
    """Replace every binary conv of ``model`` (in place) by a :class:`BitwiseConv2d`; eval mode.

    Returns the model (a :class:`BitwiseConv2d` when ``model`` is itself one binary conv).

    Raises :class:`EngineUnavailable` (one line) when the kernel cannot be compiled, and
    :class:`UserInputError` when the model has real weights or no binary conv at all.
    """
    names = binary_conv_names(model)
    if not names:
        raise UserInputError("the model has no binary convolutions; nothing for the bitwise engine")
    load_extension()
    if names == [""]:  # the model is a single binary conv
        return BitwiseConv2d(model).eval()
    for name in names:
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, leaf, BitwiseConv2d(getattr(parent, leaf)))
    return model.eval()


def apply_engine(model: nn.Module, engine: str, *, device: torch.device | str = "cpu",
                 warn=None) -> tuple[nn.Module, str]:
    """``(model, engine used)`` for ``--engine float|bitwise|auto``.

    ``bitwise`` is what the user asked for explicitly, so a missing compiler is an error (one
    line, exit 2) rather than a silent float run labelled bitwise; ``auto`` uses the bitwise
    engine where it can (CPU, binary weights, a compiler) and otherwise says why in one line
    through ``warn`` and keeps the float path.
    """
    if engine not in ENGINES:
        raise UserInputError(f"--engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    if engine == "float":
        return model, "float"
    try:
        if torch.device(device).type != "cpu":
            raise UserInputError("the bitwise engine runs on the CPU; use --device cpu")
        return to_bitwise(model), "bitwise"
    except UserInputError as exc:
        if engine == "bitwise":
            raise
        if warn is not None:
            warn(f"note: bitwise engine not used ({exc}); running the float path")
        return model, "float"


def engine_available() -> bool:
    try:
        load_extension()
    except EngineUnavailable:
        return False
    return True


__all__ = ["BitwiseConv2d", "ENGINES", "EngineUnavailable", "apply_engine", "binary_conv_names",
           "engine_available", "to_bitwise"]
