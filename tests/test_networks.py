"""Evaluation networks from every bundled genotype (§6.2 CIFAR, §6.3 ImageNet) and width presets."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bats_cli.core.errors import UserInputError
from bats_cli.core.zoo import load_zoo_genotype, zoo_names
from bats_cli.layers.ops import GroupConvOp
from bats_cli.layers.quant import quant_convs
from bats_cli.models.networks import PAPER_DEFAULTS, WIDTHS, ImageNetStem, build_network, scaled_width

ZOO = ("amoebanet_a", "bats_c10", "darts_v1", "darts_v2", "nasnet_a", "pdarts")

# Tiny but complete: both reduction cells and the auxiliary tower are present.
TINY = {
    "cifar": dict(kind="cifar", layers=5, channels=12, image=32, num_classes=10),
    # ImageNet channels: a multiple of 8 keeps the 4-group stem conv valid, of 10 the 5-ch groups.
    "imagenet": dict(kind="imagenet", layers=5, channels=40, image=64, num_classes=7),
}


def test_zoo_is_complete():
    assert set(ZOO) <= set(zoo_names())


@pytest.mark.parametrize("kind", ["cifar", "imagenet"])
@pytest.mark.parametrize("name", ZOO)
def test_zoo_genotype_builds_and_runs(name, kind):
    torch.manual_seed(0)
    cfg = TINY[kind]
    g = load_zoo_genotype(name)
    net = build_network(g, kind=kind, num_classes=cfg["num_classes"], layers=cfg["layers"],
                        channels=cfg["channels"])
    x = torch.randn(2, 3, cfg["image"], cfg["image"])
    net.train()
    out = net(x)
    assert isinstance(out, tuple) and len(out) == 2
    logits, aux = out
    assert logits.shape == (2, cfg["num_classes"]) and aux.shape == (2, cfg["num_classes"])
    (logits.sum() + 0.4 * aux.sum()).backward()
    net.eval()
    with torch.no_grad():
        logits = net(x)
    assert isinstance(logits, torch.Tensor) and logits.shape == (2, cfg["num_classes"])
    assert torch.isfinite(logits).all()
    # Binary by default: every cell conv is binary; stem, classifier and aux tower are real.
    binary = {n for n, _ in quant_convs(net)}
    assert binary and all(n.startswith("cells.") for n in binary)


@pytest.mark.parametrize("name", ["darts_v2", "amoebanet_a", "bats_c10"])
def test_real_network_has_no_binary_conv(name):
    net = build_network(load_zoo_genotype(name), layers=5, channels=12, real=True)
    assert quant_convs(net) == []
    assert net.eval()(torch.randn(1, 3, 32, 32)).shape == (1, 10)


def test_five_node_cells_concatenate_their_listed_nodes():
    net = build_network(load_zoo_genotype("amoebanet_a"), layers=5, channels=12, real=True)
    normal, reduce = net.cells[0], net.cells[1]
    assert (normal.steps, normal.concat, normal.multiplier) == (5, [4, 5, 6], 3)
    assert (reduce.steps, reduce.concat, reduce.multiplier) == (5, [3, 4, 6], 3)
    assert net.classifier.in_features == 3 * 48


def test_auxiliary_tower_does_not_change_the_main_path():
    # The tower reads a cell output that the next cells still use: it must not modify it.
    torch.manual_seed(0)
    g = load_zoo_genotype("bats_c10")
    with_aux = build_network(g, layers=5, channels=12)
    without = build_network(g, layers=5, channels=12, auxiliary=False)
    state = {k: v for k, v in with_aux.state_dict().items() if not k.startswith("auxiliary_head")}
    without.load_state_dict(state)
    x = torch.randn(2, 3, 32, 32)
    with_aux.train(), without.train()
    assert torch.equal(with_aux(x)[0], without(x))


def test_fashion_network_takes_one_channel():
    net = build_network(load_zoo_genotype("bats_c10"), in_channels=1, layers=5, channels=12)
    assert net.eval()(torch.randn(1, 1, 32, 32)).shape == (1, 10)


@pytest.mark.parametrize("kind", ["cifar", "imagenet"])
@pytest.mark.parametrize("width", list(WIDTHS))
def test_width_presets_give_whole_groups(kind, width):
    cpg = PAPER_DEFAULTS[kind]["channels_per_group"]
    C = scaled_width(PAPER_DEFAULTS[kind]["channels"], width, cpg, multiple_of=8 if kind == "imagenet" else 1)
    assert C % (2 * cpg) == 0  # an even number of groups: factorized reduce halves C
    with torch.device("meta"):
        net = build_network(load_zoo_genotype("bats_c10"), kind=kind, width=width)
    stage1 = None
    for module in net.modules():
        if isinstance(module, nn.Conv2d):
            assert module.in_channels % module.groups == 0
            assert module.out_channels % module.groups == 0
        if isinstance(module, GroupConvOp) and stage1 is None:
            stage1 = module.conv.conv
    assert stage1.in_channels == C and stage1.in_channels // stage1.groups == cpg
    if kind == "imagenet":
        assert isinstance(net.stem, ImageNetStem) and net.stem.stem0[3].groups == 4


def test_width_preset_channels():
    # 2x = Table 6's "2x-wider" = 1.5x channels (see WIDTHS and docs/flops.md).
    assert scaled_width(80, "2x", 5) == 120 and scaled_width(36, "2x", 3) == 54
    assert scaled_width(36, "medium", 3) == 54 and scaled_width(36, "large", 3) == 84
    assert scaled_width(80, "1x", 5) == 80 and scaled_width(36, "1x", 3) == 36
    # ImageNet: C/2 must split into the stem conv's 4 groups.
    assert scaled_width(80, "large", 5, multiple_of=8) == 200
    with torch.device("meta"):
        net = build_network(load_zoo_genotype("bats_c10"), kind="imagenet", width="large")
    assert net.config.channels == 200


def test_bad_network_settings_are_user_input_errors():
    g = load_zoo_genotype("bats_c10")
    with pytest.raises(UserInputError):
        build_network(g, width="3x")
    with pytest.raises(UserInputError):
        build_network(g, width="2x", channels=48)
    with pytest.raises(UserInputError):
        build_network(g, layers=2, channels=12)
    with pytest.raises(UserInputError):
        build_network(g, kind="mnist")


def test_darts_real_network_refuses_an_activation_it_would_not_use():
    """DARTS's float ops are ReLU -> conv -> BatchNorm: --activation there would be ignored."""
    g = load_zoo_genotype("darts_v2")
    build_network(g, layers=3, channels=8, real=True, auxiliary=False)  # the default is fine
    with pytest.raises(UserInputError, match="DARTS space's real-valued ops"):
        build_network(g, layers=3, channels=8, real=True, activation="relu", auxiliary=False)
    build_network(g, layers=3, channels=12, activation="relu", auxiliary=False)  # binary: used
