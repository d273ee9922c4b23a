"""Top-1 / top-5 on a test split, for any model the pipeline writes (§4.3: "the fully binarized
network is evaluated on the test set").

Three kinds of file can be evaluated: a step-1 ``train`` checkpoint (binary activations, real
weights), a ``binarize`` checkpoint (binary weights and activations, latent real weights kept)
and a ``packed`` artifact (1-bit weights; unpacked into an exactly equivalent model).
"""

from __future__ import annotations

import contextlib

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from bats_cli.errors import UserInputError
from bats_cli.modelio import LoadedModel, check_dataset, load_model


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
    top-min(5, classes). With ``return_predictions`` (single process) the arg-max class of every
    image is returned too, in data set order.
    """
    from bats_cli.runtime import autocast, memory_format

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
    predictions = []
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
                if bar is not None:
                    bar.update(1, top1=100.0 * correct1 / seen)
    finally:
        model.train(was_training)
    if dist_info is not None and dist_info.enabled:
        from bats_cli.distributed import all_sum

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
        out["predictions"] = torch.cat(predictions) if predictions else torch.empty(0, dtype=torch.long)
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
    from bats_cli.runloop import restores_threads, set_threads

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
    from bats_cli.runtime import check_precision, select_device

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
    return eval_result(loaded, path, data, metrics, kind=loaded.meta.kind, engine=engine,
                       binary_weights=loaded.meta.kind == "packed")


def eval_data(loaded: LoadedModel, path, *, dataset, data_dir, download, image_size, subset):
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


def eval_result(loaded: LoadedModel, path, data, metrics: dict[str, Any], *, kind: str, engine: str,
                binary_weights: bool = False) -> dict[str, Any]:
    """``bats eval``'s JSON result for any kind of model file."""
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
    }
    if "predictions" in metrics:
        result["predictions"] = metrics["predictions"]
    return result


__all__ = [
    "eval_result",
    "evaluate_checkpoint",
    "evaluate_model",
    "resolve_eval_data",
    "eval_data",
]
