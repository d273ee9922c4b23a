"""Model I/O: a network's settings <-> the network, its tensors in and out of safetensors, the
genotype recorded in a file, and every file the pipeline writes rebuilt as a model.

Used by ``train``, ``binarize``, ``eval``, ``pack``, ``flops`` and ``export``: one place knows how a
checkpoint describes its network. Checkpoint metadata ``bats_config`` is
``{"run": <the run config>, "network": <settings: see network_settings>, "data": <data record>}``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bats_cli.core.archs import arch_of
from bats_cli.core.errors import UserInputError
from bats_cli.models.registry import create_model, get_model, model_of, rebuild_settings

# Kinds of file that hold a whole evaluation network.
EVAL_KINDS = ("train", "binarize", "packed")

# --------------------------------------------------------------------------- settings <-> network


def network_settings(model: nn.Module, *, width: str = "1x", data_spec=None) -> dict[str, Any]:
    """Everything needed to rebuild ``model`` with :func:`build_from_settings` (JSON-ready).

    With ``data_spec`` the data set's name and image size are added (``bats flops`` reads them
    to count a checkpoint's network at its input size).
    """
    extra = {}
    if data_spec is not None:
        extra = {"dataset": data_spec.name, "image_size": data_spec.image_size}
    # ``width`` is informational: ``channels`` is what the width resolved to.
    return {**extra, **get_model(model.arch).record(model), "width": width}


def build_from_settings(genotype, settings: Mapping[str, Any], **changes: Any) -> nn.Module:
    """The network described by ``settings`` (see :func:`network_settings`), with ``changes``.

    ``genotype`` builds a cell network; a fixed model (``settings["arch"]``) takes None.
    """
    s = {**settings, **changes}
    return create_model(arch_of(s), genotype, **rebuild_settings(s))


def data_info(spec, augment) -> dict[str, Any]:
    """The data spec (and augmentation) as recorded in checkpoints."""
    return {
        "name": spec.name,
        "num_classes": spec.num_classes,
        "image_size": spec.image_size,
        "in_channels": spec.in_channels,
        "network": spec.network,
        "augment": asdict(augment) if augment is not None else None,
    }


def check_dataset(spec, settings: dict[str, Any], path: Path | str) -> None:
    """UserInputError (one line) when the data set cannot feed the checkpoint's network."""
    problems = []
    if spec.num_classes != settings["num_classes"]:
        problems.append(f"{spec.num_classes} classes, the network predicts {settings['num_classes']}")
    if spec.in_channels != settings["in_channels"]:
        problems.append(
            f"{spec.in_channels}-channel images, the network takes {settings['in_channels']}"
        )
    if spec.network != settings["kind"]:
        problems.append(
            f"{spec.image_size} px images need the {spec.network} network, the checkpoint is a "
            f"{settings['kind']} network"
        )
    if problems:
        raise UserInputError(
            f"dataset {spec.name} does not fit {path}: " + "; ".join(problems)
        )


# --------------------------------------------------------------------------- tensors


def model_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model.<state_dict key>`` tensors on the CPU, as checkpoints store them."""
    return {f"model.{k}": v.detach().cpu() for k, v in model.state_dict().items()}


def load_model_tensors(model: nn.Module, tensors: Mapping[str, torch.Tensor], path: Path) -> None:
    """Load ``model.*`` tensors strictly; a mismatch is one line naming the checkpoint."""
    state = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        detail = []
        if missing:
            detail.append(f"missing {len(missing)} tensors (e.g. {missing[0]})")
        if unexpected:
            detail.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        if wrong:
            k = wrong[0]
            detail.append(
                f"{len(wrong)} with another shape (e.g. {k}: {tuple(state[k].shape)} in the file, "
                f"{tuple(own[k].shape)} in the network)"
            )
        raise UserInputError(
            f"{path}: weights do not match the network its genotype and settings describe: "
            + "; ".join(detail)
        )
    from bats_cli.storage.metadata import check_state_dtypes

    check_state_dtypes(path, own, state)  # float weights only: an int tensor would be cast silently
    model.load_state_dict(state, strict=True)


# --------------------------------------------------------------------------- genotype in metadata


def load_genotype_from_meta(meta) -> Any:
    """The genotype recorded in a checkpoint's metadata; None for a fixed model (no cells)."""
    from bats_cli.core.genotype import Genotype

    network = meta.config.get("network")
    if isinstance(network, Mapping) and not model_of(network).genotype:
        return None
    if not meta.genotype_json:
        raise UserInputError(f"{meta.path}: the checkpoint records no genotype")
    return Genotype.from_json(meta.genotype_json, origin=f"{meta.path} (genotype metadata)")


