"""Strict validation of what a checkpoint's header says, before anything acts on it.

A checkpoint is a file from anywhere, like a genotype: its metadata JSON is parsed with size
and depth limits and validated by pydantic models (types, ranges), dtypes come from an allowlist
(never ``getattr(torch, <string from the file>)``), and every floating tensor must be finite.
Unknown keys inside the known records are allowed (newer writers add some) but must be plain
JSON; every problem is one :class:`~bats_cli.core.errors.UserInputError` line naming the file.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, Optional

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from bats_cli.core import fileio
from bats_cli.core.config import MAX_IMAGE_SIZE as _MAX_IMAGE_SIZE
from bats_cli.core.config import MAX_IMAGES, MAX_LR, MAX_SEED, format_validation_error
from bats_cli.core.errors import UserInputError
from bats_cli.core.names import safe_text
from bats_cli.utils.preflight import MAX_CHANNELS, MAX_LAYERS

# One metadata value: optimizer state of a 20-cell network is ~100 kB; 16 MB is far beyond.
MAX_JSON_BYTES = 16 * 1024 * 1024
# Sizes a network record may name (MAX_CHANNELS / MAX_LAYERS from preflight.py, which also
# refuses what does not fit this machine).
MAX_CLASSES = 1_000_000
MAX_IMAGE_SIZE = _MAX_IMAGE_SIZE  # what --image-size allows

# Tensor dtypes a bats checkpoint holds (names as torch prints them, without "torch.").
DTYPES: dict[str, torch.dtype] = {
    "float64": torch.float64,
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
    "int32": torch.int32,
    "int16": torch.int16,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "bool": torch.bool,
}
_ALLOWED = frozenset(DTYPES.values())


def dtype_from_name(name: object, *, where: str) -> torch.dtype:
    """A torch dtype from the allowlist; UserInputError for anything else."""
    if not isinstance(name, str) or name not in DTYPES:
        raise UserInputError(f"{where}: dtype {safe_text(repr(name), max_chars=40)} is not allowed")
    return DTYPES[name]


# --------------------------------------------------------------------------- bounded JSON


def load_json(text: object, *, where: str, max_bytes: int = MAX_JSON_BYTES) -> Any:
    """Parse metadata JSON: :func:`bats_cli.core.fileio.load_json` with the metadata size limit."""
    return fileio.load_json(text, where=where, max_bytes=max_bytes)


def validate(model: type[BaseModel], data: Any, *, where: str) -> BaseModel:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise UserInputError(f"{where}: {safe_text(format_validation_error(exc), max_chars=400)}") from None


# --------------------------------------------------------------------------- records


class _Record(BaseModel):
    # Unknown keys may come from newer writers; the known ones are checked strictly.
    model_config = ConfigDict(extra="allow", strict=True)


Name = Field(default=None, max_length=200)


class NetworkRecord(_Record):
    """``config.network``: what rebuilds the network (see ``network_settings``).

    A key may be absent (older files; the rebuild then names what is missing) but never null or
    of another type: every value here reaches a network builder.
    """

    # bats_cli.core.archs.ARCHS; absent in files written before fixed models existed (cells then).
    arch: Literal["cells", "resnet18"] = None  # type: ignore[assignment]
    kind: Literal["cifar", "imagenet"] = None  # type: ignore[assignment]
    num_classes: int = Field(default=None, ge=1, le=MAX_CLASSES)
    in_channels: int = Field(default=None, ge=1, le=64)
    channels: int = Field(default=None, ge=1, le=MAX_CHANNELS)
    layers: int = Field(default=None, ge=1, le=MAX_LAYERS)
    channels_per_group: int = Field(default=None, ge=1, le=MAX_CHANNELS)
    stem_groups: int = Field(default=None, ge=1, le=MAX_CHANNELS)
    channel_shuffle: int = Field(default=None, ge=0, le=MAX_CHANNELS)
    image_size: int = Field(default=None, ge=1, le=MAX_IMAGE_SIZE)
    drop_path: float = Field(default=None, ge=0.0, lt=1.0, allow_inf_nan=False)
    auxiliary: bool = None  # type: ignore[assignment]
    real: bool = None  # type: ignore[assignment]
    binary_activations: bool = None  # type: ignore[assignment]
    binary_weights: bool = None  # type: ignore[assignment]
    width: str = Name
    activation: Literal["prelu", "rprelu", "relu", "none"] = None  # type: ignore[assignment]
    group_policy: Literal["groups", "channels"] = None  # type: ignore[assignment]
    reduce_shortcut: Literal["avgpool", "factorized", "none"] = None  # type: ignore[assignment]
    space: Literal["bats", "darts"] = None  # type: ignore[assignment]
    dataset: str = Name


class PackingRecord(BaseModel):
    """``config.packing`` of a packed artifact: the layout and every binary conv's weight shape."""

    model_config = ConfigDict(extra="allow", strict=True)

    layout: str = Field(max_length=64)
    binary_convs: dict[str, Annotated[list[Annotated[int, Field(ge=1, le=MAX_CHANNELS * 64)]],
                                      Field(min_length=1, max_length=8)]] = Field(max_length=100_000)


