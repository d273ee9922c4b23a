"""safetensors checkpoints with string metadata; atomic writes, header-only reads, validation.

Metadata keys (all strings): ``bats_format`` (int), ``bats_kind``, ``bats_config`` (JSON),
``bats_genotype`` (JSON, optional), ``bats_epoch``, ``bats_step``, ``bats_versions`` (JSON), plus
the caller's ``extra`` keys. No pickle: optimizer / scheduler / scaler state is split into tensors
(per-parameter buffers, keyed by parameter *name*) and JSON (everything scalar).

Epoch convention: ``epoch`` = number of *completed* epochs; ``step`` = optimizer steps already
taken inside the next epoch (0 at an epoch boundary).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from bats_cli.errors import UserInputError
from bats_cli.fileio import atomic_target, to_jsonable
from bats_cli.provenance import software_versions
from bats_cli.rundir import BEST_NAME, LAST_NAME

FORMAT_VERSION = 1
KINDS = ("search", "train", "binarize", "packed")
# Metadata keys this module owns; ``extra`` may not reuse them.
RESERVED_KEYS = frozenset(
    {
        "bats_format",
        "bats_kind",
        "bats_config",
        "bats_genotype",
        "bats_epoch",
        "bats_step",
        "bats_versions",
    }
)

__all__ = [
    "BEST_NAME",
    "FORMAT_VERSION",
    "KINDS",
    "LAST_NAME",
    "CheckpointMeta",
    "latest_checkpoint",
    "load_checkpoint",
    "load_optimizer_state",
    "load_scheduler_state",
    "optimizer_state_tensors",
    "read_metadata",
    "save_checkpoint",
    "scheduler_state_json",
    "state_from_json",
    "state_to_json",
]


@dataclass(frozen=True)
class CheckpointMeta:
    """What :func:`read_metadata` finds in a checkpoint's header."""

    path: Path
    kind: str
    config: dict[str, Any]
    genotype_json: str | None
    epoch: int
    step: int
    versions: dict[str, str]
    format: int
    extra: dict[str, str] = field(default_factory=dict)


# --------------------------------------------------------------------------- save


def _storage_key(t: torch.Tensor) -> tuple[str, int] | None:
    if t.numel() == 0 or t.device.type == "meta":
        return None
    return (str(t.device), t.untyped_storage().data_ptr())


