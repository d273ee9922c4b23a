"""Run configs: pydantic v2 models whose defaults are the paper's numbers, presets and resume checks.

Precedence: paper default < preset < explicit flag. A flag whose value is None was not given.
Commands define their own model, e.g.::

    class TrainConfig(RunConfig):
        epochs: int = Field(250, gt=0)
        lr: float = Field(1e-3, gt=0)

    cfg = resolve_config(TrainConfig, preset=preset, presets=TRAIN_PRESETS,
                         overrides={"epochs": epochs, "lr": lr, ...})
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from typing import Annotated, Any, Literal, Optional, TypeVar

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError

from bats_cli.core.errors import UserInputError

M = TypeVar("M", bound=BaseModel)

# ---- limits every run setting shares, from a flag or a --config file alike ----------------------
# A value no run can sensibly use is refused where it enters, never half-way through a run; a
# checkpoint's records (bats_cli.storage.metadata) accept at least these, so whatever a run starts with,
# `eval` and `--resume` read back.
MAX_EPOCHS = 1_000_000
MAX_BATCH = 1_000_000
MAX_IMAGES = 1_000_000_000  # --subset, --holdout
MAX_SEED = 2**32 - 1  # numpy's seeds are 32-bit
MAX_IMAGE_SIZE = 4096  # bats_cli.utils.preflight refuses larger images as absurd too
MAX_WORKERS = 256  # each a process: an absurd value is a fork bomb
MAX_THREADS = 1024
MAX_LR = 10.0  # far above any optimiser's useful step; larger ones only make NaN weights
MAX_DECAY = 10.0
MAX_CALIBRATION_BATCHES = 1_000_000
MAX_TEXT_BYTES = 1 << 20  # a --config file

_DEVICE_RE = re.compile(r"^(auto|cpu|cuda(:\d{1,4})?)$")


def _device(value: str) -> str:
    text = value.strip().lower()
    if not _DEVICE_RE.match(text):
        raise ValueError(f"{value[:40]!r}: choose auto, cpu, cuda or cuda:N")
    return text


def _run_name(value: Optional[str]) -> Optional[str]:
    from bats_cli.core.names import has_control_chars

    if value is not None and (not value.strip() or len(value) > 128 or has_control_chars(value)):
        raise ValueError("a name is 1 to 128 characters, no control characters")
    return value


# Annotated field types for the commands' models.
Device = Annotated[str, AfterValidator(_device)]
RunName = Annotated[Optional[str], AfterValidator(_run_name)]
Seed = Annotated[int, Field(ge=0, le=MAX_SEED)]
Workers = Annotated[int, Field(ge=0, le=MAX_WORKERS)]
Threads = Annotated[Optional[int], Field(None, ge=1, le=MAX_THREADS)]
Images = Annotated[Optional[int], Field(None, ge=1, le=MAX_IMAGES)]
Beta = Annotated[float, Field(ge=0.0, lt=1.0)]  # each of Adam's betas, as torch requires

# One key per concept in every command's config; older runs' config.json used these spellings.
RENAMED_KEYS = {"wd": "weight_decay", "arch_wd": "arch_weight_decay"}
DEFAULT_BETAS = (0.9, 0.999)


def current_keys(settings: Mapping[str, Any]) -> dict[str, Any]:
    """``settings`` (a saved config, a --config file) under today's keys: ``wd`` / ``arch_wd``
    (search) become ``weight_decay`` / ``arch_weight_decay``, ``beta1`` / ``beta2``
    (train) become ``betas``; a run saved before the rename resumes as it was."""
    data = {RENAMED_KEYS.get(k, k): v for k, v in settings.items()}
    if "beta1" in data or "beta2" in data:
        old = (data.pop("beta1", DEFAULT_BETAS[0]), data.pop("beta2", DEFAULT_BETAS[1]))
        data.setdefault("betas", list(old))
    return data

# Keys that may change between the original run and its resume: where/how it runs, not what.
RESUME_IGNORED_KEYS: frozenset[str] = frozenset(
    {
        "device",
        "quiet",
        "json",
        "num_workers",
        "data_dir",
        "download",
        "out",
        "resume",
        "preset",
        "threads",
    }
)


class RunConfig(BaseModel):
    """Base for command configs: unknown keys are errors, values are validated on assignment."""

    # NaN and infinity are no setting (``--lr inf``, ``"lr": NaN`` in a --config file).
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class RunPlacement(RunConfig):
    """Base of the long runs' configs (search, train, binarize): where and how a run executes, never
    what it computes. A resumed run may change its device, workers and threads
    (RESUME_IGNORED_KEYS), not its precision."""

    device: Device = "auto"
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    num_workers: Workers = 0
    threads: Threads = Field(None, description="CPU threads; None: torch's default")


def _flag(loc: tuple[Any, ...]) -> str:
    """``("lr_min",)`` -> ``--lr-min``; nested locations keep dots (``--optim.lr``)."""
    parts = [str(p) for p in loc if not isinstance(p, int)] or ["config"]
    return "--" + ".".join(parts).replace("_", "-")


def validation_message(exc: ValidationError, *, from_file: bool = False) -> str:
    """One line naming the first offending field, its value and what is expected.

    A check across settings (a model validator: no field location) names its settings itself;
    its message is used as is, never the whole config. ``from_file``: a ``--config`` file was
    given, so the settings may come from it.
    """
    err = exc.errors()[0]
    more = len(exc.errors()) - 1
    suffix = f" (and {more} more problem{'s' if more > 1 else ''})" if more else ""
    origin = " (settings from --config included)" if from_file else ""
    msg = err.get("msg", "invalid value")
    if not err.get("loc"):
        # pydantic prefixes a validator's ValueError with "Value error, ".
        return f"{msg.removeprefix('Value error, ')}{suffix}{origin}"
    flag = _flag(tuple(err.get("loc", ())))
    if err.get("type") == "extra_forbidden":
        return f"unknown setting {flag}{origin}"
    value = _short_value(err.get("input"))
    if err.get("type") == "missing":
        return f"{flag} is required{suffix}"
    msg = msg.removeprefix("Value error, ")
    return f"invalid value for {flag}: {value}: {msg[0].lower() + msg[1:]}{suffix}{origin}"


def _format_loc(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def format_validation_error(exc: ValidationError, *, allowed: Iterable[str] = ()) -> str:
    """Collapse pydantic's multi-line report into ``field: message; field: message`` (a file's
    fields; flags get :func:`validation_message`). ``allowed``: the field names an unknown one is
    told about."""
    parts = []
    for err in exc.errors(include_url=False):
        loc = _format_loc(tuple(err.get("loc", ())))
        kind = err.get("type", "")
        msg = str(err.get("msg", "invalid"))
        if kind == "value_error":
            # Our own validator already names the field inside the message.
            msg = msg.removeprefix("Value error, ")
            parts.append(msg if not loc else f"{loc}: {msg}")
            continue
        if kind == "extra_forbidden":
            msg = "unknown field" + (f"; allowed: {', '.join(allowed)}" if allowed else "")
        elif kind == "missing":
            msg = "required field is missing"
        elif "input" in err and kind not in ("string_too_short",):
            shown = json.dumps(err["input"], ensure_ascii=False, default=str)
            if len(shown) > 60:
                shown = shown[:57] + "..."
            msg = f"{msg} (got {shown})"
        parts.append(f"{loc}: {msg}" if loc else msg)
    return "; ".join(p.replace("\n", " ") for p in parts)


def _short_value(value: Any, limit: int = 60) -> str:
    """``repr(value)`` for a message: bounded, and no failure on a number of thousands of digits."""
    try:
        text = repr(value)
    except ValueError:
        return "a number with thousands of digits"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def resolve_config(
    model_cls: type[M],
    *,
    preset: str | None,
    presets: Mapping[str, Mapping[str, Any]],
    overrides: Mapping[str, Any],
    file_config: Mapping[str, Any] | None = None,
) -> M:
    """Build ``model_cls`` from its defaults, then ``presets[preset]``, then ``file_config``
    (``--config FILE``), then the non-None overrides (the flags)."""
    return validate_config(model_cls, _layered({}, preset=preset, presets=presets,
                                               overrides=overrides, file_config=file_config),
                           from_file=file_config is not None)


def _layered(
    data: dict[str, Any],
    *,
    preset: str | None,
    presets: Mapping[str, Mapping[str, Any]],
    overrides: Mapping[str, Any],
    file_config: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """``data`` updated with ``presets[preset]`` (checked to exist), the file's, then the flags."""
    if preset is not None:
        if preset not in presets:
            choices = ", ".join(sorted(presets)) or "(none)"
            raise UserInputError(f"unknown --preset {preset!r}; choose one of: {choices}")
        data.update(presets[preset])
    if file_config:
        data.update(file_config)
    given = {k for k, v in overrides.items() if v is not None}
    for one, other in _ALTERNATIVES:
        # A flag replaces a preset's (or file's) way of saying the same thing, not just its value.
        if one in given and other not in given:
            data.pop(other, None)
    data.update({k: v for k, v in overrides.items() if v is not None})
    return data


