"""Binary layers (§3, XNOR-Net++): quantizers, QuantConv2d, weight binarization, layer order."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bats_cli.core.errors import UserInputError
from bats_cli.layers.quant import (
    REAL,
    STE_SIGN,
    BinaryConvBlock,
    BinarySpec,
    QuantConv2d,
    Quantizer,
    binarize_weights_,
    effective_weight,
    make_activation,
    quant_convs,
)


def _capture_conv_input(conv: QuantConv2d, store: list) -> None:
    """Record what the conv really convolves (the input after its quantizer)."""
    original = conv._conv_forward

    def spy(x, weight, bias):
        store.append(x.detach().clone())
        return original(x, weight, bias)

    conv._conv_forward = spy


def test_quant_conv_without_quantizers_is_nn_conv2d():
    torch.manual_seed(0)
    ref = nn.Conv2d(6, 8, 3, padding=1, groups=2, bias=False)
    q = QuantConv2d(6, 8, 3, padding=1, groups=2)
    assert q.scale is None and not q.is_binary
    assert list(q.state_dict()) == list(ref.state_dict()) == ["weight"]
    q.load_state_dict(ref.state_dict())
    x1 = torch.randn(2, 6, 5, 5, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_(True)
    y_ref, y_q = ref(x1), q(x2)
    assert torch.equal(y_ref, y_q)
    g = torch.randn_like(y_ref)
    y_ref.backward(g)
    y_q.backward(g)
    assert torch.equal(x1.grad, x2.grad)
    assert torch.equal(ref.weight.grad, q.weight.grad)


def test_binary_input_is_exactly_plus_minus_one_and_zero_maps_to_plus_one():
    torch.manual_seed(0)
    conv = QuantConv2d(4, 4, 3, padding=1, input_quantizer=STE_SIGN)
    seen: list[torch.Tensor] = []
    _capture_conv_input(conv, seen)
    x = torch.randn(2, 4, 6, 6)
    x[0, 0, 0, :3] = 0.0  # exact zeros must become +1, not 0
    conv(x)
    (q,) = seen
    assert set(q.unique().tolist()) == {-1.0, 1.0}
    assert torch.equal(q, torch.where(x >= 0, 1.0, -1.0))
    assert torch.all(q[0, 0, 0, :3] == 1.0)


def test_real_conv_sees_the_real_input():
    conv = QuantConv2d(4, 4, 1)
    seen: list[torch.Tensor] = []
    _capture_conv_input(conv, seen)
    x = torch.randn(1, 4, 3, 3)
    conv(x)
    assert torch.equal(seen[0], x)


def test_ste_gradient_passes_inside_unit_interval_and_is_zero_outside():
    x = torch.tensor([-3.0, -1.5, -1.0, -0.3, 0.0, 0.4, 1.0, 1.01, 2.5], requires_grad=True)
    y = STE_SIGN(x)
    assert y.tolist() == [-1.0, -1.0, -1.0, -1.0, 1.0, 1.0, 1.0, 1.0, 1.0]
    upstream = torch.arange(1.0, 10.0)
    y.backward(upstream)
    inside = x.detach().abs() <= 1
    assert torch.equal(x.grad[inside], upstream[inside])
    assert torch.all(x.grad[~inside] == 0)


def test_binarize_weights_gives_sign_times_per_channel_scale_and_close_first_forward():
    torch.manual_seed(0)
    conv = QuantConv2d(16, 8, 3, padding=1, input_quantizer=STE_SIGN)
    with torch.no_grad():
        conv.scale.copy_(torch.rand(8) + 0.5)  # a trained, non-trivial scale
    x = torch.randn(4, 16, 8, 8)
    before = conv(x).detach()
    unfolded = nn.functional.conv2d(torch.where(x >= 0, 1.0, -1.0), torch.sign(conv.weight), padding=1)
    unfolded = unfolded * conv.scale.detach().view(1, -1, 1, 1)

    assert binarize_weights_(conv) == 1
    assert conv.kernel_quantizer is STE_SIGN
    w = effective_weight(conv).detach()
    for o in range(8):
        magnitudes = w[o].abs().unique()
        assert magnitudes.numel() == 1
        assert torch.allclose(magnitudes, conv.scale.detach()[o].abs())
    assert torch.equal(torch.sign(w), torch.sign(conv.weight.detach()))

    after = conv(x).detach()
    rel = ((after - before).norm() / before.norm()).item()
    rel_unfolded = ((unfolded - before).norm() / before.norm()).item()
    # sign(W)·mean|W| is the least-squares binary approximation of each filter: the output keeps
    # its scale (a Gaussian filter keeps a correlation of sqrt(2/pi) ~ 0.8 with its sign).
    assert rel < 0.7
    assert rel < 0.1 * rel_unfolded
    assert 0.6 < (after.norm() / before.norm()).item() < 1.4


def test_binarize_is_idempotent_and_refuses_real_layers():
    conv = QuantConv2d(4, 4, 3, input_quantizer=STE_SIGN)
    conv.binarize_weights_()
    scale = conv.scale.detach().clone()
    conv.binarize_weights_()
    assert torch.equal(conv.scale.detach(), scale)
    with pytest.raises(UserInputError):
        QuantConv2d(4, 4, 3).binarize_weights_()


def test_binary_conv_block_order_is_bn_sign_conv_act():
    torch.manual_seed(0)
    block = BinaryConvBlock(6, 6, 3, padding=1, spec=BinarySpec(activations=True), activation="prelu")
    block.train()
    calls: list[str] = []
    tensors: dict[str, torch.Tensor] = {}

    def after(name):
        def hook(module, inputs, output):
            calls.append(name)
            tensors[name + ".in"] = inputs[0].detach().clone()
            tensors[name + ".out"] = output.detach().clone()

        return hook

    for name in ("bn", "conv", "act"):
        getattr(block, name).register_forward_hook(after(name))
    convolved: list[torch.Tensor] = []
    _capture_conv_input(block.conv, convolved)
    x = torch.randn(3, 6, 5, 5) * 3 + 1
    out = block(x)
    assert calls == ["bn", "conv", "act"]
    assert torch.equal(tensors["bn.in"], x)
    assert torch.equal(tensors["conv.in"], tensors["bn.out"])
    assert torch.equal(convolved[0], torch.where(tensors["bn.out"] >= 0, 1.0, -1.0))
    assert torch.equal(tensors["act.in"], tensors["conv.out"])
    assert torch.equal(out.detach(), tensors["act.out"])
    assert isinstance(block.act, nn.PReLU)


def test_real_block_has_no_quantizer_and_no_scale():
    block = BinaryConvBlock(4, 4, 3, padding=1, spec=REAL)
    assert not block.conv.is_binary and block.conv.scale is None
    assert quant_convs(block) == []
    assert [n for n, _ in quant_convs(BinaryConvBlock(4, 4, 1, spec=BinarySpec()))] == ["conv"]


def test_spec_parse_and_the_quantizer_is_its_function():
    assert BinarySpec.parse(weights="binary", activations="binary") == BinarySpec(True, True)
    assert BinarySpec.parse(weights="real", activations="real").real
    with pytest.raises(UserInputError):
        BinarySpec.parse(weights="ternary", activations="binary")
    assert BinarySpec().input_quantizer is STE_SIGN and STE_SIGN.precision == 1
    # The named quantizer applies the function it carries, with or without a gradient.
    doubled = Quantizer("double", 32, fn=lambda t: 2 * t, ste=lambda t: 2 * t)
    x = torch.tensor([-0.5, 0.0, 0.7], requires_grad=True)
    assert torch.equal(doubled(x), 2 * x) and torch.equal(STE_SIGN(x), torch.tensor([-1.0, 1.0, 1.0]))


@pytest.mark.parametrize("name, kind", [("prelu", nn.PReLU), ("relu", nn.ReLU), ("none", nn.Identity)])
def test_activations_by_name_and_unknown_names_refused(name, kind):
    assert type(make_activation(name, 4)) is kind
    with pytest.raises(UserInputError, match="choose one of: prelu, rprelu, relu, none"):
        make_activation("identity", 4)
