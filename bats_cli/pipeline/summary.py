"""`bats flops` in the library (larq's ``models.summary``): what to count — a genotype, a model name,
a checkpoint or a run directory — at which input shape, the count, and its table rows as text.

:func:`summary` returns the JSON-ready result and the model counted; :func:`summary_rows`,
:func:`precision_rows` and :func:`breakdown_rows` are the tables the command prints.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from bats_cli.core.errors import UserInputError
from bats_cli.models.counting import DatasetShape, count_model, dataset_shape

DEFAULT_GENOTYPE = "bats_c10"

# Network settings read from a checkpoint's config: ``network`` (as bats train records it),
# ``data`` (the data spec), or flat keys.
_SETTING_KEYS = (
    "arch", "dataset", "width", "layers", "channels", "real", "activation", "group_policy",
    "channels_per_group", "reduce_shortcut", "channel_shuffle", "stem_groups", "num_classes",
    "image_size", "in_channels",
)
# Settings that follow from the data set: dropped when --dataset names another one.
_DATA_KEYS = ("num_classes", "image_size", "in_channels")
# Settings of a search that carry over to the evaluation network of its genotype (the supernet's
# cells, channels and image size do not: `bats train GENOTYPE` builds its own network).
_SEARCH_KEYS = ("dataset", "activation", "group_policy", "channels_per_group", "reduce_shortcut",
                "channel_shuffle")
# Recorded settings handed to the model builder (each model takes those it has).
_MODEL_KEYS = ("layers", "activation", "group_policy", "channels_per_group", "reduce_shortcut", "channel_shuffle",
               "stem_groups")


@dataclass
class Summary:
    """What :func:`summary` counted: the JSON-ready ``result``, and the model and its input size."""

    result: dict[str, Any]
    model: nn.Module
    input_size: tuple[int, int, int]


def summary(target: str | None = None, *, dataset: str | None = None, width: str | None = None,
            layers: int | None = None, channels: int | None = None, real: bool = False,
            verbose: bool = False) -> Summary:
    """Count the network ``target`` names (default: bats_c10); explicit settings win over a checkpoint's."""
    from bats_cli.models.registry import arch_for, check_options

    checkpoint: dict[str, Any] | None = None
    settings: dict[str, Any] = {}
    target = resolve_target(target) if target is not None else None
    if target is not None and is_checkpoint(target):
        genotype, settings, checkpoint = read_checkpoint(Path(target))
    else:
        from bats_cli.core.zoo import resolve_network

        genotype = resolve_network(target if target is not None else DEFAULT_GENOTYPE)
        if isinstance(genotype, str):  # a fixed model: its name is its arch, it has no genotype
            settings["arch"], genotype = arch_for(genotype), None
    check_options(settings.get("arch") or arch_for(genotype), {"layers": layers}, {"layers": None})

    if dataset is not None:
        if settings.get("dataset") != dataset:
            for key in _DATA_KEYS:
                settings.pop(key, None)
        settings["dataset"] = dataset
    size = _size(settings, width, channels)  # explicit --width / --channels replace the recorded size
    if width is not None:
        settings["width"] = width
        settings.pop("channels", None)
    if channels is not None:
        settings["channels"] = channels
        settings.pop("width", None)
    if layers is not None:
        settings["layers"] = layers
    if real:
        settings["real"] = True
    shape = shape_for(settings)
    model, network = _build(genotype, shape, settings, size)
    report = count_model(model, shape.input_size)

    result: dict[str, Any] = {
        "genotype": genotype.name if genotype is not None else network["arch"],
        "dataset": shape.name,
        "network": network,
        **{k: v for k, v in report.to_dict().items() if k not in ("by_stage", "by_op")},
    }
    if verbose:
        result["by_stage"] = report.breakdown("stage")
        result["by_op"] = report.breakdown("op")
    if checkpoint is not None:
        if checkpoint["kind"] == "packed" and checkpoint["file_bytes"]:
            # The packed file against the same network stored at fp32.
            checkpoint["fp32_bytes"] = report.size_fp32_bytes
            checkpoint["compression"] = report.size_fp32_bytes / checkpoint["file_bytes"]
        result["checkpoint"] = checkpoint
    return Summary(result=result, model=model, input_size=tuple(shape.input_size))


# --------------------------------------------------------------------------- inputs