def _prepare_tensors(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached, contiguous tensors with no shared storage (safetensors rejects aliasing)."""
    seen: set[tuple[str, int]] = set()
    out: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        if not isinstance(name, str) or not isinstance(t, torch.Tensor):
            raise TypeError(f"checkpoint entries must be str -> Tensor, got {name!r}")
        t = t.detach()
        key = _storage_key(t)
        # Tied weights / views share a storage: give every entry its own compact copy.
        shares = key is not None and (
            key in seen or t.untyped_storage().nbytes() != t.numel() * t.element_size()
        )
        if shares or not t.is_contiguous():
            t = t.contiguous().clone() if shares else t.contiguous()
        if key is not None:
            seen.add(key)
        out[name] = t
    return out


def save_checkpoint(
    path: str | os.PathLike[str],
    tensors: Mapping[str, torch.Tensor],
    *,
    kind: str,
    config: Mapping[str, Any],
    epoch: int,
    step: int = 0,
    genotype_json: str | None = None,
    extra: Mapping[str, str] | None = None,
) -> Path:
    """Write a checkpoint atomically (temp file + fsync + ``os.replace``); returns ``path``."""
    from safetensors.torch import save_file

    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, not {kind!r}")
    extra = dict(extra or {})
    clash = RESERVED_KEYS & set(extra)
    if clash:
        raise ValueError(f"extra metadata may not use reserved keys {sorted(clash)}")
    if not all(isinstance(v, str) for v in extra.values()):
        raise TypeError("extra metadata values must be strings")
    metadata = {
        "bats_format": str(FORMAT_VERSION),
        "bats_kind": kind,
        "bats_config": json.dumps(to_jsonable(config), sort_keys=True),
        "bats_epoch": str(int(epoch)),
        "bats_step": str(int(step)),
        "bats_versions": json.dumps(software_versions(), sort_keys=True),
        **extra,
    }
    if genotype_json is not None:
        metadata["bats_genotype"] = genotype_json
    prepared = _prepare_tensors(tensors)
    path = Path(path)
    with atomic_target(path) as tmp:
        save_file(prepared, str(tmp), metadata=metadata)
    return path


# --------------------------------------------------------------------------- read / load


def _open_error(path: Path, exc: BaseException) -> UserInputError:
    reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return UserInputError(f"{path}: not a valid safetensors checkpoint (truncated or corrupt: {reason})")


def _check_file(path: Path) -> None:
    import stat

    if not path.exists():
        raise UserInputError(f"{path}: no such checkpoint file")
    if path.is_dir():
        if (path / LAST_NAME).is_file():
            raise UserInputError(
                f"{path} is a run directory; give one of its checkpoints, e.g. {path / LAST_NAME}"
            )
        raise UserInputError(
            f"{path} is a directory without {LAST_NAME} (not a bats run); give a .safetensors checkpoint file"
        )
    try:
        mode = path.stat().st_mode
    except OSError as exc:
        raise UserInputError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if not stat.S_ISREG(mode):
        # A FIFO would block the read forever; a device has no end.
        raise UserInputError(f"{path}: not a regular file (a FIFO, device or socket); give a checkpoint file")
    if not os.access(path, os.R_OK):
        raise UserInputError(f"{path}: cannot read (permission denied)")


def read_metadata(path: str | os.PathLike[str]) -> CheckpointMeta:
    """Read and validate a checkpoint's header without loading any tensor."""
    from safetensors import safe_open

    from bats_cli.sniff import sniff, wrong_file

    path = Path(path)
    _check_file(path)
    found = sniff(path)
    if found.kind in ("genotype", "json", "onnx"):
        raise UserInputError(wrong_file(path, found, "a bats checkpoint (.safetensors)"))
    try:
        with safe_open(str(path), framework="pt") as fh:
            raw = fh.metadata() or {}
    except Exception as exc:  # safetensors raises its own error types for every malformation
        raise _open_error(path, exc) from None
    return _parse_metadata(path, raw)


def _parse_metadata(path: Path, raw: Mapping[str, str]) -> CheckpointMeta:
    """Every value validated (bats_cli.metadata) before anything acts on it."""
    from bats_cli.metadata import load_json, parse_extra, parse_header
    from bats_cli.names import safe_text

    if "bats_format" not in raw or "bats_kind" not in raw:
        raise UserInputError(f"{path}: a safetensors file, but not a bats checkpoint")
    try:
        fmt = int(raw["bats_format"])
    except (TypeError, ValueError):
        raise UserInputError(f"{path}: corrupt bats metadata (bats_format is not a number)") from None
    if fmt > FORMAT_VERSION:
        try:
            versions = load_json(raw.get("bats_versions", "{}"), where=str(path))
        except UserInputError:
            versions = {}
        written_by = versions.get("bats", "?") if isinstance(versions, dict) else "?"
        raise UserInputError(
            f"{path}: written by a newer bats ({safe_text(written_by, max_chars=40)}, checkpoint "
            f"format {fmt}); this bats reads format {FORMAT_VERSION} or older; upgrade bats"
        )
    header = parse_header(path, raw)
    if header.kind not in KINDS:
        raise UserInputError(f"{path}: unknown checkpoint kind {safe_text(repr(header.kind), max_chars=40)}")
    extra = {k: v for k, v in raw.items() if k not in RESERVED_KEYS}
    parse_extra(path, extra, config=header.config)
    genotype_json = raw.get("bats_genotype")
    if genotype_json is not None and len(genotype_json) > (1 << 20):
        raise UserInputError(f"{path}: the recorded genotype is far too large")
    return CheckpointMeta(
        path=path,
        kind=header.kind,
        config=header.config,
        genotype_json=genotype_json,
        epoch=header.epoch,
        step=header.step,
        versions=header.versions,
        format=header.format,
        extra=extra,
    )


def _join_or(words: Iterable[str]) -> str:
    words = list(words)
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " or " + words[-1]


def check_kind(meta: CheckpointMeta, expect_kind: str | Iterable[str], command: str | None) -> None:
    """UserInputError naming both kinds when ``meta.kind`` is not expected."""
    expected = [expect_kind] if isinstance(expect_kind, str) else list(expect_kind)
    if meta.kind in expected:
        return
    # Keep KINDS order so messages are stable regardless of set ordering.
    ordered = [k for k in KINDS if k in expected] + [k for k in expected if k not in KINDS]
    from bats_cli.sniff import taken_by

    who = f"`bats {command}` expects" if command else "expected"
    where = taken_by(meta.kind, meta.path)
    raise UserInputError(
        f"{meta.path} is a {meta.kind} checkpoint; {who} a {_join_or(ordered)} checkpoint"
        + (f"; a {meta.kind} checkpoint goes to {where}" if where else "")
    )


def load_checkpoint(
    path: str | os.PathLike[str],
    *,
    expect_kind: str | Iterable[str] | None = None,
    device: str | torch.device = "cpu",
    command: str | None = None,
) -> tuple[dict[str, torch.Tensor], CheckpointMeta]:
    """Load all tensors onto ``device`` plus the metadata; ``command`` names it in errors."""
    from safetensors.torch import load_file

    meta = read_metadata(path)
    if expect_kind is not None:
        check_kind(meta, expect_kind, command)
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        # Otherwise safetensors' error would read like a corrupt file.
        raise UserInputError(f"cannot load {meta.path} onto {device}: CUDA is not available")
    try:
        tensors = load_file(str(meta.path), device=str(device))
    except Exception as exc:
        raise _open_error(meta.path, exc) from None
    from bats_cli.metadata import check_tensors

    check_tensors(meta.path, tensors)
    return tensors, meta


def latest_checkpoint(run_dir: str | os.PathLike[str]) -> Path | None:
    """``<run_dir>/last.safetensors`` when it exists (temp files of a crashed save are ignored)."""
    last = Path(run_dir) / LAST_NAME
    return last if last.is_file() else None


# --------------------------------------------------------------------------- JSON state


def _encode(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        if obj.numel() != 1:
            raise TypeError("only scalar tensors can go into JSON state")
        return {"__tensor__": obj.item(), "dtype": str(obj.dtype).removeprefix("torch.")}
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v) for v in obj]}
    if isinstance(obj, list):
        return [_encode(v) for v in obj]
    if isinstance(obj, Mapping):
        if not all(isinstance(k, (str, int)) for k in obj):
            raise TypeError("state dict keys must be str or int")
        # JSON keys are strings; int keys are tagged so they come back as ints.
        return {
            "__dict__": [[k, _encode(v)] for k, v in obj.items()],
        }
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot store {type(obj).__name__} in checkpoint JSON state")


