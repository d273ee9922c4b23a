"""Top-1 / top-5 on a test split, for any model the pipeline writes (§4.3: "the fully binarized
network is evaluated on the test set").

Three kinds of file can be evaluated: a step-1 ``train`` checkpoint (binary activations, real
weights), a ``binarize`` checkpoint (binary weights and activations, latent real weights kept)
and a ``packed`` artifact (1-bit weights; unpacked into an exactly equivalent model).

Per-image predictions (``bats eval --output`` / ``--predictions``): :func:`write_eval_files` writes
a ``(2, N)`` integer ``.npy`` — row 0 the predicted (arg-max) class of every image, row 1 its true
label, in evaluation order — beside the JSON result, which names it and carries ``images_sha256``
(:mod:`bats_cli.data.identity`), so two such files are known to be on the same images.
"""

from __future__ import annotations

import contextlib
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from bats_cli.core.errors import RunFailure, UserInputError
from bats_cli.models.modelio import LoadedModel, check_dataset, load_model


@torch.no_grad()
def evaluate_model(
    model: nn.Module,
    dataset,
    *,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
    precision: str = "fp32",
    dist_info=None,
    num_workers: int = 0,
    return_predictions: bool = False,
    reporter=None,
) -> dict[str, Any]:
    """``{"images", "loss", "top1", "top5"}`` (percentages) of ``model`` in eval mode.

    With a ``reporter`` (``bats eval``) the batches show as progress with images/s and ETA.

    Under DDP every rank evaluates a contiguous shard and the counts are summed. ``top5`` is
    top-min(5, classes). With ``return_predictions`` the arg-max class (``predictions``) and the
    label (``labels``) of every image are returned too, as CPU int64 tensors in data set order
    (under DDP gathered from the shards in rank order, so every rank holds all of them);
    ``predictions == labels`` counts exactly the images ``top1`` counts.
    """
    from bats_cli.utils.runtime import autocast, memory_format

    device = torch.device(device)
    world = dist_info.world if dist_info is not None else 1
    rank = dist_info.rank if dist_info is not None else 0
    n = len(dataset)
    lo, hi = n * rank // world, n * (rank + 1) // world
    shard = dataset if world == 1 else torch.utils.data.Subset(dataset, range(lo, hi))
    from bats_cli.data import ShieldedDataLoader

    loader = ShieldedDataLoader(
        shard, batch_size=batch_size, shuffle=False, num_workers=num_workers,
        pin_memory=device.type == "cuda",
    )
    fmt = memory_format(device, model, precision=precision)
    was_training = model.training
    model.eval()
    loss_sum = correct1 = correct5 = seen = 0.0
    predictions, labels = [], []
    progress = contextlib.nullcontext(None)
    if reporter is not None:
        reporter.start_run(len(loader), images_per_step=batch_size)
        progress = reporter.epoch("eval", len(loader))
    try:
        with progress as bar:
            for x, y in loader:
                x = x.to(device, non_blocking=True).contiguous(memory_format=fmt)
                y = y.to(device, non_blocking=True)
                with autocast(device, precision):
                    logits = model(x)
                if isinstance(logits, tuple):
                    logits = logits[0]
                logits = logits.float()
                loss_sum += F.cross_entropy(logits, y, reduction="sum").item()
                k = min(5, logits.shape[1])
                top = logits.topk(k, dim=1).indices
                hit = top == y[:, None]
                correct1 += hit[:, 0].sum().item()
                correct5 += hit.any(dim=1).sum().item()
                seen += y.shape[0]
                if return_predictions:
                    predictions.append(top[:, 0].cpu())
                    labels.append(y.cpu())
                if bar is not None:
                    bar.update(1, top1=100.0 * correct1 / seen)
    finally:
        model.train(was_training)
    if dist_info is not None and dist_info.enabled:
        from bats_cli.utils.distributed import all_sum

        loss_sum, correct1, correct5, seen = all_sum(
            [loss_sum, correct1, correct5, seen], dist_info, device
        )
    denom = max(seen, 1.0)
    out: dict[str, Any] = {
        "images": int(seen),
        "loss": loss_sum / denom,
        "top1": 100.0 * correct1 / denom,
        "top5": 100.0 * correct5 / denom,
    }
    if return_predictions:
        from bats_cli.utils.distributed import Dist, all_gather_cat

        for key, parts in (("predictions", predictions), ("labels", labels)):
            local = torch.cat(parts).long() if parts else torch.empty(0, dtype=torch.long)
            out[key] = all_gather_cat(local, dist_info or Dist(), device)
    return out