def resolve_target(target: str) -> str:
    """A run directory counts as its ``last.safetensors``; an ONNX file is refused by name."""
    from bats_cli.core.sniff import sniff, wrong_file

    found = sniff(target)
    if found.kind == "run":
        return str(Path(target) / "last.safetensors")
    if found.kind == "directory":
        raise UserInputError(
            f"{target} is a directory without last.safetensors (not a bats run directory); give a "
            "genotype, a checkpoint or a run directory"
        )
    if found.kind == "onnx":
        raise UserInputError(wrong_file(target, found, "a genotype or a bats checkpoint"))
    return target


def is_checkpoint(target: str) -> bool:
    from bats_cli.core.sniff import sniff

    found = sniff(target)
    return found.is_checkpoint or found.kind == "safetensors" or Path(target).suffix.lower() == ".safetensors"


def read_checkpoint(path: Path) -> tuple[Any, dict[str, Any], dict[str, Any]]:
    """``(genotype or None, settings, file info)`` from a checkpoint's header (no tensor is loaded)."""
    from bats_cli.core.genotype import Genotype
    from bats_cli.models.registry import model_of
    from bats_cli.storage.checkpoint import read_metadata

    meta = read_metadata(path)
    config, genotype_json = dict(meta.config), meta.genotype_json
    if meta.kind == "search":
        return _read_search_checkpoint(path, meta)
    network = config.get("network") if isinstance(config.get("network"), dict) else {}
    if not model_of(network).genotype:
        genotype = None  # a fixed model (resnet18): the settings say everything
    elif not genotype_json:
        raise UserInputError(f"{path}: the checkpoint holds no genotype")
    else:
        genotype = Genotype.from_json(genotype_json, origin=f"{path} (bats_genotype)")
    merged = {k: v for k, v in config.items() if not isinstance(v, dict)}
    data = config.get("data") if isinstance(config.get("data"), dict) else {}
    merged.update({k: data[k] for k in _DATA_KEYS if data.get(k) is not None})
    if data.get("name"):
        merged["dataset"] = data["name"]
    merged.update(network)
    settings = {k: merged[k] for k in _SETTING_KEYS if merged.get(k) is not None}
    if "binary_activations" in merged or "binary_weights" in merged:
        settings["real"] = not (merged.get("binary_activations") or merged.get("binary_weights"))
    info: dict[str, Any] = {"path": str(path), "kind": meta.kind, "file_bytes": path.stat().st_size}
    return genotype, settings, info


def _read_search_checkpoint(path: Path, meta: Any) -> tuple[Any, dict[str, Any], dict[str, Any]]:
    """A search checkpoint counts as the evaluation network of the genotype it derives."""
    import json

    from bats_cli.core.genotype import Genotype

    config = dict(meta.config)
    if meta.genotype_json:
        genotype = Genotype.from_json(meta.genotype_json, origin=f"{path} (bats_genotype)")
    else:
        from bats_cli.nas.derive import derive_from_checkpoint

        genotype = derive_from_checkpoint(path)
    settings = {k: config[k] for k in _SEARCH_KEYS if config.get(k) is not None}
    if str(settings.get("dataset", "")).lower() == "imagefolder":
        try:
            state = json.loads(meta.extra.get("search_state") or "{}")
        except ValueError:
            state = {}
        settings["image_size"] = config.get("image_size")
        if isinstance(state, dict):
            settings["num_classes"] = state.get("num_classes")
            settings["in_channels"] = state.get("in_channels")
        settings = {k: v for k, v in settings.items() if v is not None}
    info: dict[str, Any] = {
        "path": str(path), "kind": "search", "file_bytes": path.stat().st_size,
        "counted": "the evaluation network of the genotype it derives, as `bats train GENOTYPE` "
                   "builds it without --preset (--layers, --width, --channels change it)",
    }
    return genotype, settings, info


def shape_for(settings: dict[str, Any]) -> DatasetShape:
    """The input shape and classes of ``settings``' data set (a checkpoint's own size wins)."""
    from bats_cli.data.spec import network_for

    name = str(settings.get("dataset") or "cifar10")
    key = name.strip().lower().replace("_", "-")
    image_size = settings.get("image_size")
    num_classes = settings.get("num_classes")
    if key == "imagefolder":
        if not image_size or not num_classes:
            raise UserInputError("an imagefolder network needs image_size and num_classes in its config")
        size = int(image_size)
        return DatasetShape("imagefolder", size, int(settings.get("in_channels") or 3), int(num_classes),
                            network_for(size))
    shape = dataset_shape(name)
    if image_size or num_classes:
        shape = DatasetShape(shape.name, int(image_size or shape.image_size), shape.in_channels,
                             int(num_classes or shape.num_classes), shape.kind)
    return shape


