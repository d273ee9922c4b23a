"""Resume state beside the weights, without pickle: optimizer state split into tensors
(per-parameter buffers, keyed by parameter *name*) and JSON (everything scalar), scheduler and
gradient-scaler state as tagged JSON; everything read back is checked before a step is taken."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import torch

from bats_cli.core.errors import UserInputError

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
            from bats_cli.storage.metadata import dtype_from_name

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
    from bats_cli.storage.metadata import load_json

    data = load_json(text, where="checkpoint state")
    try:
        decoded = _decode(data)
    except (TypeError, ValueError, KeyError, RuntimeError) as exc:
        raise UserInputError(f"checkpoint state: malformed ({exc})") from None
    if not isinstance(decoded, dict):
        raise UserInputError("checkpoint state: expected an object")
    return decoded


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
    from bats_cli.storage.metadata import OptimizerState, check_encoded, load_json, validate

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