# Settings that say one thing two ways (network width as a preset name or as channels).
_ALTERNATIVES = (("width", "channels"), ("channels", "width"))


# Keys of a run's config.json that describe the run, not settings (ignored by --config FILE).
_RECORD_ONLY = frozenset({"genotype"})


def load_config_file(path, model_cls: type[BaseModel]) -> dict[str, Any]:
    """The settings in a ``--config`` JSON file: a flat object, or a run's ``config.json``
    (whose ``config`` member holds them). Unknown keys are one error naming them."""
    from pathlib import Path

    from bats_cli.core.fileio import load_json_file
    from bats_cli.core.names import exists, safe_text

    path = Path(path)
    if not exists(path):
        raise UserInputError(f"--config {path}: no such file")
    if path.is_dir():
        raise UserInputError(f"--config {path}: is a directory; give a JSON file")
    # Bounded by the bytes read: a FIFO or /dev/zero is refused, not read forever.
    data = load_json_file(path, max_bytes=MAX_TEXT_BYTES, what="a --config file", where=f"--config {path}",
                          label="not readable JSON")
    if isinstance(data, dict) and isinstance(data.get("config"), dict):
        data = data["config"]
    if not isinstance(data, dict):
        raise UserInputError(f"--config {path}: expected a JSON object of settings")
    data = current_keys(data)
    unknown = sorted(k for k in data if k not in model_cls.model_fields)
    if unknown:
        shown = ", ".join(safe_text(k, max_chars=40) for k in unknown[:5])
        more = f" (+{len(unknown) - 5} more)" if len(unknown) > 5 else ""
        raise UserInputError(f"--config {path}: unknown setting(s) {shown}{more}")
    return {k: v for k, v in data.items() if k not in _RECORD_ONLY}


