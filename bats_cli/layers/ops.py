"""The one registry of cell operations, keyed by name, shared by the supernet and the networks.

``build_op(name, C, stride, ctx)`` builds the op named ``name`` mapping ``C`` channels to ``C``
channels with the given stride; unknown names raise :class:`~bats_cli.core.errors.UserInputError`.
How convs are built (binary or real, affine BatchNorm or not, groups, activation) comes from the
:class:`OpContext`, so the same registry serves search (``affine=False``) and evaluation.

Two layer arrangements exist:

* ``bn_sign_conv`` — the paper's binary layer (§3): BatchNorm -> sign -> conv × α -> activation
  (with both quantizers off: BatchNorm -> conv -> activation, Appendix B's real BATS space);
* ``relu_conv_bn`` — the DARTS code's float layer: ReLU -> conv -> BatchNorm. Used for
  ``darts``-space genotypes with ``real`` so their size matches the published numbers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from bats_cli.core.errors import UserInputError
from bats_cli.layers.quant import REAL, BinaryConvBlock, BinarySpec, QuantConv2d, make_activation

GROUP_POLICIES = ("channels", "groups")
# Identity connection of a stride-2 conv op: 2x2 average pool, factorized reduce, or none (f(x) only).
SHORTCUTS = ("avgpool", "factorized", "none")


@dataclass(frozen=True)
class OpContext:
    """Everything an op builder needs besides name, channels and stride."""

    spec: BinarySpec = field(default_factory=BinarySpec)
    # DARTS search uses BatchNorm without affine parameters; evaluation networks use affine.
    affine: bool = True
    activation: str = "prelu"
    # §4.1: 3 channels per group on CIFAR (36 ch = 12 groups), 5 on ImageNet (80 ch = 16 groups).
    channels_per_group: int = 3
    # The paper does not say whether groups stay fixed when channels double after a reduction.
    # "groups" (default): the number of groups stays at its first-stage value (12 on CIFAR, 16 on
    # ImageNet) and channels per group double; it reproduces Table 6's 1.149e9 BOPs for the
    # ImageNet network (we count 1.150e9; "channels" gives 0.897e9). "channels": channels per
    # group stay fixed and the number of groups doubles with the channels.
    group_policy: str = "groups"
    base_channels: int | None = None
    # Identity connection of a stride-2 conv op (f(x) + x needs x downsampled); not in the paper.
    reduce_shortcut: str = "avgpool"
    # §4.1: a channel shuffle after each grouped conv was tried and gave no gain; 0 = off (the
    # default), G = shuffle the conv op's output channels in G groups (the first author's code: 4).
    channel_shuffle: int = 0
    # "darts" with spec.real builds the DARTS code's exact float layers (ReLU -> conv -> BN).
    space: str = "bats"

    def __post_init__(self) -> None:
        if self.group_policy not in GROUP_POLICIES:
            raise UserInputError(
                f"group policy must be one of {', '.join(GROUP_POLICIES)}, got {self.group_policy!r}"
            )
        if self.reduce_shortcut not in SHORTCUTS:
            raise UserInputError(
                f"reduce shortcut must be one of {', '.join(SHORTCUTS)}, got {self.reduce_shortcut!r}"
            )
        if self.channels_per_group < 1:
            raise UserInputError("channels per group must be at least 1")
        if self.channel_shuffle < 0 or self.channel_shuffle == 1:
            raise UserInputError(
                f"channel shuffle takes 0 (off) or at least 2 groups, got {self.channel_shuffle}"
            )

    @property
    def darts_float(self) -> bool:
        return self.spec.real and self.space == "darts"

    def groups_for(self, channels: int) -> int:
        """Number of groups of a grouped conv over ``channels`` channels."""
        if self.group_policy == "groups" and self.base_channels:
            groups = max(1, self.base_channels // self.channels_per_group)
        else:
            groups = max(1, channels // self.channels_per_group)
        if channels % groups:
            raise UserInputError(
                f"{channels} channels cannot be split into {groups} groups; choose a width that is "
                f"a multiple of {self.channels_per_group} channels per group"
            )
        return groups

    def conv_unit(self, c_in: int, c_out: int, kernel_size: int | tuple[int, int], **geometry: Any) -> nn.Module:
        """One conv in this context's arrangement (binary block or DARTS ReLU-conv-BN).

        ``geometry``: the conv's ``stride``, ``padding``, ``dilation`` and ``groups``.
        """
        if self.darts_float:
            return ReLUConvBN(c_in, c_out, kernel_size, affine=self.affine, **geometry)
        return BinaryConvBlock(c_in, c_out, kernel_size, spec=self.spec, affine=self.affine,
                               activation=self.activation, **geometry)

    def preprocess(self, c_in: int, c_out: int) -> nn.Module:
        """The 1×1 conv that adapts a cell input (binary except in the DARTS float network)."""
        return self.conv_unit(c_in, c_out, 1)

    def factorized_reduce(self, c_in: int, c_out: int) -> nn.Module:
        return FactorizedReduce(c_in, c_out, ctx=self)


class ReLUConvBN(nn.Sequential):
    """The DARTS code's float conv: ReLU -> conv -> BatchNorm."""

    def __init__(self, c_in, c_out, kernel_size, *, affine=True, **geometry):
        super().__init__(
            nn.ReLU(inplace=False),
            nn.Conv2d(c_in, c_out, kernel_size, bias=False, **geometry),
            nn.BatchNorm2d(c_out, affine=affine),
        )


