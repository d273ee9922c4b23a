"""Table 5's binary ResNet-18 baseline: its shape and size, its binary convs, and the pipeline
(train -> binarize -> eval / flops / export) on a network with no genotype."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import cli, one_line_error
from torch import nn

from bats_cli.layers.quant import QuantConv2d, binarize_weights_, quant_convs
from bats_cli.models.resnet import build_resnet

# He et al.'s ResNet-18 in its CIFAR form (3x3 stride-1 stem, no max-pool), 10 classes.
STANDARD_CIFAR_PARAMS = 11_173_962
STANDARD_IMAGENET_PARAMS = 11_689_512


def _reference(kind: str, num_classes: int) -> nn.Module:
    """torchvision's real-valued ResNet-18, in the CIFAR form when asked."""
    from torchvision.models import resnet18

    ref = resnet18(num_classes=num_classes)
    if kind == "cifar":
        ref.conv1 = nn.Conv2d(3, 64, 3, padding=1, bias=False)
        ref.maxpool = nn.Identity()
    return ref


def _weights(model: nn.Module) -> list[tuple[int, ...]]:
    """Shapes of every conv / linear weight, in the order the layers are built."""
    return [tuple(m.weight.shape) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def _binarization_params(model: nn.Module) -> int:
    """What §3's binary layer adds to a conv: α per output channel and the PReLU slopes."""
    return sum(p.numel() for n, p in model.named_parameters()
               if n.endswith(".scale") or n.endswith(".act.weight"))


@pytest.mark.parametrize("kind, classes, standard", [("cifar", 10, STANDARD_CIFAR_PARAMS),
                                                      ("imagenet", 1000, STANDARD_IMAGENET_PARAMS)])
def test_resnet18_has_the_standard_layers_and_size(kind, classes, standard):
    ref = _reference(kind, classes)
    assert sum(p.numel() for p in ref.parameters()) == standard
    net = build_resnet(kind=kind, num_classes=classes)
    # Every conv and the classifier: the standard ResNet-18's shapes, one for one.
    assert _weights(net) == _weights(ref)
    # The binary layer normalises a conv's *input* (BatchNorm, sign, conv, activation: §3), so the
    # first conv of stages 2-4 has a BatchNorm over C/2 channels where the standard has C after it.
    bn_input_side = -2 * (64 + 128 + 256)
    total = sum(p.numel() for p in net.parameters())
    assert _binarization_params(net) == 2 * 3_840
    assert total == standard + bn_input_side + _binarization_params(net)
    if kind == "cifar":
        assert total == 11_180_746 and round(total / 1e6, 1) == 11.2  # the paper's "11.2 M"


def test_the_imagenet_form_and_the_real_parts():
    # Forward, backward and the recorded settings: tests/test_models.py.
    net = build_resnet(channels=4, num_classes=7)
    assert build_resnet(kind="imagenet", channels=4, num_classes=5)(torch.randn(2, 3, 64, 64)).shape == (2, 5)
    assert build_resnet(channels=8).layer4[0].conv1.conv.out_channels == 64  # stages double the width
    # 16 binary block convs; the stem, the 3 downsampling shortcuts and the classifier stay real.
    binary = dict(quant_convs(net))
    assert len(binary) == 16 and all(n.startswith("layer") for n in binary)
    real_convs = [n for n, m in net.named_modules() if isinstance(m, nn.Conv2d) and n not in binary]
    assert real_convs == ["stem.0", "layer2.0.downsample.0", "layer3.0.downsample.0", "layer4.0.downsample.0"]
    assert not any(isinstance(net.get_submodule(n), QuantConv2d) for n in real_convs)


def test_step1_has_real_weights_and_binarize_makes_them_binary():
    torch.manual_seed(0)
    net = build_resnet(channels=4).eval()
    convs = quant_convs(net)
    # Step 1 (§4.3): binary activations, real weights.
    assert all(c.input_quantizer is not None and c.kernel_quantizer is None for _, c in convs)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        before = net(x)
    assert binarize_weights_(net) == 16
    for _, conv in convs:
        w = conv.quantized_weight()
        assert conv.kernel_quantizer is not None and set(w.unique().tolist()) <= {-1.0, 1.0}
    with torch.no_grad():
        after = net(x)
    assert after.shape == before.shape and not torch.equal(after, before)
    from bats_cli.models.counting import count_model

    report = count_model(net, (3, 16, 16))
    assert report.binary_params == sum(c.weight.numel() for _, c in convs)
    assert report.bops > 0 and report.flops > 0


def test_unknown_model_names_and_cell_options_are_one_line_errors(capsys, tmp_path):
    code, _, err = cli(["train", "resnet99", "--preset", "tiny", "--out", str(tmp_path / "x")], capsys)
    one_line_error(code, err, "neither a genotype file nor a bundled genotype", "models: resnet18")
    code, _, err = cli(["train", "resnet18", "--preset", "tiny", "--layers", "5", "--out", str(tmp_path / "y")],
                       capsys)
    one_line_error(code, err, "--layers", "only apply to cell networks", "resnet18")
    code, _, err = cli(["flops", "resnet18", "--layers", "5"], capsys)
    one_line_error(code, err, "--layers")
    code, _, err = cli(["genotype", "show", "resnet18"], capsys)
    one_line_error(code, err, "not a cell network")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_settings_without_arch_are_cells():
    from bats_cli.core.archs import arch_of
    from bats_cli.core.errors import UserInputError
    from bats_cli.models.modelio import build_from_settings, network_settings

    assert arch_of({}) == "cells"
    settings = network_settings(build_resnet(channels=4))
    assert settings["arch"] == "resnet18" and "layers" not in settings
    cells = {k: v for k, v in settings.items() if k != "arch"}
    # No arch: read as a cell network, whose settings (layers, ...) a ResNet's record lacks.
    with pytest.raises(UserInputError, match="lacks network settings: layers"):
        build_from_settings(None, cells)
    with pytest.raises(UserInputError, match="no auxiliary tower"):
        build_from_settings(None, {**settings, "auxiliary": True})  # not silently dropped


@pytest.fixture(scope="module")
def pipeline(tiny_checkpoint):
    """`bats train resnet18` -> `bats binarize` on fashion-mini, smallest settings (tests/conftest.py)."""
    return tiny_checkpoint("resnet18")


def test_train_binarize_eval_on_a_network_without_genotype(pipeline, capsys):
    root, train, binarize = pipeline
    assert train["genotype"] == "resnet18" and train["network"]["arch"] == "resnet18"
    assert train["network"]["channels"] == 4 and train["parameters"] == 44_974
    assert binarize["binary_convs"] == 16 and binarize["genotype"] == "resnet18"
    # The packed 1-bit file scores what binarize measured on the same 256 test images.
    code, out, err = cli(["eval", binarize["packed"], "--json", "--subset", "256", "--threads", "1"], capsys)
    assert code == 0, err
    ev = json.loads(out)
    assert ev["genotype"] == "resnet18" and ev["weights"] == "binary" and ev["images"] == 256
    assert ev["top1"] == pytest.approx(binarize["final_top1"])


def test_flops_of_a_resnet_checkpoint(pipeline, capsys):
    root, train, binarize = pipeline
    code, out, err = cli(["flops", str(root / "train" / "last.safetensors"), "--json"], capsys)
    assert code == 0, err
    step1 = json.loads(out)
    assert step1["genotype"] == "resnet18" and step1["params"] == train["parameters"]
    assert step1["input_size"] == [1, 32, 32] and step1["bops"] > 0
    code, out, err = cli(["flops", binarize["packed"], "--json"], capsys)
    assert code == 0, err
    packed = json.loads(out)
    assert packed["bops"] == step1["bops"] and packed["checkpoint"]["kind"] == "packed"
    # The name alone counts the paper's network: CIFAR-10, base width 64.
    code, out, err = cli(["flops", "resnet18", "--json"], capsys)
    assert code == 0, err
    paper = json.loads(out)
    assert paper["params"] == 11_180_746 and paper["network"]["channels"] == 64


def test_resume_refuses_another_network(pipeline, capsys):
    root, _, _ = pipeline
    code, _, err = cli(["train", "bats_c10", "--preset", "tiny", "--epochs", "1", "--subset", "256",
                        "--out", str(root / "train"), "--resume"], capsys)
    one_line_error(code, err, "cannot resume", "resnet18")


def test_export_of_a_resnet(pipeline, tmp_path):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from bats_cli.training.export import export_model
    from bats_cli.training.onnx_eval import load_onnx

    _, _, binarize = pipeline
    result = export_model(binarize["packed"], tmp_path / "m.onnx")
    assert result["binary_convs"] == 16 and result["max_abs_diff"] < 1e-4
    loaded = load_onnx(tmp_path / "m.onnx")
    assert loaded.genotype is None and loaded.name == "resnet18"


@pytest.mark.slow
def test_bitwise_engine_runs_the_resnet():
    """The engine is generic over binary convs: all 16 of the ResNet's run as XNOR + popcount."""
    import copy

    from bats_cli.engine import EngineUnavailable, _build, to_bitwise
    from bats_cli.engine.bitwise import binary_conv_names, bitwise_conv_count

    try:
        _build.load_extension()
    except EngineUnavailable as exc:  # pragma: no cover - test_engine.py requires the kernel
        pytest.skip(f"no bitwise kernel here: {exc}")
    torch.manual_seed(0)
    net = build_resnet(channels=8).eval()
    binarize_weights_(net)
    fast = to_bitwise(copy.deepcopy(net))
    assert bitwise_conv_count(fast) == 16  # basic blocks are fused, so count convs, not modules
    assert binary_conv_names(fast) == []  # no float binary conv left behind
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), net(x), rtol=1e-4, atol=1e-4)
