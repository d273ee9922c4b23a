"""`bats flops`: parameters, FLOPs, BOPs, OPs and model size of a genotype's network (or resnet18)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from bats_cli.cli.app import app
from bats_cli.errors import UserInputError

DEFAULT_GENOTYPE = "bats_c10"


@app.command("flops")
def flops(
    target: Annotated[
        Optional[str],
        typer.Argument(
            metavar="[GENOTYPE|CHECKPOINT|RUN_DIR]",
            help="A genotype .json, a bundled genotype name, resnet18 (Table 5's binary ResNet-18), "
            "a train / binarize / packed checkpoint (its genotype and network settings are read from "
            "the header), a search checkpoint (the evaluation network of the genotype it derives) "
            "or a run directory (its last.safetensors). Default: bats_c10.",
        ),
    ] = None,
    dataset: Annotated[
        Optional[str],
        typer.Option(
            "--dataset",
            metavar="NAME",
            help="cifar10, cifar100 (32 px), imagenet (224 px, ImageNet network) or "
            "fashion-mini (32 px, 1 channel). Default: cifar10, or the checkpoint's.",
        ),
    ] = None,
    width: Annotated[
        Optional[str],
        typer.Option(
            "--width",
            metavar="1x|medium|large|2x",
            help="Width preset (channels and groups scale together; 2x = Table 6's "
            "'2x-wider' = 1.5x channels). Default: 1x.",
        ),
    ] = None,
    layers: Annotated[
        Optional[int],
        typer.Option("--layers", metavar="N", help="Number of cells (default: 20 CIFAR, 14 ImageNet)."),
    ] = None,
    channels: Annotated[
        Optional[int],
        typer.Option("--channels", metavar="C", help="Initial channels (instead of --width)."),
    ] = None,
    real: Annotated[
        bool,
        typer.Option("--real", help="The real-valued network (no binary layers)."),
    ] = False,
    as_json: Annotated[
        bool,
        typer.Option("--json", help="Print one JSON object on stdout instead of tables."),
    ] = False,
    verbose: Annotated[
        bool,
        typer.Option("--verbose", "-v", help="Add per-stage and per-op-kind breakdowns."),
    ] = False,
    profile: Annotated[
        bool,
        typer.Option(
            "--profile",
            help="Also measure (batch 1, this CPU) the share of inference time in binary convs "
            "vs BatchNorm, activations, pools, real layers and the rest, on PyTorch fp32 and on "
            "the bitwise engine (random weights: time does not depend on their values).",
        ),
    ] = False,
    threads: Annotated[
        Optional[int],
        typer.Option("--threads", min=1, max=1024, help="CPU threads for --profile (default: torch's choice)."),
    ] = None,
) -> None:
    """Count params, FLOPs, BOPs and OPs of one inference (batch 1, auxiliary head excluded).

    FLOPs are real-valued multiply-accumulates (stem, classifier); BOPs are binary ones (convs
    with binarized input); OPs = FLOPs + BOPs/64 (Table 6). BatchNorm, pooling and activations
    are not counted. Sizes: fp32 = 4 bytes a parameter; packed = binary conv weights at 1 bit
    plus everything else at fp32.

    Example: bats flops --dataset imagenet

    Example: bats flops genotypes/darts_v2.json --real --json

    Example: bats flops runs/c10/best.safetensors --verbose

    Example: bats flops runs/search-tiny   (a search: the network of the genotype it derives)
    """
    from bats_cli.counting import count_model

    for name, value in (("--layers", layers), ("--channels", channels)):
        if value is not None and value < 1:
            raise UserInputError(f"{name} must be a positive integer, got {value}")
    if width is not None and channels is not None:
        raise UserInputError("give either --width or --channels, not both")

    checkpoint: dict[str, Any] | None = None
    settings: dict[str, Any] = {}
    if target is not None:
        target = _resolve_target(target)
    if target is not None and _is_checkpoint(target):
        genotype, settings, checkpoint = _read_checkpoint(Path(target))
    else:
        from bats_cli.zoo import resolve_network

        genotype = resolve_network(target if target is not None else DEFAULT_GENOTYPE)
        if isinstance(genotype, str):  # a fixed model: its name is its arch, it has no genotype
            settings["arch"], genotype = genotype, None

    # Explicit flags win over the checkpoint's settings.
    if dataset is not None:
        if settings.get("dataset") != dataset:
            for key in _DATA_KEYS:
                settings.pop(key, None)
        settings["dataset"] = dataset
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
    shape = _shape_for(settings)
    model, network = _build(genotype, shape, settings)
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
    if profile:
        from bats_cli.engine.profile import profile_network
        from bats_cli.runloop import restores_threads, set_threads

        @restores_threads
        def measure():
            set_threads(threads)
            return profile_network(model, tuple(shape.input_size),
                                   warn=lambda line: print(line, file=sys.stderr))

        result["profile"] = measure()
    if checkpoint is not None:
        if checkpoint["kind"] == "packed" and checkpoint["file_bytes"]:
            # The packed file against the same network stored at fp32.
            checkpoint["fp32_bytes"] = report.size_fp32_bytes
            checkpoint["compression"] = report.size_fp32_bytes / checkpoint["file_bytes"]
        result["checkpoint"] = checkpoint
    if as_json:
        sys.stdout.write(json.dumps(result, allow_nan=False) + "\n")
        return
    _print_tables(result, verbose=verbose)


# --------------------------------------------------------------------------- inputs


def _resolve_target(target: str) -> str:
    """A run directory counts as its ``last.safetensors``; an ONNX file is refused by name."""
    from bats_cli.sniff import sniff, wrong_file

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


def _is_checkpoint(target: str) -> bool:
    from bats_cli.sniff import sniff

    found = sniff(target)
    return found.is_checkpoint or found.kind == "safetensors" or Path(target).suffix.lower() == ".safetensors"


def _read_metadata(path: Path) -> tuple[str, dict[str, Any], str | None]:
    """(kind, config, genotype JSON) from a checkpoint header, without loading tensors."""
    try:
        from bats_cli.checkpoint import read_metadata
    except ImportError:  # pragma: no cover - the checkpoint module ships with bats
        read_metadata = None
    if read_metadata is not None:
        meta = read_metadata(path)
        return meta.kind, dict(meta.config), meta.genotype_json
    from safetensors import safe_open

    if not path.is_file():
        raise UserInputError(f"{path}: no such checkpoint file")
    try:
        with safe_open(str(path), framework="pt") as fh:
            raw = fh.metadata() or {}
    except Exception as exc:  # safetensors raises its own error types
        raise UserInputError(f"{path}: not a valid safetensors checkpoint ({exc})") from None
    try:
        config = json.loads(raw.get("bats_config", "{}"))
    except ValueError:
        raise UserInputError(f"{path}: corrupt bats_config metadata") from None
    return raw.get("bats_kind", "?"), config if isinstance(config, dict) else {}, raw.get("bats_genotype")


# Network settings read from a checkpoint's config: ``network`` (as bats train records it),
# ``data`` (the data spec), or flat keys.
_SETTING_KEYS = (
    "arch", "dataset", "width", "layers", "channels", "real", "activation", "group_policy",
    "channels_per_group", "reduce_shortcut", "channel_shuffle", "stem_groups", "num_classes",
    "image_size", "in_channels",
)
# Settings that follow from the data set: dropped when --dataset names another one.
_DATA_KEYS = ("num_classes", "image_size", "in_channels")


def _read_checkpoint(path: Path):
    from bats_cli.archs import CELLS, arch_of
    from bats_cli.genotype import Genotype

    kind, config, genotype_json = _read_metadata(path)
    if kind == "search":
        return _read_search_checkpoint(path, config, genotype_json)
    network = config.get("network") if isinstance(config.get("network"), dict) else {}
    if arch_of(network) != CELLS:
        genotype = None  # a fixed model (resnet18): the settings say everything
    elif not genotype_json:
        hint = " (a search checkpoint: derive a genotype first with `bats derive`)" if kind == "search" else ""
        raise UserInputError(f"{path}: the checkpoint holds no genotype{hint}")
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
    info: dict[str, Any] = {"path": str(path), "kind": kind, "file_bytes": path.stat().st_size}
    return genotype, settings, info


# Settings of a search that carry over to the evaluation network of its genotype (the supernet's
# cells, channels and image size do not: `bats train GENOTYPE` builds its own network).
_SEARCH_KEYS = ("dataset", "activation", "group_policy", "channels_per_group", "reduce_shortcut",
                "channel_shuffle")


def _read_search_checkpoint(path: Path, config: dict[str, Any], genotype_json: str | None):
    """A search checkpoint counts as the evaluation network of the genotype it derives."""
    from bats_cli.genotype import Genotype

    if genotype_json:
        genotype = Genotype.from_json(genotype_json, origin=f"{path} (bats_genotype)")
    else:
        from bats_cli.derive import derive_from_checkpoint

        genotype = derive_from_checkpoint(path)
    settings = {k: config[k] for k in _SEARCH_KEYS if config.get(k) is not None}
    if str(settings.get("dataset", "")).lower() == "imagefolder":
        from bats_cli.checkpoint import read_metadata

        try:
            state = json.loads(read_metadata(path).extra.get("search_state") or "{}")
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


def _shape_for(settings: dict[str, Any]):
    from bats_cli.counting import DatasetShape, dataset_shape

    name = str(settings.get("dataset") or "cifar10")
    key = name.strip().lower().replace("_", "-")
    image_size = settings.get("image_size")
    num_classes = settings.get("num_classes")
    if key == "imagefolder":
        if not image_size or not num_classes:
            raise UserInputError("an imagefolder network needs image_size and num_classes in its config")
        size = int(image_size)
        return DatasetShape("imagefolder", size, int(settings.get("in_channels") or 3),
                            int(num_classes), "cifar" if size <= 64 else "imagenet")
    shape = dataset_shape(name)
    if image_size or num_classes:
        shape = DatasetShape(shape.name, int(image_size or shape.image_size), shape.in_channels,
                             int(num_classes or shape.num_classes), shape.kind)
    return shape


def _build(genotype, shape, settings: dict[str, Any]):
    from bats_cli.archs import CELLS, arch_of
    from bats_cli.networks import build_network

    width = str(settings.get("width") or "1x")
    arch = arch_of(settings)
    if arch != CELLS:
        return _build_model(arch, shape, settings, width)
    kwargs: dict[str, Any] = {}
    for key in ("activation", "group_policy", "channels_per_group", "reduce_shortcut", "channel_shuffle",
                "stem_groups"):
        if settings.get(key) is not None:
            kwargs[key] = settings[key]
    model = build_network(
        genotype,
        kind=shape.kind,
        num_classes=shape.num_classes,
        in_channels=shape.in_channels,
        width=width if settings.get("channels") is None else "1x",
        layers=settings.get("layers"),
        channels=settings.get("channels"),
        real=bool(settings.get("real")),
        auxiliary=False,
        **kwargs,
    )
    network = {
        "arch": CELLS,
        "kind": shape.kind,
        "width": settings.get("width") if settings.get("channels") is not None else width,
        "channels": model.config.channels,
        "layers": model.config.layers,
        "real": bool(settings.get("real")),
        "num_classes": shape.num_classes,
        "input_size": list(shape.input_size),
    }
    return model, network


def _build_model(arch: str, shape, settings: dict[str, Any], width: str):
    """A fixed model (resnet18) at the data set's shape; cell-only settings are refused."""
    from bats_cli.resnet import build_resnet

    if settings.get("layers") is not None:
        raise UserInputError(f"--layers only applies to cell networks, not to {arch}")
    model = build_resnet(
        kind=shape.kind, num_classes=shape.num_classes, in_channels=shape.in_channels,
        width=width if settings.get("channels") is None else "1x", channels=settings.get("channels"),
        real=bool(settings.get("real")), activation=settings.get("activation") or "prelu",
    )
    network = {
        "arch": arch,
        "kind": shape.kind,
        "width": settings.get("width") if settings.get("channels") is not None else width,
        "channels": model.config.channels,
        "layers": None,
        "real": bool(settings.get("real")),
        "num_classes": shape.num_classes,
        "input_size": list(shape.input_size),
    }
    return model, network


