"""Table 5's hand-designed baseline: ResNet-18, binarized as §3 binarizes the cells.

The ResNet-18 of He et al. (4 stages of 2 BasicBlocks, widths C, 2C, 4C, 8C with C = 64) whose
block convolutions are the paper's binary layer (§3, XNOR-Net++): BatchNorm -> sign -> conv ×
learned per-channel scale α -> activation, built by :class:`~bats_cli.layers.quant.BinaryConvBlock`
exactly like the cells' convs. So the two-step strategy applies unchanged: step 1 (``bats
train``) has binary activations and real weights, ``bats binarize`` makes the weights binary;
``binarize``, the packer, ``bats flops`` and the bitwise engine find these convs like any other.

Real-valued, as in the cells' networks and in most binary ResNets: the stem (CIFAR: 3×3 stride-1
conv, no max-pool; ImageNet: 7×7 stride-2 conv and a 3×3 max-pool), the classifier, and the
downsampling shortcuts. A shortcut that changes resolution and width is a real 1×1 stride-2 conv
+ BatchNorm (the standard ResNet-18's, kept real as Bi-Real Net keeps its downsampling real):
three convs, counted as FLOPs. Identity shortcuts add the block's input to its output.

Parameters at C = 64 with 10 classes: the standard ResNet-18's 11,173,962 conv / linear /
BatchNorm parameters, less 896 because the binary layer's BatchNorm normalises a conv's *input*
(the first conv of stages 2-4 takes C_in = C/2 channels), plus what the binarization adds: one α
per output channel of the 16 binary convs (3,840) and the PReLU slopes after them (3,840) —
11,180,746 in all (the paper's "11.2 M").
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from bats_cli.core.archs import RESNET18
from bats_cli.core.errors import UserInputError
from bats_cli.layers.quant import BinaryConvBlock, BinarySpec
from bats_cli.models.networks import check_width_or_channels, checked_build, model_spec, width_multiplier

BASE_WIDTH = 64
BLOCKS_PER_STAGE = (2, 2, 2, 2)
KINDS = ("cifar", "imagenet")


@dataclass(frozen=True)
class ResNetConfig:
    """How to build the binary ResNet-18; defaults are the CIFAR form at the standard width."""

    kind: str = "cifar"
    num_classes: int = 10
    in_channels: int = 3
    channels: int = BASE_WIDTH  # width of the first stage; stages double it
    activation: str = "prelu"


class BasicBlock(nn.Module):
    """Two binary 3×3 layers and a shortcut: ``conv2(conv1(x)) + shortcut(x)``.

    No activation after the sum: the next layer's BatchNorm and sign follow it (§3's order).
    """

    def __init__(self, c_in: int, c_out: int, *, stride: int, spec: BinarySpec, activation: str) -> None:
        super().__init__()
        self.conv1 = BinaryConvBlock(c_in, c_out, 3, stride=stride, padding=1, spec=spec,
                                     activation=activation)
        self.conv2 = BinaryConvBlock(c_out, c_out, 3, padding=1, spec=spec, activation=activation)
        self.downsample: nn.Module | None = None
        if stride != 1 or c_in != c_out:
            # Real 1x1 conv + BatchNorm: a binary one would squeeze the whole residual stream
            # through 1 bit at every resolution change.
            self.downsample = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        return self.conv2(self.conv1(x)) + shortcut


class BinaryResNet(nn.Module):
    """ResNet-18 with binary block convs; real stem, downsampling shortcuts and classifier."""

    arch = RESNET18

    def __init__(self, *, config: ResNetConfig, spec: BinarySpec) -> None:
        super().__init__()
        if config.kind not in KINDS:
            raise UserInputError(f"network kind must be 'cifar' or 'imagenet', got {config.kind!r}")
        self.config = config
        self.spec = spec
        C = config.channels
        if config.kind == "cifar":
            self.stem = nn.Sequential(
                nn.Conv2d(config.in_channels, C, 3, padding=1, bias=False),
                nn.BatchNorm2d(C),
                nn.ReLU(inplace=True),
            )
        else:
            self.stem = nn.Sequential(
                nn.Conv2d(config.in_channels, C, 7, stride=2, padding=3, bias=False),
                nn.BatchNorm2d(C),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(3, stride=2, padding=1),
            )
        c_in = C
        stages = []
        for i, blocks in enumerate(BLOCKS_PER_STAGE):
            c_out = C * 2**i
            stage = [BasicBlock(c_in, c_out, stride=1 if i == 0 else 2, spec=spec,
                                activation=config.activation)]
            stage += [BasicBlock(c_out, c_out, stride=1, spec=spec, activation=config.activation)
                      for _ in range(blocks - 1)]
            stages.append(nn.Sequential(*stage))
            c_in = c_out
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.global_pooling = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(c_in, config.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = stage(x)
        return self.classifier(self.global_pooling(x).flatten(1))

    @staticmethod
    def op_label(name: str) -> str:
        """The kind of layer a conv / linear named ``name`` is (``bats flops --verbose``)."""
        parts = name.split(".")
        if parts[0] == "stem":
            return "stem"
        if parts[0] == "classifier":
            return "classifier"
        if "downsample" in parts:
            return "downsample 1x1 (real)"
        if parts[0].startswith("layer"):
            return "binary conv 3x3"
        return parts[0]


def resnet_channels(width: str = "1x", channels: int | None = None) -> int:
    """Base width: ``channels`` as given, else 64 × the multiplier of the cells' width preset
    (``networks.WIDTHS``: medium 1.5, large 7/3, and 2x = 1.5 as Table 6's "2x-wider")."""
    check_width_or_channels(width, channels)
    return channels if channels is not None else max(1, round(BASE_WIDTH * width_multiplier(width)))


def build_resnet(
    *,
    kind: str = "cifar",
    num_classes: int = 10,
    in_channels: int = 3,
    width: str = "1x",
    channels: int | None = None,
    real: bool = False,
    spec: BinarySpec | None = None,
    activation: str = "prelu",
) -> BinaryResNet:
    """The binary ResNet-18 (``spec``: default binary activations, real weights = step 1)."""
    spec = model_spec(real, spec)
    config = ResNetConfig(kind=kind, num_classes=num_classes, in_channels=in_channels,
                          channels=resnet_channels(width, channels), activation=activation)
    return checked_build(lambda: BinaryResNet(config=config, spec=spec),
                         what=f"the ResNet-18 (base width {config.channels})",
                         advice="use fewer --channels or a smaller --width", channels=config.channels)


__all__ = ["BASE_WIDTH", "BLOCKS_PER_STAGE", "BasicBlock", "BinaryResNet", "ResNetConfig",
           "build_resnet", "resnet_channels"]
