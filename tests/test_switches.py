"""The ablation switches: each changes the network exactly as documented."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bats_cli.core.errors import UserInputError
from bats_cli.core.zoo import resolve_genotype
from bats_cli.layers.ops import ChannelShuffle, GroupConvOp, OpContext, build_op
from bats_cli.layers.quant import BinarySpec
from bats_cli.models.networks import build_network

C = 12


def _params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def _net(**kw):
    return build_network(resolve_genotype("bats_c10"), layers=3, channels=12, auxiliary=False, **kw)


def test_channel_shuffle_permutes_the_conv_output_and_adds_no_parameters():
    torch.manual_seed(0)
    plain = build_op("group_conv_3x3", C, 1, OpContext(base_channels=C))
    shuffled = build_op("group_conv_3x3", C, 1, OpContext(base_channels=C, channel_shuffle=4))
    shuffled.load_state_dict(plain.state_dict())
    assert isinstance(shuffled.shuffle, ChannelShuffle) and isinstance(plain.shuffle, nn.Identity)
    assert _params(plain) == _params(shuffled)
    plain.eval(), shuffled.eval()
    x = torch.randn(2, C, 8, 8)
    f = plain.conv(x)
    # 4 groups of 3 channels transposed: output channel j*4+i is input channel i*3+j.
    perm = torch.arange(C).reshape(4, 3).t().reshape(-1)
    torch.testing.assert_close(shuffled(x), f[:, perm] + x)
    # Same parameter count for the whole network too; channels that 4 does not divide are refused.
    assert _params(_net()) == _params(_net(channel_shuffle=4))
    with pytest.raises(UserInputError, match="channel shuffle"):
        build_op("group_conv_3x3", 6, 1, OpContext(base_channels=6, channel_shuffle=4))


def test_reduce_shortcut_none_drops_the_stride2_identity_connection():
    ctx = dict(base_channels=C)
    avg = build_op("group_conv_5x5", C, 2, OpContext(**ctx))
    none = build_op("group_conv_5x5", C, 2, OpContext(**ctx, reduce_shortcut="none"))
    fact = build_op("group_conv_5x5", C, 2, OpContext(**ctx, reduce_shortcut="factorized"))
    assert isinstance(avg.shortcut, nn.AvgPool2d) and none.shortcut is None
    none.load_state_dict(avg.state_dict())
    avg.eval(), none.eval()
    x = torch.randn(2, C, 8, 8)
    torch.testing.assert_close(avg(x) - none(x), nn.functional.avg_pool2d(x, 2))
    assert none(x).shape == (2, C, 4, 4)
    # Parameter-free either way; the factorized shortcut adds two 1x1 convs (and BatchNorm / PReLU).
    assert _params(avg) == _params(none) < _params(fact)
    # Stride 1 keeps its identity connection.
    assert isinstance(build_op("group_conv_3x3", C, 1, OpContext(**ctx, reduce_shortcut="none")).shortcut,
                      nn.Identity)
    assert _params(_net(reduce_shortcut="none")) == _params(_net()) < _params(_net(reduce_shortcut="factorized"))


@pytest.mark.parametrize("policy, cpg, groups_after_reduction", [
    ("groups", 3, 4),  # 12 channels = 4 groups; 24 channels keep 4 groups of 6
    ("channels", 3, 8),  # 24 channels = 8 groups of 3
    ("channels", 6, 4),  # 24 channels = 4 groups of 6
])
def test_group_policy_and_channels_per_group(policy, cpg, groups_after_reduction):
    net = _net(group_policy=policy, channels_per_group=cpg)
    convs = [m.conv.conv for m in net.cells[1].ops if isinstance(m, GroupConvOp)]  # the first reduction
    assert convs and {c.groups for c in convs} == {groups_after_reduction}
    # Fewer groups, more weights per group.
    assert _params(_net(group_policy="channels", channels_per_group=6)) > _params(
        _net(group_policy="channels", channels_per_group=3))


def test_supernet_takes_the_switches_and_the_fast_path_matches_the_reference():
    from bats_cli.models.supernet import SuperNet, SupernetConfig

    kw = dict(channels=12, layers=3, steps=2, spec=BinarySpec(activations=True), channel_shuffle=4,
              reduce_shortcut="none", group_policy="channels", channels_per_group=6)
    torch.manual_seed(0)
    ref = SuperNet(SupernetConfig(**kw, mixed_op="reference"))
    fast = SuperNet(SupernetConfig(**kw, mixed_op="fast"))
    fast.load_state_dict(ref.state_dict())
    op = ref.cells[1].edges[0].ops[ref.cells[1].edges[0].op_names.index("group_conv_3x3")]
    assert op.shortcut is None and isinstance(op.shuffle, ChannelShuffle) and op.conv.conv.groups == 4
    x = torch.randn(4, 3, 16, 16)
    torch.testing.assert_close(fast(x), ref(x), rtol=1e-4, atol=1e-4)


def test_search_and_train_configs_take_the_switches():
    from bats_cli.nas.search import SearchConfig
    from bats_cli.pipeline.train import TrainConfig

    s = SearchConfig(channel_shuffle=4, reduce_shortcut="none", group_policy="channels", channels_per_group=3)
    assert (s.channel_shuffle, s.reduce_shortcut, s.group_policy) == (4, "none", "channels")
    t = TrainConfig(genotype="bats_c10", optimizer="sgd", channel_shuffle=4, reduce_shortcut="none")
    # Appendix B's recipe for real-valued runs: SGD, lr 0.1, momentum 0.9.
    assert (t.optimizer, t.lr, t.momentum) == ("sgd", 0.1, 0.9)
    assert TrainConfig(genotype="bats_c10").lr == 1e-3


@pytest.mark.slow
def test_train_optimizer_sgd_is_used(tmp_path):
    from bats_cli.pipeline.train import TrainConfig, train

    cfg = TrainConfig(genotype="bats_c10", dataset="fashion-mini", optimizer="sgd", real=True, layers=3,
                      channels=6, epochs=1,
                      batch_size=16, subset=32, threads=1, auxiliary=False)
    res = train(cfg, genotype=resolve_genotype("bats_c10"), out=tmp_path / "r", quiet=True,
                handle_signals=False)
    from bats_cli.storage.checkpoint import read_metadata

    meta = read_metadata(tmp_path / "r" / "last.safetensors")
    assert meta.config["run"]["optimizer"] == "sgd" and res["epochs"] == 1
    # SGD keeps one momentum buffer per parameter (Adam would keep exp_avg and exp_avg_sq).
    assert "momentum_buffer" in meta.extra["bats_optimizer"] and "exp_avg_sq" not in meta.extra["bats_optimizer"]