class AugmentRecord(BaseModel):
    """``config.data.augment``: rebuilt as ``AugmentConfig(**record)``, so no unknown keys."""

    model_config = ConfigDict(extra="forbid", strict=True)

    cutout: Optional[int] = Field(default=None, ge=1, le=MAX_IMAGE_SIZE)
    mixup: Optional[float] = Field(default=None, gt=0.0, allow_inf_nan=False)
    autoaugment: bool = False


class RunRecord(_Record):
    """``config.run``: the settings a run was started with (values later runs reuse)."""

    seed: Optional[int] = Field(default=None, ge=0, le=MAX_SEED)
    batch_size: Optional[int] = Field(default=None, ge=1, le=10**7)
    epochs: Optional[int] = Field(default=None, ge=0, le=10**7)
    subset: Optional[int] = Field(default=None, ge=1, le=MAX_IMAGES)
    # What `bats binarize` reuses of the training run: the held-out images, the optimiser.
    holdout: Optional[int] = Field(default=None, ge=1, le=MAX_IMAGES)
    image_size: Optional[int] = Field(default=None, ge=1, le=MAX_IMAGE_SIZE)
    optimizer: Optional[str] = Field(default=None, max_length=32)
    lr: Optional[float] = Field(default=None, ge=0.0, le=MAX_LR, allow_inf_nan=False)
    lr_min: Optional[float] = Field(default=None, ge=0.0, le=MAX_LR, allow_inf_nan=False)
    beta1: Optional[float] = Field(default=None, ge=0.0, lt=1.0)
    beta2: Optional[float] = Field(default=None, ge=0.0, lt=1.0)
    betas: Optional[list[Annotated[float, Field(ge=0.0, lt=1.0)]]] = Field(default=None, min_length=2, max_length=2)
    aux_weight: Optional[float] = Field(default=None, ge=0.0, le=100.0, allow_inf_nan=False)
    # Reused on resume: processes and threads, so an absurd value would be a fork bomb.
    num_workers: Optional[int] = Field(default=None, ge=0, le=256)
    threads: Optional[int] = Field(default=None, ge=1, le=1024)
    dataset: Optional[str] = Name
    data_dir: Optional[str] = Field(default=None, max_length=4096)


class DataRecord(_Record):
    """``config.data``: the data set a network was trained on."""

    name: str = Name
    num_classes: int = Field(default=None, ge=1, le=MAX_CLASSES)
    image_size: int = Field(default=None, ge=1, le=MAX_IMAGE_SIZE)
    in_channels: int = Field(default=None, ge=1, le=64)
    network: Literal["cifar", "imagenet"] = None  # type: ignore[assignment]
    data_dir: Optional[str] = Field(default=None, max_length=4096)
    augment: Optional[AugmentRecord] = None