def _size(settings: dict[str, Any], width: str | None, channels: int | None) -> dict[str, Any]:
    """The builder's width / channels: the flags given (both: the builder refuses), else the
    recorded channels (a recorded width only says what they came from), else the recorded width."""
    if width is not None or channels is not None:
        return {"width": width, "channels": channels}
    if settings.get("channels") is not None:
        return {"channels": settings["channels"]}
    return {"width": settings.get("width")}


def _build(genotype: Any, shape: DatasetShape, settings: dict[str, Any], size: dict[str, Any]):
    """The model ``settings`` describe at ``shape`` (no auxiliary head), and its ``network`` record."""
    from bats_cli.core.archs import arch_of
    from bats_cli.models.registry import accepted, create_model

    arch = arch_of(settings)
    options = {**{k: settings.get(k) for k in _MODEL_KEYS}, "auxiliary": False}
    model = create_model(arch, genotype, kind=shape.kind, num_classes=shape.num_classes,
                         in_channels=shape.in_channels, real=bool(settings.get("real")), **size,
                         **accepted(arch, options))
    width = settings.get("width") if settings.get("channels") is not None else settings.get("width") or "1x"
    network = {
        "arch": arch,
        "kind": shape.kind,
        "width": width,
        "channels": model.config.channels,
        "layers": getattr(model.config, "layers", None),
        "real": bool(settings.get("real")),
        "num_classes": shape.num_classes,
        "input_size": list(shape.input_size),
    }
    return model, network


# --------------------------------------------------------------------------- table rows


def number(x: float) -> str:
    return f"{x:.4g}" if abs(x) < 1e4 else f"{x:.4e}"


def megabytes(n: float) -> str:
    return f"{n / 1e6:.3f} MB"


def headline(result: dict[str, Any]) -> str:
    """What was counted on which input, after its name: " on cifar10 (32x32x3, 10 classes): ..."."""
    net = result["network"]
    c, h, w = net["input_size"]
    width = f"width {net['width']}, " if net["width"] else ""
    mode = "real-valued" if net["real"] else "binary"
    return (f" on {result['dataset']} ({h}x{w}x{c}, {net['num_classes']} classes): {mode} "
            f"{net['kind']} network, {width}C={net['channels']}, "
            + (f"{net['layers']} cells" if net.get("layers") is not None else "ResNet-18")
            + "; batch 1, auxiliary head excluded")


def summary_rows(result: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(quantity, value, what) rows of the main table."""
    rows = [
        ("params", f"{result['params'] / 1e6:.3f} M", f"{result['params']:,}"),
        ("FLOPs", number(result["flops"]), "real-valued MACs: stem, classifier, real convs"),
        ("BOPs", number(result["bops"]), "binary MACs: convs with binarized input"),
        ("OPs", number(result["ops"]), "FLOPs + BOPs / 64"),
        ("size fp32", megabytes(result["size_fp32_bytes"]), "4 bytes per parameter"),
        ("size packed", megabytes(result["size_packed_bytes"]),
         f"1-bit binary weights; {result['compression']:.1f}x smaller"),
    ]
    ckpt = result.get("checkpoint")
    if ckpt is not None and ckpt["kind"] != "search":
        rows.append(("file", megabytes(ckpt["file_bytes"]), f"{ckpt['kind']} checkpoint {ckpt['path']}"))
        if "compression" in ckpt:
            rows.append(("packed vs fp32", f"{ckpt['compression']:.1f}x",
                         f"fp32 model {megabytes(ckpt['fp32_bytes'])} vs this file"))
    return rows


def precision_rows(result: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """(precision, params, MACs, memory) rows, larq-style, with the total last."""
    rows = [(r["precision"], f"{r['params']:,}", number(r["macs"]), megabytes(r["memory_bytes"]))
            for r in result["precision"]]
    rows.append(("total", f"{result['params']:,}", number(result["flops"] + result["bops"]),
                 megabytes(result["size_packed_bytes"])))
    return rows


def breakdown_rows(result: dict[str, Any], by: str) -> list[tuple[str, ...]]:
    """(stage or op, layers, params, FLOPs, BOPs, OPs) rows of ``--verbose``'s ``by`` table."""
    return [(r[by], str(r["layers"]), f"{r['params']:,}", number(r["flops"]), number(r["bops"]), number(r["ops"]))
            for r in result[f"by_{by}"]]


__all__ = ["DEFAULT_GENOTYPE", "Summary", "breakdown_rows", "headline", "is_checkpoint", "megabytes", "number",
           "precision_rows", "read_checkpoint", "resolve_target", "shape_for", "summary", "summary_rows"]