def _decode(obj: Any) -> Any:
    if isinstance(obj, list):
        return [_decode(v) for v in obj]
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            from bats_cli.metadata import dtype_from_name

            # An allowlist, never getattr(torch, <string from the file>).
            dtype = dtype_from_name(obj.get("dtype"), where="checkpoint state")
            return torch.tensor(obj["__tensor__"], dtype=dtype)
        if "__tuple__" in obj:
            return tuple(_decode(v) for v in obj["__tuple__"])
        if "__dict__" in obj:
            return {k: _decode(v) for k, v in obj["__dict__"]}
    return obj


def state_to_json(state: Mapping[str, Any]) -> str:
    """Any scheduler / GradScaler-style state dict (scalars, tuples, scalar tensors) as JSON."""
    return json.dumps(_encode(state))


def state_from_json(text: str) -> dict[str, Any]:
    """Inverse of :func:`state_to_json` (tuples, int keys and scalar tensors come back)."""
    from bats_cli.metadata import load_json

    data = load_json(text, where="checkpoint state")
    try:
        decoded = _decode(data)
    except (TypeError, ValueError, KeyError, RuntimeError) as exc:
        raise UserInputError(f"checkpoint state: malformed ({exc})") from None
    if not isinstance(decoded, dict):
        raise UserInputError("checkpoint state: expected an object")
    return decoded


