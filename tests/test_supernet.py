"""The fast supernet (``mixed_op="fast"``) against the textbook one (``mixed_op="reference"``).

Same weights in both (one ``state_dict`` loads into either), then outputs, every gradient
(weights and architecture α) and the BatchNorm running statistics must agree. The comparison
runs in float64: binary networks are discontinuous (a value within float32 rounding of 0 can
flip its sign), so float32 runs of two equivalent implementations drift apart; in float64 any
real difference would still show and rounding does not. Tiny configurations, CPU only.
"""

from __future__ import annotations

import random
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from bats_cli.core.spaces import edge_count, get_space
from bats_cli.layers.quant import REAL, BinarySpec
from bats_cli.models.mixed_op import FastMixedOp, ReferenceMixedOp
from bats_cli.models.supernet import SuperNet, SupernetConfig

TINY = SupernetConfig(channels=6, layers=3)


def dropped(k: int, seed: int, space: str = "bats") -> tuple[list[list[str]], list[list[str]]]:
    """k candidates per edge, a different random choice on every edge (op dropping)."""
    ops = list(get_space(space).candidates)
    rng = random.Random(seed)

    def pick() -> list[str]:
        chosen = set(rng.sample(ops, k))
        return [op for op in ops if op in chosen]

    n = edge_count(4)
    return [pick() for _ in range(n)], [pick() for _ in range(n)]


def make_pair(config: SupernetConfig, candidates=(None, None), seed: int = 0):
    normal, reduce = candidates
    torch.manual_seed(seed)
    ref = SuperNet(replace(config, mixed_op="reference"), candidates_normal=normal,
                   candidates_reduce=reduce).double()
    fast = SuperNet(replace(config, mixed_op="fast"), candidates_normal=normal,
                    candidates_reduce=reduce).double()
    with torch.no_grad():
        # Away from the initialisation's symmetries: PReLU slopes, scales, α all distinct.
        for p in ref.parameters():
            p.add_(0.1 * torch.randn_like(p))
        ref.alpha_normal.normal_()
        ref.alpha_reduce.normal_()
    fast.load_state_dict(ref.state_dict())
    return ref, fast


def batch(size: int = 16, n: int = 4, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(n, 3, size, size, generator=gen, dtype=torch.float64),
            torch.randint(0, 10, (n,), generator=gen))


def assert_same(ref: SuperNet, fast: SuperNet, x: torch.Tensor, y: torch.Tensor) -> None:
    results = []
    for net in (ref, fast):
        net.zero_grad(set_to_none=True)
        out = net(x)
        F.cross_entropy(out, y).backward()
        results.append((out.detach(), {n: p.grad for n, p in net.named_parameters()},
                        {n: b.clone() for n, b in net.named_buffers()}))
    (out_r, grads_r, bufs_r), (out_f, grads_f, bufs_f) = results
    torch.testing.assert_close(out_f, out_r, rtol=1e-9, atol=1e-10)
    assert grads_r.keys() == grads_f.keys()
    scale = max(g.abs().max().item() for g in grads_r.values() if g is not None)
    for name, g in grads_r.items():
        assert (g is None) == (grads_f[name] is None), name
        if g is not None:
            torch.testing.assert_close(grads_f[name], g, rtol=1e-8, atol=1e-10 * scale, msg=name)
    assert grads_r["alpha_normal"].abs().max() > 0 and grads_r["alpha_reduce"].abs().max() > 0
    for name, b in bufs_r.items():
        torch.testing.assert_close(bufs_f[name], b, rtol=1e-9, atol=1e-12, msg=name)


def test_default_is_fast_with_the_reference_state_dict():
    ref, fast = make_pair(TINY)
    assert SupernetConfig().mixed_op == "fast"
    assert any(isinstance(m, FastMixedOp) for m in fast.modules())
    assert any(isinstance(m, ReferenceMixedOp) for m in ref.modules())
    ref_shapes = {k: v.shape for k, v in ref.state_dict().items()}
    assert {k: v.shape for k, v in fast.state_dict().items()} == ref_shapes
    # And back: the fast net's weights load into the reference one.
    ref.load_state_dict(fast.state_dict())


@pytest.mark.parametrize("spec", [BinarySpec(), REAL], ids=["binary", "real"])
@pytest.mark.parametrize("temperatures", [(0.2, 0.15), (1.0, 1.0)], ids=["T=0.2/0.15", "T=1"])
def test_fast_matches_reference_all_candidates(spec, temperatures):
    config = replace(TINY, spec=spec, temperature_normal=temperatures[0],
                     temperature_reduce=temperatures[1])
    ref, fast = make_pair(config)
    assert_same(ref, fast, *batch())