class RunningState(BaseModel):
    """``bats_running``: the running sums of an epoch in progress."""

    model_config = ConfigDict(extra="forbid", strict=True)

    loss_sum: float = Field(ge=0.0, allow_inf_nan=False)
    correct: float = Field(ge=0.0, allow_inf_nan=False)
    seen: float = Field(ge=0.0, allow_inf_nan=False)
    best_top1: float = Field(ge=-1.0, le=100.0, allow_inf_nan=False)
    best_epoch: int = Field(ge=0)


class OptimizerState(BaseModel):
    """``bats_optimizer`` (and a search's ``optim_w`` / ``optim_a``): optimizer state by name."""

    model_config = ConfigDict(extra="forbid", strict=True)

    state: dict[str, dict[str, Any]]
    param_groups: list[dict[str, Any]] = Field(min_length=1, max_length=64)


class SearchState(_Record):
    """A search checkpoint's ``search_state``."""

    stage: int = Field(ge=0, le=64)
    epoch: int = Field(ge=0, le=10**7)
    step: int = Field(ge=0, le=10**9)
    steps_per_epoch: int = Field(ge=0, le=10**9)
    stage_seconds: list[float]
    finished: bool = False
    in_channels: int = Field(ge=1, le=64)
    num_classes: int = Field(ge=1, le=MAX_CLASSES)
    accum: dict[str, Any] = Field(default_factory=dict)
    scaler_w: str = ""
    scaler_a: str = ""


class ArchState(_Record):
    """A search checkpoint's ``arch_state``: temperatures and candidate op lists per edge."""

    space: str = Field(max_length=64)
    steps: int = Field(ge=1, le=64)
    temperature_normal: float = Field(gt=0.0, allow_inf_nan=False)
    temperature_reduce: float = Field(gt=0.0, allow_inf_nan=False)
    candidates_normal: list[list[str]] = Field(max_length=10_000)
    candidates_reduce: list[list[str]] = Field(max_length=10_000)
    run_name: Optional[str] = Field(default=None, max_length=200)


class Header(BaseModel):
    """The reserved keys every bats checkpoint has."""

    model_config = ConfigDict(extra="forbid", strict=True)

    format: int = Field(ge=1)
    kind: str = Field(max_length=32)
    epoch: int = Field(ge=0, le=10**7)
    step: int = Field(ge=0, le=10**9)
    versions: dict[str, str]
    config: dict[str, Any]


# Extra keys whose JSON has a schema; others must merely be bounded JSON or plain text.
_EXTRA_MODELS: dict[str, type[BaseModel]] = {
    "bats_running": RunningState,
    "bats_optimizer": OptimizerState,
    "optim_w": OptimizerState,
    "optim_a": OptimizerState,
    "search_state": SearchState,
    "arch_state": ArchState,
}


def _int(text: object, *, where: str) -> int:
    if not isinstance(text, str) or not text.strip().lstrip("-").isdigit() or len(text) > 20:
        raise UserInputError(f"{where}: expected an integer, got {safe_text(repr(text), max_chars=40)}")
    return int(text)


def parse_header(path: Path, raw: Mapping[str, str]) -> Header:
    """Validated reserved keys of a checkpoint's metadata (config and versions parsed)."""
    where = f"{path}: bats metadata"
    config = load_json(raw.get("bats_config", "{}"), where=f"{where} bats_config")
    versions = load_json(raw.get("bats_versions", "{}"), where=f"{where} bats_versions")
    header = validate(
        Header,
        {
            "format": _int(raw["bats_format"], where=f"{where} bats_format"),
            "kind": raw["bats_kind"],
            "epoch": _int(raw.get("bats_epoch", "0"), where=f"{where} bats_epoch"),
            "step": _int(raw.get("bats_step", "0"), where=f"{where} bats_step"),
            "versions": versions,
            "config": config,
        },
        where=where,
    )
    check_recorded_config(path, config)
    return header