def scheduler_state_json(scheduler: Any) -> str:
    """``scheduler.state_dict()`` as JSON (lambda functions are not stored, as in torch)."""
    return state_to_json(scheduler.state_dict())


def load_scheduler_state(scheduler: Any, text: str) -> None:
    scheduler.load_state_dict(state_from_json(text))


def load_scaler_state(scaler: Any, text: Any, *, where: str) -> None:
    """A GradScaler's state from checkpoint JSON: finite positive scale and factors, an integer
    tracker; anything else is one line naming ``where``."""
    import math

    if not isinstance(text, str):
        raise UserInputError(f"{where}: expected scaler state JSON")
    state = state_from_json(text)
    if state:
        numbers = {k: state.get(k) for k in ("scale", "growth_factor", "backoff_factor")}
        ok = all(_finite_number(v) and float(v) > 0 for v in numbers.values())
        ok = ok and isinstance(state.get("growth_interval"), int) and state["growth_interval"] > 0
        ok = ok and isinstance(state.get("_growth_tracker"), int) and state["_growth_tracker"] >= 0
        ok = ok and all(math.isfinite(float(v)) and float(v) < 1e38 for v in numbers.values())
        if not ok:
            raise UserInputError(f"{where}: not a gradient scaler's state (a tampered checkpoint)")
    try:
        scaler.load_state_dict(state)
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise UserInputError(f"{where}: unusable gradient scaler state ({str(exc)[:80]})") from None


# --------------------------------------------------------------------------- optimizer state


def _index_names(
    optimizer: torch.optim.Optimizer, named_parameters: Mapping[str, torch.nn.Parameter]
) -> list[str]:
    """Parameter names in the order ``optimizer.state_dict()`` numbers them."""
    by_id = {id(p): name for name, p in named_parameters.items()}
    names = []
    for group in optimizer.param_groups:
        for p in group["params"]:
            if id(p) not in by_id:
                raise ValueError("optimizer holds a parameter missing from named_parameters")
            names.append(by_id[id(p)])
    return names


def optimizer_state_tensors(
    optimizer: torch.optim.Optimizer,
    named_parameters: Mapping[str, torch.nn.Parameter],
    prefix: str = "optim.",
) -> tuple[dict[str, torch.Tensor], str]:
    """Split optimizer state into tensors ``<prefix><param name>.<buffer>`` and a JSON string.

    Keyed by parameter name, so a resumed run may build its parameter list in another order.
    Scalar tensors (Adam's ``step``) and hyper-parameters go to the JSON, dtype kept.
    """
    sd = optimizer.state_dict()
    names = _index_names(optimizer, named_parameters)
    tensors: dict[str, torch.Tensor] = {}
    state_json: dict[str, dict[str, Any]] = {}
    for index, per_param in sd["state"].items():
        name = names[index]
        entry: dict[str, Any] = {}
        for key, value in per_param.items():
            if isinstance(value, torch.Tensor) and value.dim() > 0:
                tensors[f"{prefix}{name}.{key}"] = value
                entry[key] = {"__buffer__": True}
            else:
                entry[key] = _encode(value)
        state_json[name] = entry
    groups = []
    for group in sd["param_groups"]:
        g = {k: _encode(v) for k, v in group.items() if k != "params"}
        g["params"] = [names[i] for i in group["params"]]
        groups.append(g)
    return tensors, json.dumps({"state": state_json, "param_groups": groups})