def genotype_name(text: str) -> str:
    """The ``name`` of a genotype recorded as JSON text ("?" when unreadable)."""
    try:
        return json.loads(text).get("name", "?")
    except (ValueError, AttributeError):
        return "?"


def genotype_differs(saved_json: str, genotype) -> bool:
    """True when the recorded genotype is another cell than ``genotype`` (names do not count)."""
    try:
        saved = json.loads(saved_json)
    except ValueError:
        return True
    if not isinstance(saved, dict):
        return True
    keys = ("space", "normal", "normal_concat", "reduce", "reduce_concat")
    now = genotype.to_dict()
    return any(json.dumps(saved.get(k)) != json.dumps(now.get(k)) for k in keys)


# --------------------------------------------------------------------------- whole files


def network_name(genotype, settings: Mapping[str, Any]) -> str:
    """What a network is called in results: its genotype's name, or the fixed model's."""
    entry = model_of(settings)
    return genotype.name if entry.genotype and genotype is not None else entry.name


def network_label(settings: Mapping[str, Any]) -> str:
    """Its size in words: "20 cells, C=36" or "ResNet-18, base width 64"."""
    return model_of(settings).label(settings)


@dataclass
class LoadedModel:
    """A model rebuilt from a checkpoint or packed artifact, with what the file records."""

    model: nn.Module
    meta: Any
    settings: dict[str, Any]
    data: dict[str, Any]
    run: dict[str, Any]
    genotype: Any  # None for a fixed model (``settings["arch"]``)

    @property
    def name(self) -> str:
        return network_name(self.genotype, self.settings)


def rebuild(genotype, settings: Mapping[str, Any], path) -> nn.Module:
    """:func:`build_from_settings` whose failure names the file the settings came from."""
    try:
        return build_from_settings(genotype, settings)
    except (KeyError, UserInputError) as exc:
        raise UserInputError(f"{path}: cannot rebuild its network: {exc}") from None


def unpack(path: str | Path):
    """``(model, meta)``: the network of a packed artifact with ±1 weights, in eval mode."""
    from bats_cli.models.pack import BITS_PREFIX, LAYOUT, MODEL_PREFIX, unpack_bits
    from bats_cli.storage.checkpoint import load_checkpoint

    tensors, meta = load_checkpoint(path, expect_kind="packed", command="unpack")
    info = meta.config.get("packing") or {}
    if info.get("layout") != LAYOUT:
        raise UserInputError(f"{meta.path}: unknown packing layout {info.get('layout')!r}")
    genotype = load_genotype_from_meta(meta)
    model = rebuild(genotype, meta.config.get("network") or {}, meta.path)
    state = {k: v for k, v in tensors.items() if k.startswith(MODEL_PREFIX)}
    shapes = info.get("binary_convs") or {}
    for name, shape in shapes.items():
        key = f"{BITS_PREFIX}{name}.weight"
        if key not in tensors:
            raise UserInputError(f"{meta.path}: missing packed weight {key}")
        state[f"{MODEL_PREFIX}{name}.weight"] = unpack_bits(tensors[key], shape)
    load_model_tensors(model, state, meta.path)
    model.eval()
    return model, meta


def load_model(path: str | Path, *, command: str = "eval", kinds=EVAL_KINDS) -> LoadedModel:
    """Rebuild the network a ``train`` / ``binarize`` / ``packed`` file describes, weights loaded."""
    from bats_cli.storage.checkpoint import check_kind, load_checkpoint, read_metadata

    meta = read_metadata(path)
    check_kind(meta, kinds, command)
    settings = meta.config.get("network")
    if not isinstance(settings, dict):
        raise UserInputError(f"{meta.path}: the checkpoint records no network settings")
    genotype = load_genotype_from_meta(meta)
    if meta.kind == "packed":
        model, meta = unpack(meta.path)
    else:
        model = rebuild(genotype, settings, meta.path)
        tensors, _ = load_checkpoint(meta.path)
        load_model_tensors(model, tensors, meta.path)
    model.eval()
    return LoadedModel(
        model=model, meta=meta, settings=settings, data=meta.config.get("data") or {},
        run=meta.config.get("run") or {}, genotype=genotype,
    )


__all__ = [
    "EVAL_KINDS",
    "LoadedModel",
    "build_from_settings",
    "check_dataset",
    "data_info",
    "genotype_differs",
    "genotype_name",
    "load_genotype_from_meta",
    "load_model",
    "load_model_tensors",
    "model_tensors",
    "network_label",
    "network_name",
    "network_settings",
    "rebuild",
    "unpack",
]
