"""The bitwise engine: XNOR + popcount layers equal the float-emulated binary model exactly.

The kernel is compiled once per test session (then cached on disk by torch's extension cache).
Binary convs sum ±1 products, which are exact integers in float32 as well; BatchNorm + sign are
folded into thresholds found on the BatchNorm itself; the float tail (× α, activation, adds) runs
the same operations in the same order. So every comparison here is exact equality, not a
tolerance: per layer, per op, on whole networks of every bundled genotype and ResNet-18, on
every SIMD path this CPU has, and with one thread or two.
"""

from __future__ import annotations

import copy
import json
import zlib

import pytest
import torch
from helpers import cli, one_line_error, randomize_bn

from bats_cli.core.errors import UserInputError
from bats_cli.core.spaces import SPACES
from bats_cli.core.zoo import resolve_genotype, zoo_names
from bats_cli.engine import EngineUnavailable, _build, apply_engine, to_bitwise
from bats_cli.engine.bitwise import BitwiseBlock, BitwiseCell, bitwise_conv_count, engine_info
from bats_cli.engine.fold import fold_bn_sign
from bats_cli.layers.ops import OpContext, build_op
from bats_cli.layers.quant import STE_SIGN, BinaryConvBlock, BinarySpec, QuantConv2d, binarize_weights_, quant_convs
from bats_cli.models.networks import build_network
from bats_cli.models.resnet import build_resnet

pytestmark = pytest.mark.slow  # the bitwise kernel is compiled (a C++ build on a fresh machine)

BINARY = BinarySpec(activations=True, weights=True)


@pytest.fixture(scope="module", autouse=True)
def kernel():
    try:
        return _build.load_extension()
    except EngineUnavailable as exc:  # pragma: no cover - CI machines have a compiler
        pytest.fail(f"the bitwise kernel must build where the tests run: {exc}")


def _check_same(module: torch.nn.Module, x: torch.Tensor) -> int:
    """Float-emulated vs bitwise outputs are identical; returns the number of binary convs the
    kernel runs.

    Exact for whole networks too: the kernel gives its output the memory format PyTorch's conv
    would, so every float layer after it sums in the same order.
    """
    module.eval()
    with torch.no_grad():
        want = module(x)
        fast = to_bitwise(copy.deepcopy(module))
        got = fast(x)
    assert got.shape == want.shape
    assert torch.equal(got, want), (got - want).abs().max()
    return bitwise_conv_count(fast)