# --------------------------------------------------------------------------- output


def _num(x: float) -> str:
    return f"{x:.4g}" if abs(x) < 1e4 else f"{x:.4e}"


def _mb(n: float) -> str:
    return f"{n / 1e6:.3f} MB"


def _print_tables(result: dict[str, Any], *, verbose: bool) -> None:
    from rich.table import Table

    from bats_cli.cli.options import console_text, stdout_console

    console = stdout_console()
    net = result["network"]
    c, h, w = net["input_size"]
    width = f"width {net['width']}, " if net["width"] else ""
    mode = "real-valued" if net["real"] else "binary"
    console.print(
        f"[bold]{console_text(result['genotype'])}[/bold] on {console_text(result['dataset'])} ({h}x{w}x{c}, "
        f"{net['num_classes']} classes): {mode} {net['kind']} network, {width}C={net['channels']}, "
        + (f"{net['layers']} cells" if net.get("layers") is not None else "ResNet-18")
        + "; batch 1, auxiliary head excluded"
    )
    table = Table(show_edge=False)
    table.add_column("quantity")
    table.add_column("value", justify="right")
    table.add_column("what", style="dim")
    table.add_row("params", f"{result['params'] / 1e6:.3f} M", f"{result['params']:,}")
    table.add_row("FLOPs", _num(result["flops"]), "real-valued MACs: stem, classifier, real convs")
    table.add_row("BOPs", _num(result["bops"]), "binary MACs: convs with binarized input")
    table.add_row("OPs", _num(result["ops"]), "FLOPs + BOPs / 64")
    table.add_row("size fp32", _mb(result["size_fp32_bytes"]), "4 bytes per parameter")
    table.add_row("size packed", _mb(result["size_packed_bytes"]),
                  f"1-bit binary weights; {result['compression']:.1f}x smaller")
    ckpt = result.get("checkpoint")
    if ckpt is not None and ckpt["kind"] == "search":
        console.print(console_text(f"{ckpt['path']} is a search checkpoint: counted {ckpt['counted']}"))
    elif ckpt is not None:
        table.add_row("file", _mb(ckpt["file_bytes"]), console_text(f"{ckpt['kind']} checkpoint {ckpt['path']}"))
        if "compression" in ckpt:
            table.add_row("packed vs fp32", f"{ckpt['compression']:.1f}x",
                          f"fp32 model {_mb(ckpt['fp32_bytes'])} vs this file")
    console.print(table)

    prec = Table(title="per precision (larq-style summary)", title_justify="left", show_edge=False)
    for col in ("precision", "params", "MACs", "memory"):
        prec.add_column(col, justify="left" if col == "precision" else "right")
    for row in result["precision"]:
        prec.add_row(row["precision"], f"{row['params']:,}", _num(row["macs"]), _mb(row["memory_bytes"]))
    prec.add_row("total", f"{result['params']:,}", _num(result["flops"] + result["bops"]),
                 _mb(result["size_packed_bytes"]))
    console.print(prec)

    if "profile" in result:
        _print_profile(console, result["profile"])

    if verbose:
        for key, title in (("by_stage", "stage"), ("by_op", "op")):
            t = Table(title=f"per {title}", title_justify="left", show_edge=False)
            for col in (title, "layers", "params", "FLOPs", "BOPs", "OPs"):
                t.add_column(col, justify="left" if col == title else "right")
            for row in result[key]:
                t.add_row(row[title], str(row["layers"]), f"{row['params']:,}", _num(row["flops"]),
                          _num(row["bops"]), _num(row["ops"]))
            console.print(t)


def _print_profile(console, prof: dict[str, Any]) -> None:
    from rich.table import Table

    from bats_cli.engine.profile import CATEGORIES

    engines = [e for e in ("float", "bitwise") if e in prof]
    t = Table(title=f"measured time per image (batch {prof['batch']}, {prof['threads']} threads, "
                    f"mean of {prof['reps']}; --profile)", title_justify="left", show_edge=False)
    t.add_column("layers")
    for e in engines:
        t.add_column(f"{e} ms", justify="right")
        t.add_column("share", justify="right")
    for cat in CATEGORIES:
        row = [cat]
        for e in engines:
            row += [f"{prof[e]['seconds'][cat] * 1e3:.2f}", f"{100 * prof[e]['share'][cat]:.1f} %"]
        t.add_row(*row)
    total = ["total"]
    for e in engines:
        total += [f"{prof[e]['total_s'] * 1e3:.2f}", "100 %"]
    t.add_row(*total)
    console.print(t)
