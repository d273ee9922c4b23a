"""Evaluation networks built from a genotype (§6.2 CIFAR, §6.3 ImageNet).

CIFAR: a 3×3 stem conv to 3C channels, ``layers`` cells (20 by default, C = 36) with reduction
cells at 1/3 and 2/3 depth, an auxiliary head at 2/3 depth (weight 0.4 in training), global
pooling and a linear classifier. ImageNet: the DARTS ImageNet stem (two stride-2 3×3 convs, then a
third) with its second conv grouped (g = 4, §6.3), 14 cells, C = 80.

Stem, classifier and auxiliary head stay real-valued; every other conv (cell ops, 1×1
preprocessing, factorized reduce) is binary unless ``real`` is set.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from bats_cli.core.errors import UserInputError
from bats_cli.layers.ops import OpContext, build_op
from bats_cli.layers.quant import REAL, BinarySpec

# Channel multipliers of the width presets. §6.2: width and number of groups scale together, so
# channels per group stay fixed (3 on CIFAR, 5 on ImageNet); the stem scales with C too.
# * "2x" is Table 6's "BATS [2x-wider]", and it is 1.5x the channels (ImageNet C = 120, 24
#   groups), not 2x: that reproduces its 2.157e9 BOPs to 0.01 % (we count 2.1573e9; 2x channels
#   give 3.45e9). Table 6's 1.210e8 FLOPs is not reproduced (we count 1.747e8); see
#   docs/flops.md for the hypotheses tried.
# * "medium" / "large" are Table 5's CIFAR networks (5.4 M and 10.0 M parameters against 2.8 M
#   for 1x); the paper gives only their sizes. With channels a multiple of 6 (an even number of
#   3-channel groups), 1.5x (C = 54) gives the closest ratio to 5.4 / 2.8 = 1.93 (1.79; C = 60
#   gives 2.10) and 7/3 (C = 84) the closest to 10.0 / 2.8 = 3.57 (3.54). On ImageNet C must
#   also suit the 4-group stem (a multiple of 40): medium and 2x give 120, large 200.
WIDTHS: dict[str, float] = {"1x": 1.0, "medium": 1.5, "large": 7 / 3, "2x": 1.5}


@dataclass(frozen=True)
class NetworkConfig:
    """How to build an evaluation network; defaults are the paper's CIFAR numbers."""

    kind: str = "cifar"  # "cifar" or "imagenet"
    num_classes: int = 10
    in_channels: int = 3
    channels: int = 36
    layers: int = 20
    auxiliary: bool = True
    drop_path: float = 0.0  # §6.2: drop-path 0 for binary networks
    stem_groups: int = 4  # §6.3: grouped second stem conv on ImageNet


def _genotype_cell(genotype, reduction: bool):
    ops = genotype.reduce if reduction else genotype.normal
    concat = genotype.reduce_concat if reduction else genotype.normal_concat
    return [(op, int(idx)) for op, idx in ops], [int(i) for i in concat]


def drop_path(x: torch.Tensor, drop_prob: float) -> torch.Tensor:
    keep = 1.0 - drop_prob
    mask = torch.empty(x.size(0), 1, 1, 1, device=x.device, dtype=x.dtype).bernoulli_(keep)
    return x.div(keep) * mask


class Cell(nn.Module):
    """A DARTS cell from a genotype: two preprocessed inputs, N nodes, concatenated output."""

    def __init__(
        self,
        genotype,
        *,
        c_prev_prev: int,
        c_prev: int,
        C: int,
        reduction: bool,
        reduction_prev: bool,
        ctx: OpContext,
    ) -> None:
        super().__init__()
        self.reduction = reduction
        self.preprocess0 = (
            ctx.factorized_reduce(c_prev_prev, C) if reduction_prev else ctx.preprocess(c_prev_prev, C)
        )
        self.preprocess1 = ctx.preprocess(c_prev, C)
        edges, self.concat = _genotype_cell(genotype, reduction)
        self.steps = len(edges) // 2
        self.multiplier = len(self.concat)
        self.indices = [idx for _, idx in edges]
        self.op_names = [op for op, _ in edges]
        self.ops = nn.ModuleList(
            build_op(op, C, 2 if reduction and idx < 2 else 1, ctx) for op, idx in edges
        )

    def forward(self, s0: torch.Tensor, s1: torch.Tensor, drop_prob: float = 0.0) -> torch.Tensor:
        states = [self.preprocess0(s0), self.preprocess1(s1)]
        for step in range(self.steps):
            total = 0
            for k in (2 * step, 2 * step + 1):
                h = self.ops[k](states[self.indices[k]])
                if self.training and drop_prob > 0 and not isinstance(self.ops[k], nn.Identity):
                    h = drop_path(h, drop_prob)
                total = total + h
            states.append(total)
        return torch.cat([states[i] for i in self.concat], dim=1)