def resolve_eval_data(loaded: LoadedModel, *, dataset: str | None, data_dir, image_size, path):
    """(name, data_dir, image_size) to evaluate on: the recorded data set unless told otherwise."""
    recorded = loaded.data.get("name")
    name = dataset or recorded
    if name is None:
        raise UserInputError(f"{path} records no data set; give --dataset")
    from bats_cli.data.spec import canonical_name

    same = recorded is not None and canonical_name(name) == canonical_name(recorded)
    if data_dir is None and same:
        data_dir = loaded.run.get("data_dir") or loaded.data.get("data_dir")
    if image_size is None and same:
        image_size = loaded.data.get("image_size")
    return name, data_dir, image_size


def evaluate_checkpoint(
    path: str | Path,
    *,
    dataset: str | None = None,
    data_dir: str | Path | None = None,
    download: bool = False,
    image_size: int | None = None,
    subset: int | None = None,
    batch_size: int = 256,
    device: str = "auto",
    precision: str = "fp32",
    num_workers: int = 0,
    threads: int | None = None,
    return_predictions: bool = False,
    engine: str = "float",
    reporter=None,
) -> dict[str, Any]:
    """``bats eval``: top-1 / top-5 of a checkpoint or packed artifact on a test split.

    ``engine``: ``float`` (PyTorch), ``bitwise`` or ``auto`` (:func:`bats_cli.engine.apply_engine`).
    """
    from bats_cli.training.runloop import restores_threads, set_threads

    @restores_threads
    def run() -> dict[str, Any]:
        set_threads(threads)
        return _evaluate_checkpoint(
            path, dataset=dataset, data_dir=data_dir, download=download, image_size=image_size,
            subset=subset, batch_size=batch_size, device=device, precision=precision,
            num_workers=num_workers, return_predictions=return_predictions, engine=engine,
            reporter=reporter,
        )

    return run()


def _evaluate_checkpoint(path, *, dataset, data_dir, download, image_size, subset, batch_size,
                         device, precision, num_workers, return_predictions,
                         engine="float", reporter=None) -> dict[str, Any]:
    from bats_cli.utils.runtime import check_precision, select_device

    path = Path(path)
    dev = select_device(device)
    check_precision(dev, precision)
    loaded = load_model(path, command="eval")
    data = eval_data(loaded, path, dataset=dataset, data_dir=data_dir, download=download,
                     image_size=image_size, subset=subset)
    model = loaded.model.to(dev)
    if engine != "float":
        import sys

        from bats_cli.engine import apply_engine

        model, engine = apply_engine(model, engine, device=dev,
                                     warn=lambda line: print(line, file=sys.stderr))
    metrics = evaluate_model(
        model, data.test, batch_size=batch_size, device=dev, precision=precision,
        num_workers=num_workers, return_predictions=return_predictions, reporter=reporter,
    )
    result = eval_result(loaded, path, data, metrics, kind=loaded.meta.kind, engine=engine,
                         binary_weights=loaded.meta.kind == "packed")
    if engine == "bitwise":
        from bats_cli.engine import engine_info

        # What ran: the SIMD popcount path, threads, and how the binary layers were built.
        info = engine_info(model)
        result["engine_simd"] = info["simd"]
        result["engine_info"] = info
    return result


def eval_data(loaded: LoadedModel, path, *, dataset=None, data_dir=None, download=False, image_size=None,
              subset=None):
    """The data set a model is evaluated on (recorded unless told otherwise), checked against it."""
    from bats_cli.data import AugmentConfig, build_datasets, describe_spec

    name, data_dir, image_size = resolve_eval_data(
        loaded, dataset=dataset, data_dir=data_dir, image_size=image_size, path=path
    )
    check_dataset(describe_spec(name, data_dir, image_size), loaded.settings, path)
    return build_datasets(
        name, data_dir=data_dir, download=download, subset=subset, image_size=image_size,
        augment=AugmentConfig(), seed=int(loaded.run.get("seed", 0) or 0),
    )


def top1_standard_error(top1: float, n: int) -> float:
    """Binomial standard error of a top-1 percentage over ``n`` images, in percentage points."""
    p = top1 / 100.0
    return 100.0 * math.sqrt(max(p * (1.0 - p), 0.0) / max(n, 1))