@pytest.mark.parametrize("k", [5, 3])
@pytest.mark.parametrize("spec", [BinarySpec(), REAL], ids=["binary", "real"])
def test_fast_matches_reference_after_op_dropping(k, spec):
    candidates = dropped(k, seed=k)
    assert len({tuple(ops) for ops in candidates[0]}) > 1  # different ops on different edges
    ref, fast = make_pair(replace(TINY, spec=spec), candidates)
    assert_same(ref, fast, *batch())


def test_fast_matches_reference_twelve_channels_five_cells_32px():
    ref, fast = make_pair(replace(TINY, channels=12, layers=5), dropped(5, seed=7))
    assert_same(ref, fast, *batch(size=32, n=2))


def test_odd_feature_maps_and_other_activations():
    # 18 px -> 9 -> 5: odd maps take the unfused factorized-reduce path.
    ref, fast = make_pair(replace(TINY, activation="relu"))
    assert_same(ref, fast, *batch(size=18))
    ref, fast = make_pair(replace(TINY, activation="none", reduce_shortcut="factorized"))
    assert_same(ref, fast, *batch())


def test_eval_mode_uses_the_running_statistics():
    ref, fast = make_pair(TINY)
    x, y = batch()
    with torch.no_grad():
        for net in (ref, fast):
            net(x)  # train mode: updates every op's running statistics
    ref.eval()
    fast.eval()
    assert_same(ref, fast, *batch(seed=2))
    # Running statistics that differ between the ops of an edge: the fast op must not share.
    with torch.no_grad():
        for net in (ref, fast):
            bn = net.cells[0].edges[0].ops[4].conv.bn
            bn.running_mean.add_(0.5)
    assert_same(ref, fast, *batch(seed=3))


def test_architecture_gradient_alone_matches():
    """First-order architecture step: gradient of the loss w.r.t. α only."""
    ref, fast = make_pair(TINY, dropped(3, seed=3))
    x, y = batch()
    grads = [torch.autograd.grad(F.cross_entropy(net(x), y), net.arch_parameters()) for net in (ref, fast)]
    for g_ref, g_fast in zip(*grads):
        torch.testing.assert_close(g_fast, g_ref, rtol=1e-8, atol=1e-12)
    assert all(p.grad is None for p in fast.weight_parameters())


def test_single_edge_fast_mixed_op_matches():
    ref, fast = make_pair(TINY)
    edge_r, edge_f = ref.cells[1].edges[0], fast.cells[1].edges[0]  # stride 2, 8 candidates
    x = torch.randn(4, 12, 8, 8, dtype=torch.float64, requires_grad=True)
    w = torch.softmax(torch.randn(8, dtype=torch.float64), 0).requires_grad_()
    outs = []
    for edge in (edge_r, edge_f):
        out = edge(x, w)
        gx, gw = torch.autograd.grad(out.square().sum(), (x, w))
        outs.append((out, gx, gw))
    for a, b in zip(*outs):
        torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("spec", [BinarySpec(), REAL], ids=["binary", "real"])
def test_darts_space_works_with_the_fast_op(spec):
    ref, fast = make_pair(replace(TINY, space="darts", spec=spec), dropped(5, seed=11, space="darts"))
    assert_same(ref, fast, *batch())


def test_float32_search_step_runs():
    """Float32 smoke test of a whole first-order search step on the fast supernet."""
    torch.manual_seed(0)
    net = SuperNet(TINY)
    w_opt = torch.optim.Adam(net.weight_parameters(), lr=1e-3, weight_decay=3e-4)
    a_opt = torch.optim.Adam(net.arch_parameters(), lr=6e-4, betas=(0.5, 0.999), weight_decay=1e-3)
    x, y = (t.float() if t.is_floating_point() else t for t in batch())
    before = net.alpha_normal.detach().clone()
    loss = F.cross_entropy(net(x), y)
    for p, g in zip(net.arch_parameters(), torch.autograd.grad(loss, net.arch_parameters())):
        p.grad = g
    a_opt.step()
    w_opt.zero_grad()
    loss = F.cross_entropy(net(x), y)
    loss.backward()
    w_opt.step()
    assert torch.isfinite(loss)
    assert not torch.equal(before, net.alpha_normal.detach())


def test_fast_supernet_under_autocast():
    """bf16 autocast (``bats search --precision bf16``): the fused path runs in float32."""
    torch.manual_seed(0)
    net = SuperNet(TINY)
    x, y = batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = F.cross_entropy(net(x.float()).float(), y)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in net.parameters() if p.grad is not None)
