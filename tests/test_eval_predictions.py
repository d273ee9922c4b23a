"""`bats eval --output/--predictions`: per-image predictions (.npy), n_images, top1_se, images_sha256."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch
from helpers import cli, one_line_error

from bats_cli.core.zoo import resolve_genotype
from bats_cli.layers.quant import binarize_weights_
from bats_cli.models.modelio import model_tensors, network_settings
from bats_cli.models.networks import build_network
from bats_cli.models.pack import save_packed
from bats_cli.storage.checkpoint import save_checkpoint
from bats_cli.training.evaluate import load_predictions

FASHION = {"name": "fashion-mini", "image_size": 32, "num_classes": 10, "in_channels": 1,
           "network": "cifar"}


def _network(seed: int, *, in_channels=1, num_classes=10, binary_weights=True, images=None):
    """A tiny network with BatchNorm statistics from a batch of images (random unless given)."""
    torch.manual_seed(seed)
    net = build_network(resolve_genotype("bats_c10"), in_channels=in_channels,
                        num_classes=num_classes, layers=3, channels=6)
    if binary_weights:
        binarize_weights_(net)
    x = images if images is not None else torch.randn(32, in_channels, 32, 32)
    net.train()
    with torch.no_grad():
        net(x)
    return net.eval()


def _fashion_images():
    from bats_cli.data import AugmentConfig, build_datasets

    data = build_datasets("fashion-mini", subset=32, augment=AugmentConfig())
    return torch.stack([data.train[i][0] for i in range(32)])


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Two packed artifacts (different weights), a train and a binarize checkpoint, fashion-mini."""
    root = tmp_path_factory.mktemp("predictions")
    images = _fashion_images()
    g = resolve_genotype("bats_c10").to_json()
    out = {}
    for name, seed in (("a", 0), ("b", 1)):
        net = _network(seed, images=images)
        out[name] = save_packed(net, root / f"{name}.packed.safetensors",
                                settings=network_settings(net), data=FASHION, run={"seed": 0},
                                genotype_json=g, source={})
    for kind, binary in (("train", False), ("binarize", True)):
        net = _network(2, binary_weights=binary, images=images)
        out[kind] = save_checkpoint(root / f"{kind}.safetensors", model_tensors(net), kind=kind,
                                    config={"network": network_settings(net), "data": FASHION,
                                            "run": {"seed": 0}},
                                    epoch=1, genotype_json=g)
    return out


def _eval(capsys, model, *args):
    code, out, err = cli(["eval", str(model), "--threads", "1", "--json", *args], capsys)
    assert code == 0, err
    return json.loads(out)


def _check_files(json_path):
    """eval.json's predictions file: shape, dtype, and top-1 recomputed from it equals eval.json's."""
    result = json.loads(json_path.read_text())
    npy = json_path.parent / result["predictions"]
    rows = np.load(npy, allow_pickle=False)
    assert rows.shape == (2, result["n_images"]) and rows.dtype == np.int16
    predicted, labels = load_predictions(npy)
    assert result["n_images"] == result["images"]
    # Exactly: the same count over the same n as evaluate_model's.
    assert 100.0 * float((predicted == labels).sum()) / len(labels) == result["top1"]
    p = result["top1"] / 100
    assert result["top1_se"] == pytest.approx(100 * math.sqrt(p * (1 - p) / result["n_images"]))
    assert len(result["images_sha256"]) == 64
    assert not list(json_path.parent.glob("*.tmp")) and not list(json_path.parent.glob(".*"))
    return result, rows


def test_output_writes_predictions_beside_it(models, capsys, tmp_path):
    printed = _eval(capsys, models["a"], "--subset", "100", "--output", str(tmp_path / "eval.json"))
    result, rows = _check_files(tmp_path / "eval.json")
    assert result["predictions"] == "eval.predictions.npy" == printed["predictions"]
    assert result["n_images"] == 100 and "labels" not in result
    assert {p.name for p in tmp_path.iterdir()} == {"eval.json", "eval.predictions.npy"}
    # Labels in evaluation order: the test split's labels of the chosen subset.
    from bats_cli.data import AugmentConfig, build_datasets, targets_of

    test = build_datasets("fashion-mini", subset=100, augment=AugmentConfig(), seed=0).test
    assert np.array_equal(rows[1], targets_of(test))