class Zero(nn.Module):
    """The 'none' op: an edge that carries nothing."""

    def __init__(self, stride: int) -> None:
        super().__init__()
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == 1:
            return x.mul(0.0)
        return x[:, :, :: self.stride, :: self.stride].mul(0.0)


class FactorizedReduce(nn.Module):
    """Halve resolution with two stride-2 1×1 convs on offset grids, concatenated (DARTS).

    Binary: BatchNorm -> sign -> two binary 1×1 convs -> concat -> activation. DARTS float:
    ReLU -> two convs -> concat -> BatchNorm.
    """

    def __init__(self, c_in: int, c_out: int, *, ctx: OpContext) -> None:
        super().__init__()
        if c_out % 2:
            raise UserInputError(f"factorized reduce needs an even channel count, got {c_out}")
        self.darts_float = ctx.darts_float
        spec = REAL if ctx.darts_float else ctx.spec
        self.pre = nn.ReLU(inplace=False) if ctx.darts_float else nn.BatchNorm2d(c_in, affine=ctx.affine)
        self.conv_1 = QuantConv2d(c_in, c_out // 2, 1, stride=2, input_quantizer=spec.input_quantizer,
                                  kernel_quantizer=spec.kernel_quantizer)
        self.conv_2 = QuantConv2d(c_in, c_out // 2, 1, stride=2, input_quantizer=spec.input_quantizer,
                                  kernel_quantizer=spec.kernel_quantizer)
        self.post = (nn.BatchNorm2d(c_out, affine=ctx.affine) if ctx.darts_float
                     else make_activation(ctx.activation, c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pre(x)
        # Odd sizes: pad so both grids give ceil(H/2) like a padded stride-2 conv.
        shifted = x[:, :, 1:, 1:]
        if x.shape[-1] % 2 or x.shape[-2] % 2:
            shifted = nn.functional.pad(shifted, (0, x.shape[-1] % 2, 0, x.shape[-2] % 2))
        return self.post(torch.cat([self.conv_1(x), self.conv_2(shifted)], dim=1))


class ChannelShuffle(nn.Module):
    """ShuffleNet's channel shuffle: (G, C/G) channel blocks transposed, so groups mix."""

    def __init__(self, channels: int, groups: int) -> None:
        super().__init__()
        if channels % groups:
            raise UserInputError(
                f"channel shuffle: {channels} channels cannot be split into {groups} groups"
            )
        self.groups = groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        return x.reshape(b, self.groups, c // self.groups, h, w).transpose(1, 2).reshape(b, c, h, w)

    def extra_repr(self) -> str:
        return f"groups={self.groups}"


class GroupConvOp(nn.Module):
    """§4.1: one binary grouped conv with an identity connection, f(x) + x.

    Options (both off by default): a channel shuffle after the conv; no identity connection on
    stride-2 ops (``reduce_shortcut="none"``: f(x) only).
    """

    def __init__(self, C: int, kernel_size: int, stride: int, dilation: int, ctx: OpContext) -> None:
        super().__init__()
        padding = dilation * (kernel_size // 2)
        self.conv = ctx.conv_unit(C, C, kernel_size, stride=stride, padding=padding,
                                  dilation=dilation, groups=ctx.groups_for(C))
        self.shuffle = ChannelShuffle(C, ctx.channel_shuffle) if ctx.channel_shuffle else nn.Identity()
        self.shortcut = _shortcut(C, stride, ctx)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.shuffle(self.conv(x))
        return y if self.shortcut is None else y + self.shortcut(x)


def _shortcut(C: int, stride: int, ctx: OpContext) -> nn.Module | None:
    if stride == 1:
        return nn.Identity()
    if ctx.reduce_shortcut == "none":
        return None
    if ctx.reduce_shortcut == "factorized":
        return ctx.factorized_reduce(C, C)
    # Parameter-free and ceil(H/2) like the padded stride-2 conv beside it.
    return nn.AvgPool2d(2, stride=2, ceil_mode=True, count_include_pad=False)


class DartsDilConv(nn.Sequential):
    """DARTS dil conv: depthwise (dilated) then pointwise.

    Float: ReLU -> dw -> pw -> BN (the DARTS code). Binary: two binary blocks (Table 5).
    """

    def __init__(self, c_in, c_out, kernel_size, stride, padding, dilation, ctx: OpContext):
        if ctx.darts_float:
            super().__init__(
                nn.ReLU(inplace=False),
                nn.Conv2d(c_in, c_in, kernel_size, stride=stride, padding=padding,
                          dilation=dilation, groups=c_in, bias=False),
                nn.Conv2d(c_in, c_out, 1, bias=False),
                nn.BatchNorm2d(c_out, affine=ctx.affine),
            )
        else:
            super().__init__(
                ctx.conv_unit(c_in, c_in, kernel_size, stride=stride, padding=padding,
                              dilation=dilation, groups=c_in),
                ctx.conv_unit(c_in, c_out, 1),
            )


class DartsSepConv(nn.Sequential):
    """DARTS sep conv: two stacked depthwise + pointwise pairs (4 convs)."""

    def __init__(self, c_in, c_out, kernel_size, stride, padding, ctx: OpContext):
        super().__init__(
            DartsDilConv(c_in, c_in, kernel_size, stride, padding, 1, ctx),
            DartsDilConv(c_in, c_out, kernel_size, 1, padding, 1, ctx),
        )


class Conv7x1_1x7(nn.Sequential):
    """NASNet / AmoebaNet factorized 7×7: a 1×7 then a 7×1 conv."""

    def __init__(self, C: int, stride: int, ctx: OpContext):
        if ctx.darts_float:
            super().__init__(
                nn.ReLU(inplace=False),
                nn.Conv2d(C, C, (1, 7), stride=(1, stride), padding=(0, 3), bias=False),
                nn.Conv2d(C, C, (7, 1), stride=(stride, 1), padding=(3, 0), bias=False),
                nn.BatchNorm2d(C, affine=ctx.affine),
            )
        else:
            super().__init__(
                ctx.conv_unit(C, C, (1, 7), stride=(1, stride), padding=(0, 3)),
                ctx.conv_unit(C, C, (7, 1), stride=(stride, 1), padding=(3, 0)),
            )


OpBuilder = Callable[[int, int, OpContext], nn.Module]
OPS: dict[str, OpBuilder] = {}


def register_op(name: str) -> Callable[[OpBuilder], OpBuilder]:
    def decorate(builder: OpBuilder) -> OpBuilder:
        if name in OPS:
            raise ValueError(f"op {name!r} registered twice")
        OPS[name] = builder
        return builder

    return decorate


def build_op(name: str, C: int, stride: int, ctx: OpContext) -> nn.Module:
    """Build the op ``name`` (C -> C channels, ``stride``) in context ``ctx``."""
    try:
        builder = OPS[name]
    except KeyError:
        raise UserInputError(f"unknown op {name!r}; known ops: {', '.join(sorted(OPS))}") from None
    return builder(C, stride, ctx)


def _skip(C: int, stride: int, ctx: OpContext) -> nn.Module:
    return nn.Identity() if stride == 1 else ctx.factorized_reduce(C, C)


register_op("none")(lambda C, stride, ctx: Zero(stride))
register_op("skip_connect")(_skip)
register_op("max_pool_3x3")(lambda C, stride, ctx: nn.MaxPool2d(3, stride=stride, padding=1))
register_op("avg_pool_3x3")(
    lambda C, stride, ctx: nn.AvgPool2d(3, stride=stride, padding=1, count_include_pad=False)
)
# BATS space (§4.1, Table 1); dilated variants use dilation 2.
register_op("group_conv_3x3")(lambda C, stride, ctx: GroupConvOp(C, 3, stride, 1, ctx))
register_op("group_conv_5x5")(lambda C, stride, ctx: GroupConvOp(C, 5, stride, 1, ctx))
register_op("dil_group_conv_3x3")(lambda C, stride, ctx: GroupConvOp(C, 3, stride, 2, ctx))
register_op("dil_group_conv_5x5")(lambda C, stride, ctx: GroupConvOp(C, 5, stride, 2, ctx))
# DARTS space (Liu et al., 2019) and the extra ops of NASNet-A / AmoebaNet-A.
register_op("sep_conv_3x3")(lambda C, stride, ctx: DartsSepConv(C, C, 3, stride, 1, ctx))
register_op("sep_conv_5x5")(lambda C, stride, ctx: DartsSepConv(C, C, 5, stride, 2, ctx))
register_op("sep_conv_7x7")(lambda C, stride, ctx: DartsSepConv(C, C, 7, stride, 3, ctx))
register_op("dil_conv_3x3")(lambda C, stride, ctx: DartsDilConv(C, C, 3, stride, 2, 2, ctx))
register_op("dil_conv_5x5")(lambda C, stride, ctx: DartsDilConv(C, C, 5, stride, 4, 2, ctx))
register_op("conv_7x1_1x7")(lambda C, stride, ctx: Conv7x1_1x7(C, stride, ctx))
