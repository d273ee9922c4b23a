"""Models by name (timm's ``register_model`` / ``create_model``): each model says what it is
built from, which settings it accepts and what a checkpoint records to rebuild it. Torch is
imported only when a model is built.

``create_model(arch, genotype, **settings)`` drops None-valued settings (the model keeps its
default) and refuses settings the model does not have; names come from :mod:`bats_cli.core.archs`
(torch-free, for the command line). Adding a fixed baseline is one builder and one entry here.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from bats_cli.core.archs import ARCHS, CELLS, RESNET18, arch_of
from bats_cli.core.errors import UserInputError

if TYPE_CHECKING:
    from torch import nn

# Settings every model takes (``spec`` / ``real``: which tensors are binary; see networks.model_spec).
COMMON = ("kind", "num_classes", "in_channels", "width", "channels", "activation", "real", "spec")


@dataclass(frozen=True)
class ModelEntry:
    """A registered model: its builder and what it accepts and records."""

    name: str
    build: Callable[..., nn.Module]
    settings: tuple[str, ...]  # keyword settings create_model accepts
    records: tuple[str, ...]  # network settings a checkpoint must hold to rebuild it
    record: Callable[[nn.Module], dict[str, Any]]  # the model -> its recorded settings
    label: Callable[[Mapping[str, Any]], str]  # its size in words ("20 cells, C=36")
    noun: str  # what it is in errors ("a cell network", "resnet18")
    genotype: bool = False  # built from a genotype (it has cells)
    options: tuple[str, ...] = ()  # run options that only make sense with it (the auxiliary loss weight)


_MODELS: dict[str, ModelEntry] = {}


def register_model(name: str, **entry: Any) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator: register a builder under ``name`` (one of :data:`bats_cli.core.archs.ARCHS`)."""

    def add(build: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _MODELS or name not in ARCHS:
            raise ValueError(f"model {name!r} is registered twice or not named in bats_cli.core.archs")
        _MODELS[name] = ModelEntry(name=name, build=build, **entry)
        return build

    return add


def list_models() -> list[str]:
    """The registered model names, sorted."""
    return sorted(_MODELS)


def get_model(name: str) -> ModelEntry:
    """The entry of ``name``; an unknown name is one line listing the known ones."""
    try:
        return _MODELS[name]
    except (KeyError, TypeError):
        raise UserInputError(f"unknown network arch {name!r}; known: {', '.join(list_models())}") from None


def model_of(settings: Mapping[str, Any]) -> ModelEntry:
    """The entry of recorded network settings (``arch``; cells for older files without it)."""
    return get_model(arch_of(settings))


def check_same_model(saved_settings: Mapping[str, Any], arch: str, where: Any) -> None:
    """UserInputError unless the run at ``where`` (its saved network settings) built model ``arch``:
    a resumed run continues the same model."""
    saved = model_of(saved_settings)
    if saved is not get_model(arch):
        raise UserInputError(f"cannot resume: {where} trained {saved.noun}, not {get_model(arch).noun}; "
                             "give the same GENOTYPE or another --out")


def arch_for(genotype: Any) -> str:
    """The arch of what ``resolve_network`` returned: a fixed model's name, or a genotype's cells."""
    return genotype if isinstance(genotype, str) else CELLS


def create_model(arch: str, genotype: Any = None, **settings: Any) -> nn.Module:
    """Build model ``arch``; None-valued settings keep the model's default."""
    entry = get_model(arch)
    settings = {k: v for k, v in settings.items() if v is not None}
    unknown = [k for k in settings if k not in entry.settings]
    if unknown:
        raise UserInputError(f"{arch} does not take the setting(s) {', '.join(unknown)}")
    if not entry.genotype:
        return entry.build(**settings)
    if genotype is None:
        raise UserInputError(f"{entry.noun} needs a genotype")
    return entry.build(genotype, **settings)


def accepted(arch: str, options: Mapping[str, Any]) -> dict[str, Any]:
    """The ``options`` that model ``arch`` takes as settings (e.g. from a run config)."""
    entry = get_model(arch)
    return {k: v for k, v in options.items() if k in entry.settings and k != "spec"}


def check_options(arch: str, options: Mapping[str, Any], defaults: Mapping[str, Any]) -> None:
    """UserInputError when an option of another model is changed from its default for ``arch``."""
    entry = get_model(arch)
    own = set(entry.settings) | set(entry.options)
    others = {k for e in _MODELS.values() for k in (*e.settings, *e.options)} - own
    changed = [k for k in options if k in others and k in defaults and options[k] != defaults[k]]
    if changed:
        owners = sorted({e.noun.removeprefix("a ") + "s" for e in _MODELS.values()
                         if set(changed) & {*e.settings, *e.options}})
        flags = ", ".join("--" + k.replace("_", "-") for k in changed)
        raise UserInputError(f"{flags} only apply to {' and '.join(owners)}, not to {arch}")


def _same(value: Any) -> Any:
    return value


_CASTS: dict[str, Callable[[Any], Any]] = {
    **dict.fromkeys(("num_classes", "in_channels", "channels", "layers", "channels_per_group", "channel_shuffle",
                     "stem_groups"), int),
    "auxiliary": bool, "drop_path": float,
}


def rebuild_settings(settings: Mapping[str, Any]) -> dict[str, Any]:
    """Recorded network settings as :func:`create_model` keywords (a missing one is one line)."""
    from bats_cli.layers.quant import BinarySpec

    entry = model_of(settings)
    if settings.get("auxiliary") and "auxiliary" not in entry.settings:  # not silently dropped
        raise UserInputError(f"{entry.name} has no auxiliary tower (settings ask for one)")
    missing = [k for k in entry.records if k not in settings]
    if missing:
        raise UserInputError(f"checkpoint lacks network settings: {', '.join(missing)}")
    # ``width`` is informational (``channels`` is what it resolved to); ``real`` follows the spec.
    kwargs = {k: _CASTS.get(k, _same)(settings[k]) for k in entry.settings
              if k in settings and k not in ("width", "real", "spec")}
    kwargs["spec"] = BinarySpec(activations=bool(settings["binary_activations"]),
                                weights=bool(settings["binary_weights"]))
    return kwargs


# --------------------------------------------------------------------------- the models

_RECORDED = ("kind", "num_classes", "in_channels", "channels", "activation", "binary_activations",
             "binary_weights")


def _common_record(model: nn.Module, spec: Any) -> dict[str, Any]:
    cfg = model.config
    return {"arch": model.arch, "real": spec.real, "kind": cfg.kind, "num_classes": cfg.num_classes,
            "in_channels": cfg.in_channels, "channels": cfg.channels,
            "binary_activations": spec.activations, "binary_weights": spec.weights}


def _record_cells(model: nn.Module) -> dict[str, Any]:
    cfg, ctx = model.config, model.ctx
    return {
        **_common_record(model, ctx.spec), "layers": cfg.layers, "activation": ctx.activation,
        "channels_per_group": ctx.channels_per_group, "group_policy": ctx.group_policy,
        "reduce_shortcut": ctx.reduce_shortcut, "channel_shuffle": ctx.channel_shuffle,
        "stem_groups": cfg.stem_groups, "auxiliary": cfg.auxiliary, "drop_path": cfg.drop_path,
        "space": ctx.space,
    }


def _record_resnet(model: nn.Module) -> dict[str, Any]:
    # No auxiliary tower: training and packing read this key for every network.
    return {**_common_record(model, model.spec), "activation": model.config.activation, "auxiliary": False}


_CELL_SETTINGS = ("layers", "auxiliary", "drop_path", "channels_per_group", "group_policy", "reduce_shortcut",
                  "channel_shuffle", "stem_groups")


@register_model(
    CELLS, settings=(*COMMON, *_CELL_SETTINGS), genotype=True, noun="a cell network", options=("aux_weight",),
    # channel_shuffle and space are absent from files written before they existed.
    records=(*_RECORDED, *(k for k in _CELL_SETTINGS if k != "channel_shuffle")),
    record=_record_cells, label=lambda s: f"{s['layers']} cells, C={s['channels']}",
)
def cells(genotype: Any, **settings: Any) -> nn.Module:
    """A genotype's evaluation network (§6.2, §6.3)."""
    from bats_cli.models.networks import build_network

    return build_network(genotype, **settings)


@register_model(
    RESNET18, settings=COMMON, noun=RESNET18, records=_RECORDED, record=_record_resnet,
    options=("auxiliary",),  # --no-auxiliary changes nothing: it has no tower
    label=lambda s: f"ResNet-18, base width {s['channels']}",
)
def resnet18(**settings: Any) -> nn.Module:
    """Table 5's binary ResNet-18 baseline."""
    from bats_cli.models.resnet import build_resnet

    return build_resnet(**settings)


__all__ = ["COMMON", "ModelEntry", "accepted", "arch_for", "check_options", "check_same_model", "create_model",
           "get_model", "list_models", "model_of", "rebuild_settings", "register_model"]