def test_every_kind_of_model_file(models, capsys, tmp_path):
    for kind in ("train", "binarize"):
        _eval(capsys, models[kind], "--subset", "60", "--output", str(tmp_path / kind / "eval.json"))
        result, _ = _check_files(tmp_path / kind / "eval.json")
        assert result["kind"] == kind


@pytest.mark.slow
def test_same_images_same_hash_other_subset_other_hash(models, capsys, tmp_path):
    a = _eval(capsys, models["a"], "--subset", "100", "--output", str(tmp_path / "a.json"))
    b = _eval(capsys, models["b"], "--subset", "100", "--output", str(tmp_path / "b.json"))
    c = _eval(capsys, models["a"], "--subset", "50", "--output", str(tmp_path / "c.json"))
    full = _eval(capsys, models["a"])
    assert a["images_sha256"] == b["images_sha256"]
    assert len({a["images_sha256"], c["images_sha256"], full["images_sha256"]}) == 3
    pa, la = load_predictions(tmp_path / a["predictions"])
    pb, lb = load_predictions(tmp_path / b["predictions"])
    assert np.array_equal(la, lb) and not np.array_equal(pa, pb)  # different networks, same images
    # Without --output and --predictions nothing is written, but the identity is reported.
    assert "predictions" not in full and full["n_images"] == 500 and full["top1_se"] > 0


@pytest.mark.slow
def test_bitwise_and_float_write_identical_files(models, capsys, tmp_path):
    from bats_cli.engine import EngineUnavailable, _build

    try:
        _build.load_extension()
    except EngineUnavailable as exc:  # pragma: no cover - CI machines have a compiler
        pytest.skip(f"no bitwise kernel here: {exc}")
    for engine in ("float", "bitwise"):
        r = _eval(capsys, models["a"], "--subset", "100", "--engine", engine,
                  "--output", str(tmp_path / f"{engine}.json"))
        assert r["engine"] == engine
    assert (tmp_path / "float.predictions.npy").read_bytes() == (tmp_path / "bitwise.predictions.npy").read_bytes()
    _check_files(tmp_path / "bitwise.json")


def test_predictions_option_without_output_and_refusals(models, capsys, tmp_path):
    target = tmp_path / "sub" / "p.npy"
    r = _eval(capsys, models["a"], "--subset", "40", "--predictions", str(target))
    assert r["predictions"] == str(target) and list(target.parent.iterdir()) == [target]
    predicted, labels = load_predictions(target)
    assert 100.0 * float((predicted == labels).sum()) / len(labels) == r["top1"]
    # --predictions with --output: named relative to the JSON's folder (--force: the file exists by now).
    r = _eval(capsys, models["a"], "--subset", "40", "--output", str(tmp_path / "j" / "e.json"),
              "--predictions", str(target), "--force")
    assert r["predictions"] == "../sub/p.npy"
    code, _, err = cli(["eval", str(models["a"]), "--predictions", str(models["a"])], capsys)
    one_line_error(code, err, "--predictions", "own input")
    code, _, err = cli(["eval", str(models["a"]), "--output", str(tmp_path / "x.json"),
                        "--predictions", str(tmp_path / "x.json")], capsys)
    one_line_error(code, err, "--predictions")
    code, _, err = cli(["eval", str(models["a"]), "--predictions", str(tmp_path)], capsys)
    assert code == 2 and not (tmp_path / "x.json").exists()


def test_a_failed_write_leaves_nothing(models, tmp_path, monkeypatch):
    from bats_cli.training import evaluate

    result = evaluate.evaluate_checkpoint(models["a"], subset=20, device="cpu", threads=1,
                                          return_predictions=True)

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(np, "save", broken)
    from bats_cli.core.errors import RunFailure

    # A failed write is one clear runtime error naming the file (bats_cli.core.fileio), nothing left behind.
    with pytest.raises(RunFailure, match="disk full"):
        evaluate.write_eval_files(result, output=tmp_path / "eval.json")
    assert list(tmp_path.iterdir()) == []


