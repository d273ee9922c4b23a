"""The op registry (§4.1 and the DARTS space): every op, both strides, binary and real."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bats_cli.core.errors import UserInputError
from bats_cli.core.spaces import SPACES
from bats_cli.layers import ops
from bats_cli.layers.ops import OPS, OpContext, build_op
from bats_cli.layers.quant import REAL, BinarySpec, QuantConv2d
from bats_cli.models import networks

C = 12  # 4 groups of 3 channels, the CIFAR channels-per-group

MODES = {
    "binary": lambda space: OpContext(spec=BinarySpec(activations=True), space=space, base_channels=C),
    "binary_weights": lambda space: OpContext(
        spec=BinarySpec(activations=True, weights=True), space=space, base_channels=C
    ),
    "real": lambda space: OpContext(spec=REAL, space="bats", base_channels=C),
    # The DARTS code's exact float layers (ReLU -> conv -> BN), only for DARTS-space genotypes.
    "darts_exact": lambda space: OpContext(spec=REAL, space="darts", base_channels=C),
}

CASES = [
    pytest.param(space, op, stride, mode, id=f"{space}-{op}-s{stride}-{mode}")
    for space in ("bats", "darts")
    for op in SPACES[space].ops
    for stride in (1, 2)
    for mode in MODES
    if mode != "darts_exact" or space == "darts"
]


@pytest.mark.parametrize("space, op_name, stride, mode", CASES)
def test_every_op_forward_backward(space, op_name, stride, mode):
    torch.manual_seed(0)
    ctx = MODES[mode](space)
    op = build_op(op_name, C, stride, ctx).train()
    x = torch.randn(2, C, 8, 8, requires_grad=True)
    y = op(x)
    assert y.shape == (2, C, 8 // stride, 8 // stride)
    assert torch.isfinite(y).all()
    # A random projection: plain y.sum() has zero gradient through a trailing BatchNorm.
    (y * torch.randn_like(y)).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    params = list(op.named_parameters())
    for name, p in params:
        assert p.grad is not None, f"{name} got no gradient"
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, f"{name} got an all-zero gradient"
    if op_name in SPACES[space].parameter_free and not (op_name == "skip_connect" and stride == 2):
        assert params == []
    binary = [m for m in op.modules() if isinstance(m, QuantConv2d) and m.is_binary]
    if ctx.spec.real:
        assert binary == []
    elif params:
        assert binary, "a parametric op in binary mode must have binary convs"
        assert all((m.kernel_quantizer is not None) == ctx.spec.weights for m in binary)


def test_group_conv_groups_and_identity_connection():
    ctx = OpContext(spec=BinarySpec(), base_channels=36, channels_per_group=3)
    op = build_op("group_conv_5x5", 36, 1, ctx)
    assert op.conv.conv.groups == 12 and op.conv.conv.kernel_size == (5, 5)
    # f(x) + x: with the conv's output zeroed only the identity remains.
    with torch.no_grad():
        op.conv.conv.weight.zero_()
    x = torch.randn(2, 36, 6, 6)
    assert torch.allclose(op.eval()(x), x + op.conv.act(torch.zeros(2, 36, 6, 6)))
    dil = build_op("dil_group_conv_3x3", 36, 1, ctx)
    assert dil.conv.conv.dilation == (2, 2)
    # "groups" policy: the number of groups stays at its first-stage value when C doubles.
    assert build_op("group_conv_3x3", 72, 2, ctx).conv.conv.groups == 12
    per_channel = OpContext(spec=BinarySpec(), base_channels=36, group_policy="channels")
    assert build_op("group_conv_3x3", 72, 2, per_channel).conv.conv.groups == 24


def test_darts_exact_sep_conv_is_the_darts_code_layer():
    op = build_op("sep_conv_3x3", C, 1, OpContext(spec=REAL, space="darts"))
    kinds = [type(m).__name__ for m in op.modules() if not isinstance(m, nn.Sequential)]
    assert kinds == ["ReLU", "Conv2d", "Conv2d", "BatchNorm2d"] * 2
    # DARTS sep_conv_3x3 at C=16: 2 x (9C + C^2 + 2C) parameters.
    assert sum(p.numel() for p in op.parameters()) == 2 * (9 * C + C * C + 2 * C)


def test_unknown_op_is_a_user_input_error():
    with pytest.raises(UserInputError, match="unknown op 'conv_9x9'"):
        build_op("conv_9x9", C, 1, OpContext())


def test_bad_context_is_a_user_input_error():
    with pytest.raises(UserInputError):
        OpContext(group_policy="sometimes")
    with pytest.raises(UserInputError):
        OpContext(reduce_shortcut="teleport")
    with pytest.raises(UserInputError, match="cannot be split"):
        build_op("group_conv_3x3", 10, 1, OpContext(base_channels=12, channels_per_group=3))


def test_every_space_op_is_registered():
    for space in SPACES.values():
        assert set(space.ops) <= set(OPS), set(space.ops) - set(OPS)


def test_networks_and_supernet_share_the_registry(monkeypatch):
    assert networks.build_op is ops.build_op
    try:
        # The supernet builds its candidate ops in its mixed ops.
        from bats_cli.models.mixed_op import reference as supernet
    except ImportError:
        supernet = None
    if supernet is not None:
        assert supernet.build_op is ops.build_op
    calls: list[tuple[int, int]] = []
    original = OPS["group_conv_3x3"]

    def spy(C_, stride, ctx):
        calls.append((C_, stride))
        return original(C_, stride, ctx)

    monkeypatch.setitem(OPS, "group_conv_3x3", spy)
    from bats_cli.core.zoo import load_zoo_genotype

    networks.build_network(load_zoo_genotype("bats_c10"), layers=3, channels=12, auxiliary=False)
    assert calls, "the network did not build its ops through ops.OPS"