def validate_config(model_cls: type[M], data: Mapping[str, Any], *, from_file: bool = False) -> M:
    """``model_cls.model_validate(data)`` with ValidationError turned into one-line UserInputError."""
    try:
        return model_cls.model_validate(dict(data))
    except ValidationError as exc:
        raise UserInputError(validation_message(exc, from_file=from_file)) from None


def resolve_resume_config(
    model_cls: type[M],
    saved: Mapping[str, Any],
    *,
    preset: str | None,
    presets: Mapping[str, Mapping[str, Any]],
    overrides: Mapping[str, Any],
    ignore: Iterable[str] = RESUME_IGNORED_KEYS,
) -> M:
    """Config for a resumed run: the saved config, then preset and flags, which must agree with it.

    So ``--out RUN --resume`` alone works, and repeating the original command line works too;
    changing e.g. ``--epochs`` is refused by :func:`check_resume_config`.
    """
    data = {k: v for k, v in current_keys(saved).items() if k in model_cls.model_fields}
    data = _layered(data, preset=preset, presets=presets, overrides=overrides)
    cfg = validate_config(model_cls, data)
    check_resume_config(saved, cfg, ignore=ignore)
    return cfg


def _as_plain(obj: Any) -> Any:
    """Models, tuples and paths to what JSON would hold, so saved and new compare equal."""
    if isinstance(obj, BaseModel):
        obj = obj.model_dump(mode="json")
    return json.loads(json.dumps(obj, default=str))


def _flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(obj, dict) and (obj or not prefix):
        out: dict[str, Any] = {}
        for k, v in obj.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: obj}


def _show(value: Any) -> str:
    if value is _ABSENT:
        return "(absent)"
    return value if isinstance(value, str) else json.dumps(value)


_ABSENT = object()


def config_diff(
    old: Mapping[str, Any] | BaseModel,
    new: Mapping[str, Any] | BaseModel,
    ignore: Iterable[str] = RESUME_IGNORED_KEYS,
) -> list[str]:
    """``["epochs: 5 -> 6", ...]`` for every (dotted) key whose value differs, in key order."""
    ignored = set(ignore)
    a, b = (_flatten(_as_plain(current_keys(c) if isinstance(c, Mapping) else c)) for c in (old, new))
    lines = []
    for key in list(a) + [k for k in b if k not in a]:
        if key in ignored or key.split(".", 1)[0] in ignored:
            continue
        va, vb = a.get(key, _ABSENT), b.get(key, _ABSENT)
        if va != vb or type(va) is not type(vb) and not _same_number(va, vb):
            lines.append(f"{key}: {_show(va)} -> {_show(vb)}")
    return lines


def _same_number(a: Any, b: Any) -> bool:
    # 5 and 5.0 are the same setting (JSON may drop the ".0"); True and 1 are not.
    numeric = (int, float)
    return (
        isinstance(a, numeric)
        and isinstance(b, numeric)
        and not isinstance(a, bool)
        and not isinstance(b, bool)
        and a == b
    )


def check_resume_config(
    saved: Mapping[str, Any] | BaseModel,
    new: Mapping[str, Any] | BaseModel,
    *,
    ignore: Iterable[str] = RESUME_IGNORED_KEYS,
) -> None:
    """UserInputError ``cannot resume: config differs: epochs: 5 -> 6, ...`` unless they agree."""
    diff = config_diff(saved, new, ignore)
    if diff:
        raise UserInputError(
            "cannot resume: config differs: "
            + ", ".join(diff)
            + " (start a new run with another --out to change settings)"
        )