def eval_result(loaded: LoadedModel, path, data, metrics: dict[str, Any], *, kind: str, engine: str,
                binary_weights: bool = False) -> dict[str, Any]:
    """``bats eval``'s JSON result for any kind of model file.

    ``images_sha256`` identifies the evaluated image list (:func:`bats_cli.data.identity.images_sha256`).
    With predictions in ``metrics`` the result carries them (tensors) until :func:`write_eval_files`
    writes them out.
    """
    from bats_cli.data.identity import images_sha256
    from bats_cli.data.loader import targets_of

    s = loaded.settings
    result = {
        "command": "eval",
        "checkpoint": str(path),
        "kind": kind,
        "genotype": loaded.name,
        "dataset": data.spec.name,
        "split": "test",
        "images": metrics["images"],
        "top1": metrics["top1"],
        "top5": metrics["top5"],
        "loss": metrics["loss"],
        "activations": "binary" if s.get("binary_activations") else "real",
        "weights": "binary" if s.get("binary_weights") or binary_weights else "real",
        "engine": engine,
        "n_images": metrics["images"],
        "top1_se": top1_standard_error(metrics["top1"], metrics["images"]),
        "images_sha256": images_sha256(data.test, name=data.spec.name, split="test"),
    }
    if "predictions" in metrics:
        targets = targets_of(data.test)
        if targets is not None and not np.array_equal(targets, metrics["labels"].numpy()):
            # An ImageFolder image that failed to load was replaced by the next one: the rows
            # would no longer match the image list the hash names.
            raise RunFailure(f"{path}: the labels served differ from the test split's list (an image "
                             "could not be read); per-image predictions would be misaligned")
        result["predictions"] = metrics["predictions"]
        result["labels"] = metrics["labels"]
    return result


PREDICTIONS_SUFFIX = ".predictions.npy"


def predictions_path(output: str | Path | None, predictions: str | Path | None) -> Path | None:
    """Where ``bats eval`` writes per-image predictions: ``predictions`` if given, else beside
    ``output`` (``eval.json`` -> ``eval.predictions.npy``), else nowhere (None)."""
    if predictions is not None:
        return Path(predictions)
    if output is None:
        return None
    output = Path(output)
    return output.with_name(output.stem + PREDICTIONS_SUFFIX)


def predictions_array(predicted: torch.Tensor, labels: torch.Tensor) -> np.ndarray:
    """``(2, N)``: row 0 predicted class, row 1 true label; int16 (int32 past 32767 classes)."""
    rows = np.stack([predicted.cpu().numpy(), labels.cpu().numpy()]).astype(np.int64)
    fits = rows.size == 0 or (rows.min() >= 0 and rows.max() <= np.iinfo(np.int16).max)
    return rows.astype(np.int16 if fits else np.int32)


def save_predictions(path: str | Path, predicted: torch.Tensor, labels: torch.Tensor) -> Path:
    """Write :func:`predictions_array` as ``.npy`` atomically (temp file + ``os.replace``)."""
    from bats_cli.core.fileio import atomic_target

    path = Path(path)
    with atomic_target(path) as tmp:
        with open(tmp, "wb") as fh:
            np.save(fh, predictions_array(predicted, labels), allow_pickle=False)
    return path


def load_predictions(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """(predicted, labels) of a predictions file (no pickle)."""
    rows = np.load(Path(path), allow_pickle=False)
    if rows.ndim != 2 or rows.shape[0] != 2 or rows.dtype.kind not in "iu":
        raise UserInputError(f"{path}: not a bats predictions file (a (2, N) integer array)")
    return rows[0], rows[1]


def write_eval_files(result: dict[str, Any], *, output: str | Path | None = None,
                     predictions: str | Path | None = None) -> dict[str, Any]:
    """``bats eval``'s files: the predictions ``.npy`` first, then the JSON ``output``.

    The result's prediction tensors are replaced by the file's name (relative to the JSON's
    folder; as given without ``output``), or dropped when no file is wanted. The JSON is written
    last, so its presence means the predictions beside it are complete.
    """
    result = dict(result)
    predicted, labels = result.pop("predictions", None), result.pop("labels", None)
    target = predictions_path(output, predictions)
    if target is not None:
        if predicted is None or labels is None:
            raise ValueError("write_eval_files: evaluate with return_predictions=True to write predictions")
        save_predictions(target, predicted, labels)
        base = Path(output).parent if output is not None else None
        result["predictions"] = (os.path.relpath(target, base) if base is not None else str(target))
    if output is not None:
        from bats_cli.core.fileio import atomic_write_json

        atomic_write_json(output, result)
    return result


__all__ = [
    "PREDICTIONS_SUFFIX",
    "eval_result",
    "load_predictions",
    "predictions_array",
    "predictions_path",
    "save_predictions",
    "top1_standard_error",
    "write_eval_files",
    "evaluate_checkpoint",
    "evaluate_model",
    "resolve_eval_data",
    "eval_data",
]