def load_optimizer_state(
    optimizer: torch.optim.Optimizer,
    named_parameters: Mapping[str, torch.nn.Parameter],
    tensors: Mapping[str, torch.Tensor],
    json_str: str,
    prefix: str = "optim.",
) -> None:
    """Inverse of :func:`optimizer_state_tensors`; UserInputError if the parameters differ."""
    from bats_cli.metadata import OptimizerState, check_encoded, load_json, validate

    saved = load_json(json_str, where="cannot resume: optimizer state")
    validate(OptimizerState, saved, where="cannot resume: optimizer state")
    check_encoded(saved, where="cannot resume: optimizer state")
    saved_groups = saved["param_groups"]
    saved_state = saved["state"]
    if not all(isinstance(g.get("params"), list) for g in saved_groups):
        raise UserInputError("cannot resume: corrupt optimizer state (a group without params)")
    names = _index_names(optimizer, named_parameters)
    index_of = {name: i for i, name in enumerate(names)}
    by_id = {id(p): name for name, p in named_parameters.items()}
    _check_same_groups(saved_groups, optimizer, named_parameters)
    unknown = sorted(set(saved_state) - set(index_of))
    if unknown:
        raise UserInputError(
            f"cannot resume: optimizer state for parameters the network lacks (e.g. {unknown[0][:80]})"
        )
    params = dict(named_parameters)
    expected = _state_keys(optimizer)
    state: dict[int, dict[str, Any]] = {}
    for name, entry in saved_state.items():
        per_param = {}
        where = f"cannot resume: optimizer state of {name[:80]}"
        if expected is not None and entry and set(entry) != expected:
            raise UserInputError(
                f"{where} holds {', '.join(sorted(k[:40] for k in entry)[:6])}; this optimizer keeps "
                f"{', '.join(sorted(expected))} (a tampered or foreign checkpoint)"
            )
        for key, value in entry.items():
            if isinstance(value, dict) and value.get("__buffer__"):
                tensor_name = f"{prefix}{name}.{key}"
                if tensor_name not in tensors:
                    raise UserInputError(f"cannot resume: checkpoint lacks tensor {tensor_name}")
                per_param[key] = tensors[tensor_name]
                if not per_param[key].is_floating_point():
                    raise UserInputError(f"cannot resume: {tensor_name} is not a float tensor")
                # Every per-parameter buffer (Adam's moments, SGD's momentum) has the parameter's
                # shape; another one would fail inside the first optimizer step.
                if tuple(per_param[key].shape) != tuple(params[name].shape):
                    raise UserInputError(
                        f"cannot resume: {tensor_name} has shape {tuple(per_param[key].shape)}, its "
                        f"parameter {tuple(params[name].shape)}"
                    )
            else:
                per_param[key] = _checked_scalar(_decode(value), where=f"{where}: {key[:40]}")
        state[index_of[name]] = per_param
    groups = []
    for saved_group, current in zip(saved_groups, optimizer.param_groups):
        g = _checked_group(saved_group, current)
        # torch pairs saved indices with current params by position: list them in current order.
        g["params"] = [index_of[by_id[id(p)]] for p in current["params"]]
        groups.append(g)
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def _state_keys(optimizer: torch.optim.Optimizer) -> set[str] | None:
    """The per-parameter state keys ``optimizer`` keeps after a step (None: not known here)."""
    if isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
        keys = {"step", "exp_avg", "exp_avg_sq"}
        if any(g.get("amsgrad") for g in optimizer.param_groups):
            keys.add("max_exp_avg_sq")
        return keys
    if isinstance(optimizer, torch.optim.SGD):
        return {"momentum_buffer"}
    return None


