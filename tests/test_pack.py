"""The packed 1-bit artifact: bit layout, exact round trip, size against fp32."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bats_cli.core.errors import UserInputError
from bats_cli.core.zoo import resolve_genotype
from bats_cli.layers.quant import binarize_weights_, effective_weight, quant_convs
from bats_cli.models.modelio import network_settings, unpack
from bats_cli.models.networks import build_network
from bats_cli.models.pack import (
    pack_bits,
    packed_size_report,
    save_packed,
    unpack_bits,
)


def test_bits_round_trip_and_zero_is_plus_one():
    w = torch.tensor([[0.5, -0.1, 0.0], [-0.0, 3.0, -2.0], [1e-9, -1e-9, 0.2]]).reshape(1, 3, 3, 1)
    packed = pack_bits(w)
    assert packed.dtype == torch.uint8 and packed.numel() == 2  # 9 bits -> 2 bytes
    back = unpack_bits(packed, list(w.shape))
    # sign(0) = +1 (as the STE sign); -0.0 >= 0 is True, so it is +1 too.
    expected = torch.where(w >= 0, 1.0, -1.0)
    assert torch.equal(back, expected)
    # MSB first: the first weight is the top bit of byte 0.
    assert packed[0].item() >> 7 == 1
    with pytest.raises(UserInputError):
        unpack_bits(packed[:1], list(w.shape))


def test_random_bits_round_trip():
    g = torch.Generator().manual_seed(0)
    for shape in [(5, 3, 3, 3), (7, 1, 1, 1), (16, 6, 5, 5)]:
        w = torch.randn(*shape, generator=g)
        assert torch.equal(unpack_bits(pack_bits(w), shape), torch.where(w >= 0, 1.0, -1.0))
        assert pack_bits(w).numel() == -(-int(np.prod(shape)) // 8)


def _binarized_net(**kw):
    torch.manual_seed(0)
    g = resolve_genotype("bats_c10")
    net = build_network(g, **kw)
    binarize_weights_(net)
    return g, net


def test_pack_unpack_exact_outputs(tmp_path):
    g, net = _binarized_net(num_classes=10, in_channels=1, layers=3, channels=6)
    # Make BatchNorm statistics non-trivial so the comparison covers them.
    net.train()
    with torch.no_grad():
        net(torch.randn(8, 1, 32, 32))
    net.eval()
    settings = network_settings(net)
    path = save_packed(net, tmp_path / "m.packed.safetensors", settings=settings,
                       data={"name": "fashion-mini"}, run={}, genotype_json=g.to_json(),
                       source={})
    model, meta = unpack(path)
    assert meta.kind == "packed"
    assert model.auxiliary_head is None  # dropped by default: training only
    x = torch.randn(4, 1, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), net(x))
    convs = dict(quant_convs(model))
    for name, conv in quant_convs(net):
        assert torch.equal(effective_weight(convs[name]), effective_weight(conv))
        assert set(convs[name].weight.unique().tolist()) <= {-1.0, 1.0}


def test_pack_refuses_real_weights(tmp_path):
    torch.manual_seed(0)
    g = resolve_genotype("bats_c10")
    net = build_network(g, num_classes=10, in_channels=1, layers=3, channels=6)
    with pytest.raises(UserInputError, match="bats binarize"):
        save_packed(net, tmp_path / "x.safetensors", settings=network_settings(net), data={},
                    run={}, genotype_json=g.to_json(), source={})
    real = build_network(g, num_classes=10, in_channels=1, layers=3, channels=6, real=True)
    with pytest.raises(UserInputError, match="no binary"):
        save_packed(real, tmp_path / "x.safetensors", settings=network_settings(real), data={},
                    run={}, genotype_json=g.to_json(), source={})


def test_paper_network_is_over_20x_smaller(tmp_path):
    """The paper's CIFAR network (20 cells, C = 36): binary convs >= 20x smaller than fp32."""
    g, net = _binarized_net(num_classes=10, in_channels=3)
    path = save_packed(net, tmp_path / "p.safetensors", settings=network_settings(net), data={},
                       run={}, genotype_json=g.to_json(), source={})
    report = packed_size_report(path)
    b = report["binary_convs"]
    assert b["count"] == len(quant_convs(net))
    assert b["weights"] == sum(c.weight.numel() for _, c in quant_convs(net))
    assert b["fp32_bytes"] == 4 * (b["weights"] + b["scales"])
    assert b["ratio"] >= 20
    assert 31 < b["weights_only_ratio"] <= 32
    assert report["total"]["ratio"] > 1
    assert report["file_bytes"] < report["total"]["fp32_bytes"]