def check_recorded_config(path: Path | str, config: Any) -> dict[str, Any]:
    """A recorded config (checkpoint or ONNX metadata): an object whose known records check out."""
    if not isinstance(config, dict):
        raise UserInputError(f"{path}: config: expected an object")
    for key, model in (("network", NetworkRecord), ("data", DataRecord), ("run", RunRecord),
                       ("packing", PackingRecord)):
        if key in config and config[key] is not None:
            validate(model, config[key], where=f"{path}: config.{key}")
    # A search checkpoint keeps its run settings at the top level.
    top = {k: config[k] for k in ("num_workers", "threads", "seed", "batch_size") if k in config}
    if top:
        validate(RunRecord, top, where=f"{path}: config")
    _check_finite(config, where=f"{path}: config")
    return config


def parse_extra(path: Path, extra: Mapping[str, str], *, config: Mapping[str, Any] | None = None) -> None:
    """Size limits on every extra value; schema checks on the ones bats reads as state."""
    stages = (config or {}).get("layers")
    if "search_state" in extra and isinstance(stages, list):
        state = load_json(extra["search_state"], where=f"{path}: search_state")
        stage = state.get("stage") if isinstance(state, dict) else None
        if isinstance(stage, int) and not 0 <= stage < len(stages):
            raise UserInputError(
                f"{path}: search_state: stage {stage} does not exist in a {len(stages)}-stage search"
            )
    for key, value in extra.items():
        if not isinstance(value, str) or len(value) > MAX_JSON_BYTES:
            raise UserInputError(f"{path}: metadata {safe_text(key, max_chars=60)} is far too large")
        if key in _EXTRA_MODELS:
            data = load_json(value, where=f"{path}: {key}")
            validate(_EXTRA_MODELS[key], data, where=f"{path}: {key}")
            if isinstance(data, dict) and key in ("bats_optimizer", "optim_w", "optim_a"):
                check_encoded(data, where=f"{path}: {key}")
        elif value[:1] in ("{", "["):
            load_json(value, where=f"{path}: {safe_text(key, max_chars=60)}")


def _check_finite(obj: Any, *, where: str, depth: int = 0) -> None:
    if isinstance(obj, float) and not math.isfinite(obj):
        raise UserInputError(f"{where}: holds a non-finite number")
    if isinstance(obj, dict):
        for v in obj.values():
            _check_finite(v, where=where, depth=depth + 1)
    elif isinstance(obj, list):
        for v in obj:
            _check_finite(v, where=where, depth=depth + 1)


def check_encoded(obj: Any, *, where: str) -> None:
    """Encoded optimizer / scaler state: scalar tensors only with allowlisted dtypes."""
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            dtype_from_name(obj.get("dtype"), where=where)
            if not isinstance(obj["__tensor__"], (int, float, bool)):
                raise UserInputError(f"{where}: a scalar tensor holds a non-number")
        for value in obj.values():
            check_encoded(value, where=where)
    elif isinstance(obj, list):
        for value in obj:
            check_encoded(value, where=where)


# --------------------------------------------------------------------------- tensors


def check_tensors(path: Path, tensors: Mapping[str, torch.Tensor]) -> None:
    """Allowlisted dtypes only; every floating tensor finite (NaN/Inf weights are refused)."""
    for name, t in tensors.items():
        if t.dtype not in _ALLOWED:
            raise UserInputError(
                f"{path}: tensor {safe_text(name, max_chars=120)} has dtype "
                f"{str(t.dtype).removeprefix('torch.')}, which bats never writes"
            )
        if t.is_floating_point() and t.numel() and not bool(torch.isfinite(t).all()):
            raise UserInputError(
                f"{path}: tensor {safe_text(name, max_chars=120)} holds NaN or infinite values "
                "(a corrupt file, or saved from a diverged run); refusing to use it"
            )


def check_state_dtypes(path: Path, own: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor]) -> None:
    """Where the network holds floats the file must too (an int tensor would be cast silently)."""
    for key, expected in own.items():
        got = state.get(key)
        if got is None:
            continue
        if expected.is_floating_point() != got.is_floating_point() or (
            expected.dtype == torch.bool
        ) != (got.dtype == torch.bool):
            raise UserInputError(
                f"{path}: tensor {safe_text(key, max_chars=120)} is "
                f"{str(got.dtype).removeprefix('torch.')}, the network needs "
                f"{str(expected.dtype).removeprefix('torch.')}"
            )