class TowerPool(nn.Module):
    """The auxiliary towers' 5×5 average pool, valid for maps smaller than the DARTS ones.

    The towers assume 8×8 (CIFAR) and 7-14 px (ImageNet) maps, pooled to at least 2×2 for the
    2×2 conv that follows; smaller maps (other image sizes) are pooled adaptively to 2×2.
    """

    def __init__(self, kernel_size: int, *, stride: int) -> None:
        super().__init__()
        self.kernel_size = kernel_size
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if min(x.shape[-2:]) < self.kernel_size + self.stride:
            return nn.functional.adaptive_avg_pool2d(x, 2)
        return nn.functional.avg_pool2d(
            x, self.kernel_size, stride=self.stride, padding=0, count_include_pad=False
        )

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, stride={self.stride}"


class AuxiliaryHead(nn.Module):
    """DARTS auxiliary tower (real-valued): pool 5×5 with stride 3 on CIFAR's 8×8 maps, 2 on
    ImageNet's 14×14 maps, then 1×1 and 2×2 convs and a linear classifier."""

    def __init__(self, C: int, num_classes: int, *, pool_stride: int) -> None:
        super().__init__()
        self.features = nn.Sequential(
            # Not in place: the tower's input is the cell output the next cells still read.
            nn.ReLU(inplace=False),
            TowerPool(5, stride=pool_stride),
            nn.Conv2d(C, 128, 1, bias=False),
            nn.BatchNorm2d(128),
            nn.ReLU(inplace=True),
            nn.Conv2d(128, 768, 2, bias=False),
            nn.BatchNorm2d(768),
            nn.ReLU(inplace=True),
        )
        self.classifier = nn.Linear(768, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Adaptive pool keeps the head valid for inputs other than the DARTS sizes.
        x = nn.functional.adaptive_avg_pool2d(self.features(x), 1)
        return self.classifier(x.flatten(1))


class Network(nn.Module):
    """A stack of genotype cells with a real-valued stem, classifier and auxiliary head."""

    arch = "cells"  # its name in the model registry (bats_cli.models.registry)

    def __init__(self, genotype, *, config: NetworkConfig, ctx: OpContext) -> None:
        super().__init__()
        self.config = config
        self.genotype = genotype
        self.ctx = ctx
        C, layers = config.channels, config.layers
        if layers < 3:
            raise UserInputError(f"a network needs at least 3 cells, got --layers {layers}")
        if config.kind == "cifar":
            stem_multiplier = 3
            c_curr = stem_multiplier * C
            self.stem = nn.Sequential(
                nn.Conv2d(config.in_channels, c_curr, 3, padding=1, bias=False),
                nn.BatchNorm2d(c_curr),
            )
            c_prev_prev, c_prev, c_curr = c_curr, c_curr, C
            reduction_prev = False
        elif config.kind == "imagenet":
            self.stem = ImageNetStem(config.in_channels, C, config.stem_groups)
            c_prev_prev, c_prev, c_curr = C, C, C
            reduction_prev = True
        else:
            raise UserInputError(f"network kind must be 'cifar' or 'imagenet', got {config.kind!r}")

        self.cells = nn.ModuleList()
        self._aux_index = 2 * layers // 3
        c_aux = None
        for i in range(layers):
            reduction = i in (layers // 3, 2 * layers // 3)
            if reduction:
                c_curr *= 2
            cell = Cell(
                genotype, c_prev_prev=c_prev_prev, c_prev=c_prev, C=c_curr,
                reduction=reduction, reduction_prev=reduction_prev, ctx=ctx,
            )
            reduction_prev = reduction
            self.cells.append(cell)
            c_prev_prev, c_prev = c_prev, cell.multiplier * c_curr
            if i == self._aux_index:
                c_aux = c_prev
        self.auxiliary_head = None
        if config.auxiliary:
            self.auxiliary_head = AuxiliaryHead(
                c_aux, config.num_classes, pool_stride=3 if config.kind == "cifar" else 2
            )
        self.global_pooling = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(c_prev, config.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Logits; in training with an auxiliary head, ``(logits, aux_logits)``."""
        if isinstance(self.stem, ImageNetStem):
            s0, s1 = self.stem(x)
        else:
            s0 = s1 = self.stem(x)
        aux = None
        for i, cell in enumerate(self.cells):
            s0, s1 = s1, cell(s0, s1, self.config.drop_path)
            if i == self._aux_index and self.auxiliary_head is not None and self.training:
                aux = self.auxiliary_head(s1)
        logits = self.classifier(self.global_pooling(s1).flatten(1))
        if aux is not None:
            return logits, aux
        return logits


class ImageNetStem(nn.Module):
    """DARTS ImageNet stem (7×7 replaced by two 3×3), second conv grouped (§6.3)."""

    def __init__(self, in_channels: int, C: int, groups: int) -> None:
        super().__init__()
        if (C // 2) % groups or C % groups:
            raise UserInputError(f"stem groups {groups} must divide {C // 2} and {C} channels")
        self.stem0 = nn.Sequential(
            nn.Conv2d(in_channels, C // 2, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(C // 2),
            nn.ReLU(inplace=True),
            nn.Conv2d(C // 2, C, 3, stride=2, padding=1, groups=groups, bias=False),
            nn.BatchNorm2d(C),
        )
        self.stem1 = nn.Sequential(
            nn.ReLU(inplace=True),
            nn.Conv2d(C, C, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(C),
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s0 = self.stem0(x)
        return s0, self.stem1(s0)


# §6.2 / §6.3 defaults per network kind: channels, cells, channels per group.
PAPER_DEFAULTS = {
    "cifar": {"channels": 36, "layers": 20, "channels_per_group": 3},
    "imagenet": {"channels": 80, "layers": 14, "channels_per_group": 5},
}


def width_multiplier(width: str) -> float:
    """The channel multiplier of a width preset; an unknown name is one line."""
    try:
        return WIDTHS[width]
    except KeyError:
        raise UserInputError(f"unknown --width {width!r}; choose one of: {', '.join(WIDTHS)}") from None


def check_width_or_channels(width: str, channels: int | None) -> None:
    """A preset width and explicit channels both size the model: one of them, not both."""
    if channels is not None and width != "1x":
        raise UserInputError("give either --width or --channels, not both")


def scaled_width(channels: int, width: str, channels_per_group: int, *, multiple_of: int = 1) -> int:
    """Channels at a width preset, rounded to whole groups (width and groups scale together).

    ``multiple_of``: a further divisor C must have (the ImageNet stem's grouped conv needs C/2
    divisible by its groups).
    """
    mult = width_multiplier(width)
    # An even number of groups keeps factorized reduce (two halves) valid.
    unit = math.lcm(2 * channels_per_group, multiple_of)
    return max(unit, int(round(channels * mult / unit)) * unit)


def build_network(
    genotype,
    *,
    kind: str = "cifar",
    num_classes: int = 10,
    in_channels: int = 3,
    width: str = "1x",
    layers: int | None = None,
    channels: int | None = None,
    real: bool = False,
    spec: BinarySpec | None = None,
    auxiliary: bool = True,
    drop_path: float = 0.0,
    activation: str = "prelu",
    channels_per_group: int | None = None,
    group_policy: str = "groups",
    reduce_shortcut: str = "avgpool",
    channel_shuffle: int = 0,
    stem_groups: int | None = None,
) -> Network:
    """An evaluation network for ``genotype``; defaults follow the paper for ``kind``.

    ``spec`` says which tensors are binary (default: activations, the two-step strategy's step
    1); ``real=True`` builds the float network. ``channels`` overrides the width preset.
    """
    if kind not in PAPER_DEFAULTS:
        raise UserInputError(f"network kind must be 'cifar' or 'imagenet', got {kind!r}")
    defaults = PAPER_DEFAULTS[kind]
    cpg = channels_per_group or defaults["channels_per_group"]
    spec = model_spec(real, spec)
    space = getattr(genotype, "space", "bats")
    if spec.real and space == "darts" and activation != "prelu":
        # DARTS's float ops are ReLU -> conv -> BatchNorm: there is no activation to choose.
        raise UserInputError(f"--activation {activation}: the DARTS space's real-valued ops (ReLU -> conv -> "
                             "BatchNorm) have no activation after the conv; drop --activation")
    if stem_groups is None:
        # The DARTS float network keeps the DARTS stem; binary networks use §6.3's grouped stem.
        stem_groups = 1 if (spec.real and space == "darts") else 4
    check_width_or_channels(width, channels)
    if channels is None:
        stem_multiple = 2 * stem_groups if kind == "imagenet" else 1
        channels = scaled_width(defaults["channels"], width, cpg, multiple_of=stem_multiple)
    ctx = OpContext(
        spec=spec, affine=True, activation=activation, channels_per_group=cpg,
        group_policy=group_policy, base_channels=channels, reduce_shortcut=reduce_shortcut,
        channel_shuffle=channel_shuffle, space=space,
    )
    config = NetworkConfig(
        kind=kind, num_classes=num_classes, in_channels=in_channels, channels=channels,
        layers=layers or defaults["layers"], auxiliary=auxiliary, drop_path=drop_path,
        stem_groups=stem_groups,
    )
    return checked_build(
        lambda: Network(genotype, config=config, ctx=ctx),
        what=f"the network (C={channels}, {config.layers} cells)",
        advice="use fewer --channels or --layers, or a smaller --width",
        channels=channels, layers=config.layers, nodes=max(len(genotype.normal), len(genotype.reduce)) // 2,
    )


def model_spec(real: bool = False, spec: BinarySpec | None = None) -> BinarySpec:
    """Which tensors a model binarizes: ``real`` wins, else ``spec``, else step 1's (binary
    activations, real weights). Shared by every model builder."""
    if real:
        return REAL
    return spec if spec is not None else BinarySpec(activations=True, weights=False)


def checked_build(make: Callable[[], nn.Module], *, what: str, advice: str, **sizes: int) -> nn.Module:
    """``make()`` once the sizes pass the preflight checks: every model builder's last step."""
    from bats_cli.utils.preflight import check_estimate_fits, check_sizes, estimate_network_bytes, estimating

    if not estimating():
        check_sizes(**sizes)
        # Sized on the meta device first: an absurd size is one error line, not an OOM kill.
        check_estimate_fits(estimate_network_bytes(make, training=False), what=what, advice=advice)
    return make()
