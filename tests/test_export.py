"""`bats export` to ONNX and `bats eval FILE.onnx`: standard ops, metadata, same predictions."""

from __future__ import annotations

import builtins
import json

import pytest
import torch
from helpers import cli, one_line_error

from bats_cli.core.zoo import resolve_genotype
from bats_cli.layers.quant import STE_SIGN, binarize_weights_, quant_convs
from bats_cli.models.modelio import model_tensors, network_settings
from bats_cli.models.networks import build_network
from bats_cli.models.pack import save_packed
from bats_cli.storage.checkpoint import save_checkpoint

onnx = pytest.importorskip("onnx", reason="the export extra (CI installs it through .[dev])")
ort = pytest.importorskip("onnxruntime")


# Every op a bats network may export to; all in the default ONNX domain.
STANDARD_OPS = {
    "Add", "AveragePool", "BatchNormalization", "Concat", "Constant", "Conv", "Flatten", "Gemm",
    "GlobalAveragePool", "GreaterOrEqual", "Identity", "MaxPool", "Mul", "Pad", "PRelu", "Relu",
    "Slice", "Where",
}
DATA = {"name": "fashion-mini", "image_size": 32, "num_classes": 10, "in_channels": 1,
        "network": "cifar"}


def _network(genotype="bats_c10", *, binary_weights=True):
    """A tiny network whose BatchNorm statistics come from real fashion-mini images."""
    from bats_cli.data import AugmentConfig, build_datasets

    torch.manual_seed(0)
    g = resolve_genotype(genotype)
    net = build_network(g, in_channels=1, num_classes=10, layers=3, channels=6)
    if binary_weights:
        binarize_weights_(net)
    data = build_datasets("fashion-mini", subset=64, augment=AugmentConfig())
    net.train()
    with torch.no_grad():
        net(torch.stack([data.train[i][0] for i in range(64)]))
    return g, net.eval()


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    g, net = _network()
    packed = save_packed(net, root / "m.packed.safetensors", settings=network_settings(net),
                         data=DATA, run={"seed": 0}, genotype_json=g.to_json(), source={})
    g1, step1 = _network(binary_weights=False)
    train = save_checkpoint(root / "step1.safetensors", model_tensors(step1), kind="train",
                            config={"network": network_settings(step1), "data": DATA,
                                    "run": {"seed": 0}},
                            epoch=1, genotype_json=g1.to_json())
    return root, packed, train


def _export(source, out, capsys):
    """``bats export SOURCE -o OUT --json``, which must succeed; its JSON result."""
    code, stdout, err = cli(["export", str(source), "-o", str(out), "--json"], capsys)
    assert code == 0, err
    return json.loads(stdout)


def test_export_is_standard_ops_with_metadata_and_dynamic_batch(artifacts, capsys):
    root, packed, _ = artifacts
    out = root / "m.onnx"
    result = _export(packed, out, capsys)
    model = onnx.load(str(out))
    onnx.checker.check_model(model)
    ops = {node.op_type for node in model.graph.node}
    assert ops <= STANDARD_OPS, ops - STANDARD_OPS
    assert all(node.domain in ("", "ai.onnx") for node in model.graph.node)
    n_binary = result["binary_convs"]
    assert result["ops"]["Where"] == n_binary  # the sign of every binary conv's input
    assert result["ops"]["Conv"] == n_binary + 1  # plus the real stem
    assert result["ops"]["Mul"] == n_binary  # α after each binary conv
    # The kernels of binary convs are ±1 initializers.
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    pm1 = [a for a in inits.values() if a.ndim == 4 and set(a.flatten().tolist()) <= {-1.0, 1.0}]
    assert len(pm1) == n_binary
    props = {p.key: p.value for p in model.metadata_props}
    assert json.loads(props["bats_genotype"])["name"] == "bats_c10"
    config = json.loads(props["bats_config"])
    assert config["data"]["name"] == "fashion-mini" and config["network"]["auxiliary"] is False
    assert result["max_abs_diff"] < 1e-4
    # Dynamic batch: 1 and 3 images through onnxruntime agree with PyTorch's arg-max.
    from bats_cli.models.modelio import unpack

    torch_model, _ = unpack(packed)
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    for batch in (1, 3):
        x = torch.randn(batch, 1, 32, 32)
        got = session.run(None, {"images": x.numpy()})[0]
        with torch.no_grad():
            want = torch_model(x)
        assert got.shape == (batch, 10)
        assert torch.equal(torch.from_numpy(got).argmax(1), want.argmax(1))