def _finite_number(value: Any) -> bool:
    import math

    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or not (value.is_floating_point() or value.dtype in (torch.int64, torch.int32)):
            return False
        value = value.item()
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _checked_scalar(value: Any, *, where: str) -> Any:
    """A non-buffer state value (Adam's ``step``): a finite, non-negative number, or None."""
    if value is None:
        return value
    if not _finite_number(value) or float(value) < 0 or float(value) > 1e15:
        raise UserInputError(f"{where}: expected a step count, got {str(value)[:40]}")
    return value


# Optimizer settings read back from a checkpoint: these must be non-negative; betas in [0, 1).
_NON_NEGATIVE = frozenset({"lr", "initial_lr", "weight_decay", "eps", "momentum", "dampening"})


def _checked_group(saved: Mapping[str, Any], current: Mapping[str, Any]) -> dict[str, Any]:
    """A saved param group's settings, each of the kind this optimizer's own holds, in range.

    Settings the current group lacks are dropped (torch would carry them along unread); ones the
    file lacks keep the current value.
    """
    group = {k: v for k, v in current.items() if k != "params"}
    for key, raw in saved.items():
        if key == "params" or key not in group:
            continue
        value = _decode(raw)
        now = group[key]
        where = f"cannot resume: optimizer setting {key[:40]}"
        if isinstance(now, bool) or now is None or isinstance(now, str):
            ok = type(value) is type(now) if now is not None else value is None or _finite_number(value)
        elif isinstance(now, (int, float, torch.Tensor)):
            ok = _finite_number(value)
            if ok and isinstance(now, torch.Tensor):
                value = torch.as_tensor(float(value), dtype=now.dtype)
        elif isinstance(now, (tuple, list)):
            ok = isinstance(value, (tuple, list)) and len(value) == len(now) and all(
                _finite_number(v) for v in value)
            if ok:
                value = type(now)(value)
        else:
            ok = False
        if not ok:
            raise UserInputError(f"{where}: {str(value)[:40]} is not what this optimizer keeps there")
        if key in _NON_NEGATIVE and float(value) < 0:
            raise UserInputError(f"{where}: {value} is negative")
        if key not in _SCHEDULED and not _same_setting(value, now):
            # The run's config (checked equal before) made these: the file may not change them.
            raise UserInputError(f"{where} is {str(value)[:40]} in the checkpoint, {str(now)[:40]} in "
                                 "the run's settings (a tampered checkpoint)")
        group[key] = value
    return group


# Settings a schedule moves during a run; every other one is the run config's.
_SCHEDULED = frozenset({"lr", "initial_lr"})


def _same_setting(a: Any, b: Any) -> bool:
    import math

    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same_setting(x, y) for x, y in zip(a, b))
    if _finite_number(a) and _finite_number(b) and not isinstance(a, bool) and not isinstance(b, bool):
        return math.isclose(float(a), float(b), rel_tol=1e-6, abs_tol=1e-12)
    return a == b and type(a) is type(b)


def _check_same_groups(
    saved_groups: list[dict[str, Any]],
    optimizer: torch.optim.Optimizer,
    named_parameters: Mapping[str, torch.nn.Parameter],
) -> None:
    """The same parameter names must sit in the same groups (order may differ)."""
    by_id = {id(p): name for name, p in named_parameters.items()}
    if len(saved_groups) != len(optimizer.param_groups):
        raise UserInputError(
            f"cannot resume: optimizer has {len(optimizer.param_groups)} parameter groups, "
            f"checkpoint has {len(saved_groups)}"
        )
    for saved_group, current in zip(saved_groups, optimizer.param_groups):
        now = {by_id[id(p)] for p in current["params"]}
        before = set(saved_group["params"])
        if now != before:
            missing = sorted(now - before)[:3]
            unknown = sorted(before - now)[:3]
            raise UserInputError(
                "cannot resume: optimizer parameters differ from the checkpoint "
                f"(not in checkpoint: {', '.join(missing) or '-'}; "
                f"only in checkpoint: {', '.join(unknown) or '-'})"
            )
