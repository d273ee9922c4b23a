"""Binarization as the paper uses it (§3): XNOR-Net++ with a learned output scale.

A binary convolution computes ``(sign(I) ⊛ sign(W)) ⊙ α`` where ``α`` is a learned
per-output-channel scale (XNOR-Net++ drops XNOR-Net's input scale β). Activations and weights are
quantized independently, because the search binarizes activations only (§4.3) and ``bats
binarize`` turns the weights binary afterwards.

Quantizers are named objects carrying their function and precision, in the style of larq
(``STE_SIGN``, the only one the paper needs); a :class:`QuantConv2d` with no quantizer *is* the
float ``nn.Conv2d`` (same parameters, same output, no ``α``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from bats_cli.core.errors import UserInputError


class _SignSTE(torch.autograd.Function):
    """sign with 0 -> +1 and a straight-through gradient clipped to |x| <= 1 (BNN, XNOR-Net)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        # torch.sign maps 0 to 0; binary tensors must be exactly ±1.
        return torch.where(x >= 0, 1.0, -1.0).to(x.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        return grad * (x.abs() <= 1).to(grad.dtype)


def sign_pm1(x: torch.Tensor) -> torch.Tensor:
    """sign with 0 -> +1 (binary tensors are exactly ±1), without a gradient rule."""
    out = torch.where(x >= 0, 1.0, -1.0)
    # Checked here rather than always cast, so a traced graph holds no no-op Cast.
    return out if out.dtype == x.dtype else out.to(x.dtype)


def ste_sign(x: torch.Tensor) -> torch.Tensor:
    """:func:`sign_pm1` with the straight-through gradient of :class:`_SignSTE`."""
    return _SignSTE.apply(x)


@dataclass(frozen=True)
class Quantizer:
    """A named quantizer of ``precision`` bits: ``ste`` in training (values of ``fn``, a
    straight-through gradient), ``fn`` where no gradient flows."""

    name: str
    precision: int
    fn: Callable[[torch.Tensor], torch.Tensor]
    ste: Callable[[torch.Tensor], torch.Tensor]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            return self.ste(x)
        # No gradient to shape: plain ops, so tracers and ONNX export see Where(x >= 0, 1, -1)
        # instead of an opaque autograd Function.
        return self.fn(x)


STE_SIGN = Quantizer(name="ste_sign", precision=1, fn=sign_pm1, ste=ste_sign)


@dataclass(frozen=True)
class BinarySpec:
    """Which tensors are binary. The paper's search and step 1 use activations only (§4.3)."""

    activations: bool = True
    weights: bool = False

    @property
    def real(self) -> bool:
        return not (self.activations or self.weights)

    @property
    def input_quantizer(self) -> Quantizer | None:
        return STE_SIGN if self.activations else None

    @property
    def kernel_quantizer(self) -> Quantizer | None:
        return STE_SIGN if self.weights else None

    @classmethod
    def parse(cls, *, weights: str, activations: str) -> "BinarySpec":
        for label, value in (("weights", weights), ("activations", activations)):
            if value not in ("real", "binary"):
                raise UserInputError(f"--{label} must be 'real' or 'binary', got {value!r}")
        return cls(activations=activations == "binary", weights=weights == "binary")


REAL = BinarySpec(activations=False, weights=False)


class QuantConv2d(nn.Conv2d):
    """``nn.Conv2d`` with optional input / kernel quantizers and a learned output scale.

    The scale (the paper's α of eq. 1, named ``scale`` here so it is never confused with the
    architecture weights α of eq. 2) exists only when some quantizer is set, so a layer with
    neither is exactly the float layer (same ``state_dict`` keys, same output). Bias is never used
    (a BatchNorm follows or precedes every conv in these networks).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        *,
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] = 0,
        dilation: int | tuple[int, int] = 1,
        groups: int = 1,
        input_quantizer: Quantizer | None = None,
        kernel_quantizer: Quantizer | None = None,
    ) -> None:
        super().__init__(
            in_channels,
            out_channels,
            kernel_size,
            stride=stride,
            padding=padding,
            dilation=dilation,
            groups=groups,
            bias=False,
        )
        self.input_quantizer = input_quantizer
        self.kernel_quantizer = kernel_quantizer
        if input_quantizer is not None or kernel_quantizer is not None:
            self.scale = nn.Parameter(self._initial_scale())
        else:
            self.register_parameter("scale", None)

    def _initial_scale(self) -> torch.Tensor:
        if self.kernel_quantizer is not None:
            # sign(W) * mean|W| keeps the output scale of the real initialisation.
            return self.weight.detach().abs().mean(dim=(1, 2, 3)).clone()
        return torch.ones(self.out_channels)

    @property
    def is_binary(self) -> bool:
        return self.input_quantizer is not None or self.kernel_quantizer is not None

    def quantized_weight(self) -> torch.Tensor:
        if self.kernel_quantizer is None:
            return self.weight
        return self.kernel_quantizer(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_quantizer is not None:
            x = self.input_quantizer(x)
        out = self._conv_forward(x, self.quantized_weight(), None)
        if self.scale is not None:
            out = out * self.scale.view(1, -1, 1, 1)
        return out

    @torch.no_grad()
    def binarize_weights_(self) -> None:
        """Step 2 of the two-step strategy: make the weights binary, folding mean|W| into α.

        After this the effective weight is ``sign(W) * α``, and the first forward pass stays close
        to the real-weight one. The latent real ``W`` is kept for fine-tuning with the STE.
        """
        if self.scale is None:
            raise UserInputError(
                "cannot binarize the weights of a real-valued layer; train with binary "
                "activations first (omit --real)"
            )
        if self.kernel_quantizer is not None:
            return
        self.scale.mul_(self.weight.abs().mean(dim=(1, 2, 3)))
        self.kernel_quantizer = STE_SIGN

    def extra_repr(self) -> str:
        names = []
        if self.input_quantizer is not None:
            names.append(f"input_quantizer={self.input_quantizer.name}")
        if self.kernel_quantizer is not None:
            names.append(f"kernel_quantizer={self.kernel_quantizer.name}")
        return ", ".join([super().extra_repr(), *names])


class RPReLU(nn.Module):
    """ReActNet's RPReLU (Liu et al., ECCV 2020): ``PReLU(x − γ) + ζ`` with learnable per-channel
    shifts γ, ζ (initialised to 0, so it starts as the PReLU) and slopes (0.25).

    ReActNet's other learnable threshold, RSign (a per-channel shift before sign), is left out on
    purpose: in every binary layer here a BatchNorm comes right before sign, and its bias already
    is a learnable per-channel shift of the sign's threshold (``sign(γ·x̂ + β)`` switches at
    ``x̂ = −β/γ``), so an RSign would add parameters that express nothing new (and the bitwise
    engine folds that BatchNorm into its thresholds, exactly as it would an RSign).
    Not an ``nn.PReLU`` subclass: code that handles a PReLU must not take it for one.
    """

    def __init__(self, channels: int, init: float = 0.25) -> None:
        super().__init__()
        self.shift_in = nn.Parameter(torch.zeros(channels))
        self.weight = nn.Parameter(torch.full((channels,), float(init)))
        self.shift_out = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return nn.functional.prelu(x - self.shift_in.view(shape), self.weight) + self.shift_out.view(shape)

    def extra_repr(self) -> str:
        return f"{self.weight.numel()}"


# The activation after a binary conv, by name (``--activation``).
ACTIVATIONS: dict[str, Callable[[int], nn.Module]] = {
    "prelu": lambda channels: nn.PReLU(channels, init=0.25),
    "rprelu": RPReLU,
    "relu": lambda channels: nn.ReLU(inplace=False),
    "none": lambda channels: nn.Identity(),
}


def make_activation(name: str, channels: int) -> nn.Module:
    """The activation after a binary conv (§3: BatchNorm, Sign, Conv, Activation).

    The paper names no activation; ``prelu`` (per channel) is the choice of the authors' other
    binary networks (XNOR-Net++ follow-ups, Real-to-Binary) and our default; ``rprelu`` is
    ReActNet's :class:`RPReLU` (not in the paper).
    """
    try:
        build = ACTIVATIONS[name]
    except KeyError:
        raise UserInputError(f"unknown activation {name!r}; choose one of: {', '.join(ACTIVATIONS)}") from None
    return build(channels)


class BinaryConvBlock(nn.Module):
    """BatchNorm -> sign -> conv (× α) -> activation: the paper's binary layer (§3).

    With ``spec.real`` the same block runs real-valued (BatchNorm -> conv -> activation), which
    is how Appendix B evaluates the BATS space in the real domain.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        *,
        spec: BinarySpec,
        affine: bool = True,
        activation: str = "prelu",
        **geometry: Any,
    ) -> None:
        """``geometry``: the conv's ``stride``, ``padding``, ``dilation`` and ``groups`` (:class:`QuantConv2d`)."""
        super().__init__()
        self.bn = nn.BatchNorm2d(in_channels, affine=affine)
        self.conv = QuantConv2d(in_channels, out_channels, kernel_size, input_quantizer=spec.input_quantizer,
                                kernel_quantizer=spec.kernel_quantizer, **geometry)
        self.act = make_activation(activation, out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv(self.bn(x)))


def quant_convs(module: nn.Module) -> list[tuple[str, QuantConv2d]]:
    """Every binary conv of a model, by name (the ones ``binarize`` and the packer touch)."""
    return [(n, m) for n, m in module.named_modules() if isinstance(m, QuantConv2d) and m.is_binary]


def binarize_weights_(model: nn.Module) -> int:
    """Make every binary conv of ``model`` use binary weights; returns how many convs changed."""
    convs = quant_convs(model)
    for _, conv in convs:
        conv.binarize_weights_()
    return len(convs)


def effective_weight(conv: QuantConv2d) -> torch.Tensor:
    """The weight a binary conv really applies, with α folded in (for checks and export)."""
    w = conv.quantized_weight()
    if conv.scale is not None:
        w = w * conv.scale.view(-1, 1, 1, 1)
    return w


__all__ = [
    "ACTIVATIONS",
    "BinaryConvBlock",
    "BinarySpec",
    "QuantConv2d",
    "Quantizer",
    "REAL",
    "RPReLU",
    "STE_SIGN",
    "binarize_weights_",
    "effective_weight",
    "make_activation",
    "quant_convs",
    "sign_pm1",
    "ste_sign",
]