def test_onnx_eval_gives_the_packed_top1(artifacts, capsys):
    root, packed, _ = artifacts
    out = root / "same.onnx"
    assert cli(["export", str(packed), "-o", str(out)], capsys)[0] == 0
    from bats_cli.training.evaluate import evaluate_checkpoint
    from bats_cli.training.onnx_eval import evaluate_onnx

    a = evaluate_checkpoint(packed, device="cpu", threads=1, return_predictions=True)
    b = evaluate_onnx(out, threads=1, return_predictions=True)
    assert a["images"] == b["images"] == 500 and b["dataset"] == "fashion-mini"
    assert torch.equal(a["predictions"], b["predictions"])
    assert a["top1"] == b["top1"] and a["top5"] == b["top5"]
    code, stdout, err = cli(["eval", str(out), "--json", "--subset", "100"], capsys)
    assert code == 0, err
    assert json.loads(stdout)["engine"] == "onnxruntime"


def test_export_step1_checkpoint_and_binarize_kind(artifacts, capsys):
    root, _, train = artifacts
    out = root / "step1.onnx"
    result = _export(train, out, capsys)
    assert result["kind"] == "train" and result["max_abs_diff"] < 1e-4
    # Real weights: no ±1 kernels, but the sign of the activations is still a Where.
    assert result["ops"]["Where"] == result["binary_convs"]


def test_refusals(artifacts, capsys, monkeypatch, tmp_path):
    root, packed, _ = artifacts
    out = tmp_path / "x.onnx"
    out.write_bytes(b"keep me")
    code, _, err = cli(["export", str(packed), "-o", str(out)], capsys)
    one_line_error(code, err, "exists", "--force")
    code, _, err = cli(["export", str(packed), "-o", str(packed), "--force"], capsys)
    one_line_error(code, err, "own input")
    assert out.read_bytes() == b"keep me"
    assert cli(["export", str(packed), "-o", str(out), "--force"], capsys)[0] == 0
    onnx.checker.check_model(onnx.load(str(out)))
    code, _, err = cli(["export", str(tmp_path / "missing.safetensors"), "-o", str(tmp_path / "y.onnx")], capsys)
    one_line_error(code, err, "no such")
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not onnx")
    code, _, err = cli(["eval", str(bad)], capsys)
    one_line_error(code, err, "bad.onnx")

    real_import = builtins.__import__

    def no_onnx(name, *args, **kwargs):
        if name == "onnx" or name.startswith("onnx."):
            raise ImportError("No module named 'onnx'", name="onnx")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_onnx)
    code, _, err = cli(["export", str(packed), "-o", str(tmp_path / "z.onnx")], capsys)
    one_line_error(code, err, "pip install -e '.[export]'")
    code, _, err = cli(["eval", str(out)], capsys)
    one_line_error(code, err, "pip install -e '.[export]'")


@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.jit.trace is deprecated; still the simplest probe
def test_quantizer_inference_path_matches_the_ste_and_training_is_unchanged():
    x = torch.tensor([-1.5, -0.0, 0.0, 0.3, 2.0], requires_grad=True)
    with torch.no_grad():
        inference = STE_SIGN(x)
    training = STE_SIGN(x)
    assert torch.equal(inference, training)
    assert training.grad_fn is not None and "SignSTE" in type(training.grad_fn).__name__
    training.sum().backward()
    assert torch.equal(x.grad, torch.tensor([0.0, 1.0, 1.0, 1.0, 0.0]))
    # A traced inference graph holds plain ops, no opaque Python autograd function.
    _, net = _network()
    conv = quant_convs(net)[0][1]
    with torch.no_grad():
        graph = torch.jit.trace(conv, torch.randn(1, conv.in_channels, 8, 8)).graph
    kinds = {node.kind() for node in graph.nodes()}
    assert "prim::PythonOp" not in kinds and "aten::where" in kinds
