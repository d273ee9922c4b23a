"""Params / FLOPs / BOPs / OPs / sizes (Table 5, Table 6, Table 9) and `bats flops`."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from helpers import cli, one_line_error
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from bats_cli.core.errors import UserInputError
from bats_cli.core.zoo import load_zoo_genotype
from bats_cli.layers.quant import STE_SIGN, QuantConv2d
from bats_cli.models.counting import BOPS_PER_FLOP, count_model, dataset_shape, model_meta
from bats_cli.models.networks import build_network


def _meta_network(name: str, **kwargs) -> nn.Module:
    # Counting needs shapes only: building on the meta device allocates nothing.
    with torch.device("meta"):
        return build_network(load_zoo_genotype(name), **kwargs)


# --------------------------------------------------------------------------- published sizes

# Float CIFAR-10 networks (20 cells, C = 36, auxiliary head excluded), as the DARTS code builds
# them. Published: DARTS 3.3 M (its log prints 3.349342), P-DARTS 3.4 M, AmoebaNet-A 3.2 M (the
# original TensorFlow network; the DARTS code's transcription of the cells is 3.1 M, see
# docs/flops.md).
PUBLISHED_REAL = {
    "darts_v2": (3.3e6, 3_349_342),
    "pdarts": (3.4e6, 3_433_798),
    "amoebanet_a": (3.2e6, 3_145_078),
}


@pytest.mark.parametrize("name", sorted(PUBLISHED_REAL))
def test_real_params_match_the_published_sizes(name):
    published, exact = PUBLISHED_REAL[name]
    report = count_model(_meta_network(name, real=True), (3, 32, 32))
    assert report.params == exact
    assert abs(report.params - published) <= (0.06e6 if name == "amoebanet_a" else 0.05e6)
    assert report.binary_params == 0 and report.bops == 0


def test_darts_imagenet_mobile_setting_size():
    # DARTS, ImageNet mobile setting (14 cells, C = 48): 4.7 M parameters.
    report = count_model(_meta_network("darts_v2", kind="imagenet", num_classes=1000, channels=48,
                                       real=True), (3, 224, 224))
    assert report.params == 4_718_752


def test_bats_imagenet_matches_table6_bops():
    shape = dataset_shape("imagenet")
    one = count_model(_meta_network("bats_c10", kind="imagenet", num_classes=1000), shape.input_size)
    assert abs(one.bops - 1.149e9) / 1.149e9 < 0.01
    # FLOPs: the real stem (81.3 M MACs) and the classifier (1.28 M); Table 6 says 0.805e8.
    assert one.flops == 81_285_120 + 1_280_000
    assert one.ops == one.flops + one.bops / 64
    wide = count_model(_meta_network("bats_c10", kind="imagenet", num_classes=1000, width="2x"),
                       shape.input_size)
    assert abs(wide.bops - 2.157e9) / 2.157e9 < 0.01


# --------------------------------------------------------------------------- against torch


def _flop_counter_macs(model: nn.Module, input_size) -> int:
    model.eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.randn(1, *input_size))
    total = counter.get_total_flops()
    assert total % 2 == 0
    return total // 2  # FlopCounterMode counts a multiply-accumulate as 2 FLOPs


@pytest.mark.parametrize(
    "name, kwargs, input_size",
    [
        ("darts_v2", dict(real=True), (3, 32, 32)),
        ("amoebanet_a", dict(real=True), (3, 32, 32)),
        ("bats_c10", dict(real=True), (3, 32, 32)),
        ("bats_c10", dict(), (3, 32, 32)),
        ("pdarts", dict(kind="imagenet", num_classes=20, channels=40, real=True), (3, 64, 64)),
        ("bats_c10", dict(kind="imagenet", num_classes=20, channels=40), (3, 64, 64)),
    ],
)
def test_counts_agree_with_torch_flop_counter(name, kwargs, input_size):
    torch.manual_seed(0)
    kwargs = dict(layers=5, channels=12, **kwargs) if "channels" not in kwargs else dict(layers=5, **kwargs)
    net = build_network(load_zoo_genotype(name), **kwargs)
    report = count_model(net, input_size)
    macs = _flop_counter_macs(net, input_size)
    assert report.flops + report.bops == macs
    if kwargs.get("real"):
        assert report.bops == 0 and report.flops == macs
    else:
        assert report.bops > report.flops


def test_counting_leaves_the_model_as_it_was():
    net = build_network(load_zoo_genotype("bats_c10"), layers=5, channels=12)
    net.train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    meta = model_meta(net, (3, 32, 32))
    assert net.training
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert net.meta == meta
    assert set(meta) == {"num_params", "flops", "bops", "ops", "size_fp32_bytes", "size_packed_bytes"}
    # A real pass gives the same numbers as the meta-device pass used by default.
    assert count_model(net, (3, 32, 32)).summary() == meta


# --------------------------------------------------------------------------- by hand


class _Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.body = QuantConv2d(8, 8, 3, padding=1, groups=2, input_quantizer=STE_SIGN)
        self.classifier = nn.Linear(8, 10)
        self.auxiliary_head = nn.Linear(8, 10)  # excluded everywhere

    def forward(self, x):
        x = self.body(self.bn(self.stem(x)))
        return self.classifier(x.mean(dim=(2, 3)))


def test_hand_counted_model_and_precision_summary():
    report = count_model(_Tiny(), (3, 8, 8))
    stem_macs, body_macs, fc_macs = 64 * 8 * 27, 64 * 8 * (4 * 9), 8 * 10
    assert report.flops == stem_macs + fc_macs
    assert report.bops == body_macs
    assert report.ops == stem_macs + fc_macs + body_macs / BOPS_PER_FLOP
    binary = 8 * 4 * 9
    floats = 216 + 16 + 8 + 90  # stem, BN affine, body scale, classifier with bias
    assert (report.binary_params, report.float_params, report.params) == (binary, floats, binary + floats)
    assert report.size_fp32_bytes == 4 * (binary + floats)
    assert report.size_packed_bytes == math.ceil(binary / 8) + 4 * (floats + 16)  # + BN statistics
    rows = {r["precision"]: r for r in report.precision_summary()}
    assert rows["1-bit"] == {"precision": "1-bit", "params": binary, "macs": body_macs,
                             "memory_bytes": 36}
    assert rows["32-bit"] == {"precision": "32-bit", "params": floats, "macs": stem_macs + fc_macs,
                              "memory_bytes": 4 * (floats + 16)}
    ops = {r["op"]: r for r in report.breakdown("op")}
    assert ops["stem"]["flops"] == stem_macs and ops["body"]["bops"] == body_macs


def test_precision_summary_of_a_bats_network():
    report = count_model(_meta_network("bats_c10", layers=5, channels=12), (3, 32, 32))
    rows = {r["precision"]: r for r in report.precision_summary()}
    assert rows["1-bit"]["params"] + rows["32-bit"]["params"] == report.params
    assert rows["1-bit"]["macs"] == report.bops and rows["32-bit"]["macs"] == report.flops
    assert rows["1-bit"]["memory_bytes"] + rows["32-bit"]["memory_bytes"] == report.size_packed_bytes
    # Pinned (regression): the tiny BATS CIFAR network at C = 12, 5 cells.
    assert (report.params, report.binary_params, report.flops, report.bops) == PINNED_TINY_BATS
    stages = [r["stage"] for r in report.breakdown("stage")]
    assert stages == ["stem", "cell 1 (stage 1)", "cell 2 (reduction 1)", "cell 3 (stage 2)",
                      "cell 4 (reduction 2)", "cell 5 (stage 3)", "classifier"]
    kinds = {r["op"] for r in report.breakdown("op")}
    assert {"stem", "preprocess 1x1", "factorized reduce", "group_conv_5x5", "classifier"} <= kinds
    assert sum(r["bops"] for r in report.breakdown("stage")) == report.bops


# params, binary params, FLOPs, BOPs; FLOPs + BOPs agree with FlopCounterMode (test above).
PINNED_TINY_BATS = (217_774, 209_160, 997_248, 29_933_568)


def test_bad_input_size_is_a_user_input_error():
    net = build_network(load_zoo_genotype("bats_c10"), layers=5, channels=12)
    with pytest.raises(UserInputError):
        count_model(net, (3, 32))
    with pytest.raises(UserInputError):
        dataset_shape("mnist")


# --------------------------------------------------------------------------- CLI


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "120"}


@pytest.mark.slow
def test_cli_json_subprocess():
    out = subprocess.run([sys.executable, "-m", "bats_cli", "flops", "--json"], capture_output=True,
                         text=True, env=_env(), timeout=300)
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert {"params", "flops", "bops", "ops", "size_fp32_bytes", "size_packed_bytes"} <= set(data)
    assert data["genotype"] == "bats_c10" and data["dataset"] == "cifar10"
    assert data["params"] == data["binary_params"] + data["float_params"]
    assert data["ops"] == data["flops"] + data["bops"] / 64


def test_cli_tables_and_verbose(capsys):
    code, out, err = cli(["flops", "darts_v2", "--layers", "5", "--channels", "12", "--verbose"], capsys)
    assert code == 0, err
    for text in ("params", "FLOPs", "BOPs", "OPs", "per stage", "per op", "sep_conv_3x3", "1-bit"):
        assert text in out


@pytest.mark.parametrize(
    "args, message",
    [
        (["flops", "--dataset", "mnist"], "unknown --dataset"),
        (["flops", "--width", "3x"], "unknown --width"),
        (["flops", "--layers", "0"], "--layers"),
        (["flops", "--width", "large", "--channels", "12"], "not both"),
        (["flops", "bats_c10", "--channels", "10"], "cannot be split"),
        (["flops", "no_such_genotype"], "neither a genotype file"),
        (["flops", "missing.safetensors"], "missing.safetensors"),
    ],
)
def test_cli_bad_input_is_one_line_exit_2(args, message, capsys):
    one_line_error(*cli(args, capsys)[::2], message)


def _write_checkpoint(path, *, kind, config, genotype_json, tensors=None):
    from safetensors.torch import save_file

    metadata = {"bats_format": "1", "bats_kind": kind, "bats_config": json.dumps(config)}
    if genotype_json is not None:
        metadata["bats_genotype"] = genotype_json
    save_file(tensors or {"x": torch.zeros(4)}, str(path), metadata=metadata)


def test_cli_reads_a_packed_checkpoint_header(tmp_path, capsys):
    g = load_zoo_genotype("bats_c10")
    path = tmp_path / "model.packed.safetensors"
    # The layout bats train / bats pack record: run, network settings, data spec.
    network = {"kind": "cifar", "num_classes": 100, "in_channels": 3, "channels": 12, "layers": 5,
               "width": "1x", "activation": "prelu", "channels_per_group": 3,
               "group_policy": "groups", "reduce_shortcut": "avgpool", "stem_groups": 4,
               "auxiliary": False, "drop_path": 0.0, "binary_activations": True,
               "binary_weights": True, "space": "bats"}
    data = {"name": "cifar100", "num_classes": 100, "image_size": 32, "in_channels": 3,
            "network": "cifar"}
    _write_checkpoint(path, kind="packed", genotype_json=g.to_json(),
                      config={"run": {"epochs": 1}, "network": network, "data": data},
                      tensors={"w": torch.zeros(1000, dtype=torch.uint8)})
    code, out, err = cli(["flops", str(path), "--json"], capsys)
    assert code == 0, err
    data = json.loads(out)
    assert data["dataset"] == "cifar100" and data["network"]["num_classes"] == 100
    assert data["network"]["channels"] == 12 and data["network"]["layers"] == 5
    assert data["checkpoint"]["kind"] == "packed"
    assert data["checkpoint"]["file_bytes"] == path.stat().st_size
    assert data["checkpoint"]["fp32_bytes"] == data["size_fp32_bytes"]
    assert data["checkpoint"]["compression"] == data["size_fp32_bytes"] / path.stat().st_size
    expected = count_model(_meta_network("bats_c10", num_classes=100, layers=5, channels=12), (3, 32, 32))
    assert data["params"] == expected.params
    code, out, err = cli(["flops", str(path)], capsys)
    assert code == 0 and "packed vs fp32" in out
    # Flags override the recorded settings; another data set drops its class count.
    code, out, err = cli(["flops", str(path), "--json", "--dataset", "cifar10", "--real"], capsys)
    data = json.loads(out)
    assert data["network"]["num_classes"] == 10 and data["network"]["real"] and data["bops"] == 0
    assert data["network"]["channels"] == 12


def test_cli_checkpoint_without_genotype_is_refused(tmp_path, capsys):
    path = tmp_path / "search.safetensors"
    _write_checkpoint(path, kind="search", genotype_json=None, config={})
    code, out, err = cli(["flops", str(path)], capsys)
    # A search checkpoint without a recorded genotype is derived from its α, which this one lacks.
    assert code == 2 and "search checkpoint without usable architecture state" in err
    path = tmp_path / "train.safetensors"
    _write_checkpoint(path, kind="train", genotype_json=None, config={"network": {"arch": "cells"}})
    code, out, err = cli(["flops", str(path)], capsys)
    assert code == 2 and "no genotype" in err
