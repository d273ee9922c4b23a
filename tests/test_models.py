"""The contract every registered model keeps (bats_cli.models.registry), parametrized over list_models():
it builds by name at a tiny size, runs forward and backward, counts at its paper size, and its
recorded settings rebuild it, packed weights included."""

from __future__ import annotations

import json

import pytest
import torch

from bats_cli.core.errors import UserInputError
from bats_cli.core.zoo import resolve_genotype
from bats_cli.layers.quant import binarize_weights_, quant_convs
from bats_cli.models.counting import count_model
from bats_cli.models.modelio import build_from_settings, network_settings, unpack
from bats_cli.models.pack import save_packed
from bats_cli.models.registry import check_options, create_model, get_model, list_models

# Tiny sizes (a model registered without one fails here) and the paper-size parameter counts
# asserted by test_counting.py (DARTS V2's float cells) and test_resnet.py (the paper's "11.2 M").
TINY = {"cells": {"layers": 3, "channels": 6}, "resnet18": {"channels": 4}}
PAPER = {"cells": ({"real": True}, 3_349_342), "resnet18": ({}, 11_180_746)}


def _genotype(arch: str, name: str = "bats_c10"):
    return resolve_genotype(name) if get_model(arch).genotype else None


def _tiny(arch: str, **settings):
    torch.manual_seed(0)
    return create_model(arch, _genotype(arch), in_channels=1, **TINY[arch], **settings)


def test_the_registry_lists_both_models():
    assert list_models() == ["cells", "resnet18"]


@pytest.mark.parametrize("arch", list_models())
def test_forward_gives_logits_per_image(arch):
    model = _tiny(arch, num_classes=7).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 1, 16, 16))
    assert out.shape == (2, 7) and torch.isfinite(out).all()


@pytest.mark.parametrize("arch", list_models())
def test_backward_reaches_every_parameter(arch):
    model = _tiny(arch).train()
    out = model(torch.randn(4, 1, 16, 16))
    logits = out[0] if isinstance(out, tuple) else out  # cells in training: (logits, auxiliary logits)
    torch.nn.functional.cross_entropy(logits, torch.arange(4)).backward()
    aux = "auxiliary_head."  # trained by its own loss only
    missing = [n for n, p in model.named_parameters() if p.grad is None and not n.startswith(aux)]
    assert missing == []
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.slow  # a paper-size forward on the meta device: up to a minute on a shared CPU
@pytest.mark.parametrize("arch", list_models())
def test_paper_size_counts_the_known_parameters(arch):
    settings, params = PAPER[arch]
    with torch.device("meta"):  # shapes only: nothing allocated
        model = create_model(arch, _genotype(arch, "darts_v2"), auxiliary=None, **settings)
    assert count_model(model, (3, 32, 32)).params == params


@pytest.mark.parametrize("arch", list_models())
def test_recorded_settings_rebuild_the_same_network(arch):
    model = _tiny(arch, activation="rprelu")
    settings = json.loads(json.dumps(network_settings(model)))  # as a checkpoint stores them
    assert settings["arch"] == arch
    again = build_from_settings(_genotype(arch), settings)
    assert type(again) is type(model)
    assert {k: v.shape for k, v in again.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}
    assert network_settings(again) == network_settings(model)


@pytest.mark.parametrize("arch", list_models())
def test_packed_weights_unpack_to_the_same_outputs(arch, tmp_path):
    model = _tiny(arch, auxiliary=None)
    binarize_weights_(model)
    model.eval()
    genotype = _genotype(arch)
    path = save_packed(model, tmp_path / "m.packed.safetensors", settings=network_settings(model),
                       data={"name": "fashion-mini"}, run={}, source={},
                       genotype_json=genotype.to_json() if genotype is not None else None)
    unpacked, meta = unpack(path)
    assert meta.kind == "packed" and len(quant_convs(unpacked)) == len(quant_convs(model))
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        assert torch.equal(unpacked(x), model(x))


@pytest.mark.parametrize("arch", list_models())
def test_none_keeps_the_default_and_unknown_settings_are_refused(arch):
    assert network_settings(_tiny(arch, activation=None))["activation"] == "prelu"
    with pytest.raises(UserInputError, match=f"{arch} does not take the setting"):
        _tiny(arch, depth_multiplier=2)


def test_unknown_names_list_the_known_ones():
    with pytest.raises(UserInputError, match="unknown network arch 'resnet99'; known: cells, resnet18"):
        create_model("resnet99")
    with pytest.raises(UserInputError, match="needs a genotype"):
        create_model("cells", layers=3)


def test_settings_of_another_model_are_one_line_errors():
    with pytest.raises(UserInputError, match="--layers, --drop-path only apply to cell networks, not to resnet18"):
        check_options("resnet18", {"layers": 5, "drop_path": 0.1, "width": "2x"},
                      {"layers": None, "drop_path": 0.0, "width": "1x"})
    check_options("cells", {"layers": 5, "drop_path": 0.1}, {"layers": None, "drop_path": 0.0})
    check_options("resnet18", {"layers": None, "auxiliary": False}, {"layers": None, "auxiliary": True})