@pytest.mark.parametrize("k,stride,dilation,groups,c_in,c_out", [
    (3, 1, 1, 4, 12, 12),   # 3 channels per group, 3x3: 27-bit windows
    (5, 1, 1, 4, 12, 12),   # 5x5: 75 bits, two words
    (3, 1, 2, 4, 12, 12),   # dilated
    (5, 2, 2, 4, 12, 12),   # dilated, stride 2
    (5, 2, 1, 2, 24, 24),   # 12 channels per group: 300-bit windows
    (3, 1, 1, 12, 12, 12),  # depthwise (DARTS)
    (1, 1, 1, 1, 130, 20),  # dense 1x1 over more than 64 channels: multi-word fields
    (1, 2, 1, 1, 18, 8),    # dense 1x1, stride 2 (factorized reduce)
    (7, 2, 1, 1, 70, 10),   # dense 7x7 over 70 channels: the field layout with padding
])
@pytest.mark.parametrize("channels_last", [False, True])
def test_conv_kernel_equals_float_conv(k, stride, dilation, groups, c_in, c_out, channels_last):
    gen = torch.Generator().manual_seed(k * 100 + stride * 10 + dilation + groups)
    conv = QuantConv2d(c_in, c_out, k, stride=stride, padding=dilation * (k // 2),
                       dilation=dilation, groups=groups, input_quantizer=STE_SIGN,
                       kernel_quantizer=STE_SIGN)
    randomize_bn(conv, gen)
    for h, w in ((9, 11), (16, 16)):
        x = torch.randn(2, c_in, h, w, generator=gen)
        x[0, :, 0, 0] = 0.0  # sign(0) = +1 on both paths
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        assert _check_same(conv, x) == 1


def test_asymmetric_kernel_stride_and_padding():
    """NASNet's 1x7 / 7x1 convs: non-square kernel, stride and padding."""
    gen = torch.Generator().manual_seed(1)
    for k, s, p in (((1, 7), (1, 2), (0, 3)), ((7, 1), (2, 1), (3, 0))):
        conv = QuantConv2d(12, 12, k, stride=s, padding=p, input_quantizer=STE_SIGN,
                           kernel_quantizer=STE_SIGN)
        randomize_bn(conv, gen)
        assert _check_same(conv, torch.randn(2, 12, 10, 9, generator=gen)) == 1


def _binary_ops():
    for space in ("bats", "darts"):
        for name in SPACES[space].ops:
            for stride in (1, 2):
                yield space, name, stride


@pytest.mark.parametrize("space,name,stride", list(_binary_ops()))
def test_every_op_of_both_spaces(space, name, stride):
    """Each op, stride 1 and 2 (odd sizes: padding and factorized reduce's odd path)."""
    gen = torch.Generator().manual_seed(zlib.crc32(f"{space}{name}{stride}".encode()))
    C = 12
    ctx = OpContext(spec=BINARY, channels_per_group=3, base_channels=C, space=space,
                    reduce_shortcut="factorized" if stride == 2 and name.startswith("group") else "avgpool")
    op = build_op(name, C, stride, ctx)
    randomize_bn(op, gen)
    has_binary = bool(quant_convs(op))
    x = torch.randn(2, C, 11, 11, generator=gen)
    if not has_binary:
        with pytest.raises(UserInputError, match="no binary"):
            to_bitwise(copy.deepcopy(op))
        return
    assert _check_same(op, x) == len(quant_convs(op))
    assert _check_same(op, x.contiguous(memory_format=torch.channels_last)) >= 1


def test_preprocess_and_factorized_reduce():
    gen = torch.Generator().manual_seed(3)
    ctx = OpContext(spec=BINARY, channels_per_group=3, base_channels=6)
    for module in (ctx.preprocess(18, 6), ctx.factorized_reduce(18, 6)):
        randomize_bn(module, gen)
        assert _check_same(module, torch.randn(2, 18, 9, 9, generator=gen)) >= 1


@pytest.mark.parametrize("k,stride,dilation,groups,c_in,c_out,size", [
    (5, 1, 1, 5, 25, 25, (9, 7)),     # 5 channels per group (ImageNet), odd sizes
    (3, 2, 1, 5, 35, 35, (9, 9)),     # 7 channels per group, stride 2 on an odd size
    (5, 1, 2, 3, 39, 39, (11, 8)),    # 13 channels per group: a 5-tap row needs two words
    (5, 1, 1, 16, 320, 320, (7, 7)),  # ImageNet's last stage: 20 channels per group, 5x5
    (3, 1, 1, 1, 131, 17, (6, 5)),    # dense 3x3 over 131 channels (3 words per tap), odd out
    (3, 1, 1, 2, 140, 10, (5, 6)),    # 2 groups of 70 channels (wider than a word)
    (3, 2, 1, 1, 64, 64, (7, 7)),     # exactly one word per tap (ResNet's first stage)
    (3, 1, 1, 15, 15, 15, (8, 8)),    # depthwise over an odd channel count
    (1, 1, 1, 1, 577, 9, (3, 4)),     # 1x1 over more than 512 channels
])
@pytest.mark.parametrize("channels_last", [False, True])
def test_folded_block_odd_channels_and_padding(k, stride, dilation, groups, c_in, c_out, size,
                                               channels_last):
    """BatchNorm -> sign -> conv × α -> PReLU folded into one kernel pass, + residual + add."""
    gen = torch.Generator().manual_seed(c_in * 7 + k)
    block = BinaryConvBlock(c_in, c_out, k, stride=stride, padding=dilation * (k // 2),
                            dilation=dilation, groups=groups, spec=BINARY)
    binarize_weights_(block)
    randomize_bn(block, gen)
    block.eval()
    x = torch.randn(2, c_in, *size, generator=gen)
    x[0, :, 0, 0] = block.bn.running_mean  # a BatchNorm output of exactly 0: sign +1
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = x.contiguous(memory_format=fmt)
    with torch.no_grad():
        want = block(x)
        res = torch.randn(want.shape, generator=gen).contiguous(memory_format=fmt)
        add = torch.randn(want.shape, generator=gen).contiguous(memory_format=fmt)
        fast = to_bitwise(copy.deepcopy(block))
        assert isinstance(fast, BitwiseBlock) and fast.folded
        assert torch.equal(fast(x), want)
        assert torch.equal(fast(x, res, add), (want + res) + add)
        assert fast(x).is_contiguous(memory_format=fmt)


def test_bn_folding_is_exact():
    """sign(bn(x)) == (s·x >= t) for values next to every threshold and at random, for scales
    of both signs, zero, tiny and huge variances, and a BatchNorm without affine terms."""
    gen = torch.Generator().manual_seed(5)
    C = 64
    for affine in (True, False):
        bn = torch.nn.BatchNorm2d(C, affine=affine, eps=1e-5).eval()
        bn.running_mean.copy_(torch.randn(C, generator=gen) * 10)
        bn.running_var.copy_(10 ** (torch.rand(C, generator=gen) * 12 - 8))
        if affine:
            bn.weight.data.copy_(torch.randn(C, generator=gen))
            bn.weight.data[:4] = 0.0
            bn.bias.data.copy_(torch.randn(C, generator=gen))
        t, s = fold_bn_sign(bn)
        x0 = t * s
        finite = torch.where(torch.isfinite(x0), x0, torch.zeros(()))
        probes = [finite, torch.nextafter(finite, torch.full_like(finite, -1e38)),
                  torch.nextafter(finite, torch.full_like(finite, 1e38))]
        probes += [torch.randn(C, generator=gen) * 10 ** float(e) for e in range(-6, 7)]
        x = torch.stack(probes, dim=-1).view(1, C, 1, -1)
        with torch.no_grad():
            assert torch.equal(bn(x) >= 0, x * s.view(1, C, 1, 1) >= t.view(1, C, 1, 1))
    no_stats = torch.nn.BatchNorm2d(C, track_running_stats=False)
    assert fold_bn_sign(no_stats) is None


def test_unfoldable_batchnorm_stays_float():
    """A BatchNorm without running statistics (batch statistics in eval) is not a threshold:
    it stays a float module before the kernel, and the outputs still match."""
    gen = torch.Generator().manual_seed(2)
    block = BinaryConvBlock(12, 12, 3, padding=1, groups=4, spec=BINARY)
    block.bn = torch.nn.BatchNorm2d(12, track_running_stats=False)
    binarize_weights_(block)
    x = torch.randn(3, 12, 7, 7, generator=gen)
    assert _check_same(block, x) == 1
    assert not to_bitwise(copy.deepcopy(block)).folded


def _small_network(name: str, kind: str):
    torch.manual_seed(0)
    if name == "resnet18":
        net = build_resnet(kind=kind, in_channels=3, num_classes=10, channels=16)
    else:
        kw = {"channels": 40, "layers": 4} if kind == "imagenet" else {"channels": 12, "layers": 4}
        net = build_network(resolve_genotype(name), kind=kind, in_channels=3, num_classes=10,
                            auxiliary=False, **kw)
    binarize_weights_(net)
    randomize_bn(net, torch.Generator().manual_seed(0))
    return net.eval()


# Every bundled genotype in both networks' shapes (CIFAR: C = 12, 4 groups of 3; ImageNet: C = 40,
# 8 groups of 5, the grouped stem, factorized reduce from the stem), and the ResNet-18 baseline.
WHOLE_NETWORKS = [(g, k) for g in zoo_names() for k in ("cifar", "imagenet")] + [
    ("resnet18", "cifar"), ("resnet18", "imagenet")]


@pytest.mark.parametrize("name,kind", WHOLE_NETWORKS)
def test_whole_network_outputs_equal(name, kind):
    net = _small_network(name, kind)
    size = 64 if kind == "imagenet" else 17  # odd: padding and factorized reduce's odd path
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    n_binary = len(quant_convs(net))
    assert _check_same(net, x.contiguous(memory_format=torch.channels_last)) == n_binary
    if name in ("bats_c10", "resnet18"):
        assert _check_same(net, x) == n_binary  # NCHW too


def test_cells_and_ops_fuse_their_adds():
    net = _small_network("bats_c10", "cifar")
    fast = to_bitwise(copy.deepcopy(net))
    info = engine_info(fast)
    assert info["binary_layers"] >= 1 and info["bn_folded"] == info["binary_layers"]
    assert info["bn_kept_float"] == 0 and info["fused_adds"] > 0
    assert all(isinstance(c, BitwiseCell) for c in fast.cells)
    assert info["simd"] in info["simd_available"] and info["threads"] == torch.get_num_threads()


def test_every_simd_path_gives_the_same_outputs(kernel):
    """AVX-512 VPOPCNTDQ, AVX2 and portable (whichever this CPU has) agree bit for bit."""
    net = _small_network("bats_c10", "cifar")
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        want = net(x)
        fast = to_bitwise(copy.deepcopy(net))
        paths = list(kernel.simd_paths())
        assert paths[-1] == "portable"
        previous = kernel.simd_path()
        try:
            for path in paths:
                kernel.set_simd(path)
                assert kernel.simd_path() == path
                assert torch.equal(fast(x), want), path
        finally:
            kernel.set_simd(previous)
    with pytest.raises(RuntimeError, match="unknown SIMD path"):
        kernel.set_simd("sse9")


def test_threads_give_identical_results():
    """--threads N splits rows between threads; every value is computed the same way."""
    net = _small_network("bats_c10", "cifar")
    x = torch.randn(5, 3, 17, 17, generator=torch.Generator().manual_seed(4))
    x = x.contiguous(memory_format=torch.channels_last)
    fast = to_bitwise(copy.deepcopy(net))
    threads = torch.get_num_threads()
    try:
        with torch.no_grad():
            torch.set_num_threads(1)
            one = fast(x)
            torch.set_num_threads(2)
            two = fast(x)
            want = net(x)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two) and torch.equal(one, want)


@pytest.mark.parametrize("k,stride,pad", [(3, 1, 1), (3, 2, 1), (2, 2, 0)])
def test_max_pool_same_values(k, stride, pad):
    """The cells' max pools run on the kernel for channels-last input: the same values as
    PyTorch's, NaN propagating and padding skipped; other layouts run PyTorch's."""
    from bats_cli.engine.bitwise import BitwiseMaxPool2d

    pool = torch.nn.MaxPool2d(k, stride=stride, padding=pad)
    fast = BitwiseMaxPool2d(pool)
    x = torch.randn(2, 37, 9, 11, generator=torch.Generator().manual_seed(k + stride))
    x[0, 3, 4, 4] = float("nan")
    x[1, 5, :3, :3] = float("-inf")
    x[1, 6] = -0.0
    for t in (x.contiguous(memory_format=torch.channels_last), x):
        want, got = pool(t), fast(t)
        assert torch.equal(torch.nan_to_num(got, nan=7.0), torch.nan_to_num(want, nan=7.0))
        assert torch.isnan(got).sum() == torch.isnan(want).sum() > 0
        assert got.is_contiguous(memory_format=torch.channels_last) == (t is not x)


def test_converted_model_deep_copies(kernel):
    fast = to_bitwise(_small_network("bats_c10", "cifar"))
    clone = copy.deepcopy(fast)
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(clone(x), fast(x))
    assert kernel.popcount_peak(0.01, 1) > 1e8  # binary MAC/s of the XOR + popcount loop


def test_step1_model_is_refused_and_auto_falls_back():
    torch.manual_seed(0)
    net = build_network(resolve_genotype("bats_c10"), in_channels=1, layers=3, channels=6).eval()
    with pytest.raises(UserInputError, match="binary weights"):
        to_bitwise(copy.deepcopy(net))
    notes = []
    model, used = apply_engine(net, "auto", warn=notes.append)
    assert model is net and used == "float" and len(notes) == 1 and "float" in notes[0]
    with pytest.raises(UserInputError, match="--engine"):
        apply_engine(net, "gpu")


def test_no_compiler_is_one_line(monkeypatch):
    monkeypatch.setattr(_build, "_compiler", lambda: None)
    _build.load_extension.cache_clear()
    try:
        with pytest.raises(EngineUnavailable, match="C\\+\\+ compiler"):
            _build.load_extension()
        torch.manual_seed(0)
        net = build_network(resolve_genotype("bats_c10"), in_channels=1, layers=3, channels=6)
        binarize_weights_(net)
        notes = []
        model, used = apply_engine(net.eval(), "auto", warn=notes.append)
        assert used == "float" and "C++ compiler" in notes[0]
        with pytest.raises(EngineUnavailable):
            apply_engine(net, "bitwise")
    finally:
        monkeypatch.undo()
        _build.load_extension.cache_clear()
    _build.load_extension()


@pytest.fixture(scope="module")
def real_image_artifact(cifar10_mini_dir, tmp_path_factory):
    """A tiny binarized network with BatchNorm statistics from real CIFAR-10 images, packed."""
    from bats_cli.data import AugmentConfig, build_datasets
    from bats_cli.models.modelio import network_settings
    from bats_cli.models.pack import save_packed

    torch.manual_seed(0)
    genotype = resolve_genotype("bats_c10")
    net = build_network(genotype, in_channels=3, num_classes=10, layers=3, channels=6)
    binarize_weights_(net)
    data = build_datasets("imagefolder", data_dir=cifar10_mini_dir, subset=64,
                          augment=AugmentConfig())
    x = torch.stack([data.train[i][0] for i in range(64)])
    net.train()
    with torch.no_grad():
        net(x)
    path = tmp_path_factory.mktemp("engine") / "c10.packed.safetensors"
    save_packed(net.eval(), path, settings=network_settings(net),
                data={"name": "imagefolder", "image_size": 32, "num_classes": 10,
                      "in_channels": 3, "network": "cifar"},
                run={"data_dir": str(cifar10_mini_dir)}, genotype_json=genotype.to_json(),
                source={"test": "engine"})
    return path


def test_same_predictions_on_real_images(real_image_artifact, cifar10_mini_dir):
    from bats_cli.training.evaluate import evaluate_checkpoint

    runs = {
        engine: evaluate_checkpoint(real_image_artifact, subset=200, batch_size=50, device="cpu",
                                    engine=engine, return_predictions=True, threads=1)
        for engine in ("float", "bitwise")
    }
    assert runs["bitwise"]["engine"] == "bitwise" and runs["float"]["engine"] == "float"
    assert runs["float"]["images"] == 200
    assert torch.equal(runs["float"]["predictions"], runs["bitwise"]["predictions"])
    assert runs["float"]["top1"] == runs["bitwise"]["top1"]
    assert runs["float"]["loss"] == pytest.approx(runs["bitwise"]["loss"], abs=1e-6)


def test_cli_engine(real_image_artifact, capsys, monkeypatch):
    code, out, err = cli(["eval", str(real_image_artifact), "--engine", "bitwise", "--subset", "50",
                          "--threads", "1", "--json"], capsys)
    assert code == 0, err
    result = json.loads(out)
    assert result["engine"] == "bitwise" and result["images"] == 50
    assert result["engine_simd"] == _build.load_extension().simd_path()
    code, out, err = cli(["eval", str(real_image_artifact), "--engine", "bitwise", "--subset", "50",
                          "--threads", "1", "--verbose"], capsys)
    assert code == 0, err
    assert "SIMD" in out and result["engine_simd"] in out
    code, out, err = cli(["eval", str(real_image_artifact), "--engine", "fast"], capsys)
    one_line_error(code, err, "--engine")
    monkeypatch.setattr(_build, "_compiler", lambda: None)
    _build.load_extension.cache_clear()
    try:
        code, out, err = cli(["eval", str(real_image_artifact), "--engine", "bitwise",
                              "--subset", "50"], capsys)
        one_line_error(code, err, "C++ compiler")
    finally:
        monkeypatch.undo()
        _build.load_extension.cache_clear()


def test_flops_profile(capsys):
    code, out, err = cli(["flops", "bats_c10", "--layers", "3", "--channels", "6", "--profile",
                          "--threads", "1", "--json"], capsys)
    assert code == 0, err
    prof = json.loads(out)["profile"]
    for engine in ("float", "bitwise"):
        shares = prof[engine]["share"]
        assert set(shares) == {"binary conv", "batchnorm", "activation", "pool",
                               "real conv/linear", "other"}
        assert sum(shares.values()) == pytest.approx(1.0, abs=1e-6)
        assert shares["binary conv"] > 0
    fl, bw = prof["float"]["layers"], prof["bitwise"]["layers"]
    # Each binary layer's BatchNorm and activation run inside its kernel pass (factorized reduce's
    # two convs are one layer); what stays float is the real stem's BatchNorm, pools, stem/classifier.
    assert bw["pool"] == fl["pool"] and bw["real conv/linear"] == fl["real conv/linear"]
    assert 0 < bw["binary conv"] <= fl["binary conv"] and bw["activation"] == 0
    assert bw["batchnorm"] == 1 < fl["batchnorm"]  # the stem's
    code, out, err = cli(["flops", "bats_c10", "--layers", "3", "--channels", "6", "--profile",
                          "--threads", "1"], capsys)
    assert code == 0 and "binary conv" in out and "bitwise ms" in out


def test_bench_quick_smoke():
    """bench/infer.py --quick runs and its last line is the JSON with both speedups."""
    import subprocess
    import sys
    from pathlib import Path

    bench = Path(__file__).resolve().parents[1] / "bench" / "infer.py"
    proc = subprocess.run([sys.executable, str(bench), "--quick", "--networks", "cifar",
                           "--no-onnx", "--threads", "1", "--json"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["binary_conv_speedup"] > 0 and result["end_to_end_speedup"] > 0
    assert result["networks"][0]["batch1"]["binary_convs_s"]["bitwise"] > 0
    assert result["simd"] == _build.load_extension().simd_path()
    assert 0 < result["peak_fraction"] < 1 and result["peak_binary_macs_per_s"] > 0
    assert "onnxruntime_speedup" in result  # None without onnxruntime (--no-onnx)