def test_onnx_gives_the_same_predictions_file(models, capsys, tmp_path):
    pytest.importorskip("onnx", reason="the export extra")
    pytest.importorskip("onnxruntime")
    onnx_file = tmp_path / "a.onnx"
    assert cli(["export", str(models["a"]), "-o", str(onnx_file)], capsys)[0] == 0
    a = _eval(capsys, models["a"], "--subset", "100", "--output", str(tmp_path / "torch.json"))
    o = _eval(capsys, onnx_file, "--subset", "100", "--output", str(tmp_path / "onnx.json"))
    assert o["engine"] == "onnxruntime" and o["images_sha256"] == a["images_sha256"]
    assert (tmp_path / "torch.predictions.npy").read_bytes() == (tmp_path / "onnx.predictions.npy").read_bytes()
    _check_files(tmp_path / "onnx.json")


def _image_folder(root, *, classes=("cat", "dog"), per_class=3):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in classes:
            (root / split / c).mkdir(parents=True)
            for i in range(per_class):
                pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / c / f"{i}.png")
    return root


def test_image_folder_hash_is_by_relative_paths(capsys, tmp_path):
    from bats_cli.data import AugmentConfig, build_datasets
    from bats_cli.data.identity import image_list

    data_dir = _image_folder(tmp_path / "trees" / "one")
    net = _network(0, in_channels=3, num_classes=2)
    data = {"name": "imagefolder", "image_size": 32, "num_classes": 2, "in_channels": 3,
            "network": "cifar"}
    model = save_packed(net, tmp_path / "f.packed.safetensors", settings=network_settings(net),
                        data=data, run={"seed": 0, "data_dir": str(data_dir)},
                        genotype_json=resolve_genotype("bats_c10").to_json(), source={})
    one = _eval(capsys, model, "--output", str(tmp_path / "one.json"))
    result, rows = _check_files(tmp_path / "one.json")
    assert rows.shape == (2, 6) and rows[1].tolist() == [0, 0, 0, 1, 1, 1]
    # The same tree elsewhere: the same image list, so the same hash.
    other = tmp_path / "elsewhere" / "two"
    shutil.copytree(data_dir, other)
    two = _eval(capsys, model, "--data-dir", str(other))
    assert two["images_sha256"] == one["images_sha256"]
    doc = image_list(build_datasets("imagefolder", data_dir=other, augment=AugmentConfig()).test,
                     name="imagefolder")
    assert doc["images"][:2] == ["val/cat/0.png", "val/cat/1.png"] and doc["classes"] == ["cat", "dog"]
    # One image fewer: another list.
    (other / "val" / "dog" / "2.png").unlink()
    three = _eval(capsys, model, "--data-dir", str(other))
    assert three["images_sha256"] != one["images_sha256"] and three["n_images"] == 5


def _ddp_worker(rank, world, port, queue):
    import os

    import torch.distributed as dist
    from torch.utils.data import TensorDataset

    from bats_cli.training.evaluate import evaluate_model
    from bats_cli.utils.distributed import Dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 3)
        data = TensorDataset(torch.randn(11, 4), torch.arange(11) % 3)
        out = evaluate_model(model, data, batch_size=4, dist_info=Dist(rank, world),
                             return_predictions=True)
        if rank == 0:
            queue.put((out["predictions"].tolist(), out["labels"].tolist(), out["top1"]))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_gathers_predictions_in_order():
    import socket

    import torch.multiprocessing as mp
    from torch.utils.data import TensorDataset

    from bats_cli.training.evaluate import evaluate_model

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    data = TensorDataset(torch.randn(11, 4), torch.arange(11) % 3)
    single = evaluate_model(model, data, batch_size=4, return_predictions=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    mp.start_processes(_ddp_worker, args=(2, port, queue), nprocs=2, join=True, start_method="spawn")
    predictions, labels, top1 = queue.get(timeout=60)
    assert predictions == single["predictions"].tolist() and labels == single["labels"].tolist()
    assert top1 == single["top1"]
