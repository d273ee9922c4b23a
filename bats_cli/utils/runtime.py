"""The runtime environment of a run: seeding and RNG-state capture/restore, device and precision
selection, autocast / grad scaler / memory format."""

from __future__ import annotations

import contextlib
import random
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from bats_cli.core.errors import UserInputError

PRECISIONS = ("fp32", "bf16", "fp16")
DEVICES = ("auto", "cpu", "cuda")

# --------------------------------------------------------------------------- seeding / RNG state


def seed_everything(seed: int) -> None:
    """Seed python ``random``, numpy's global RNG and torch (CPU and every CUDA device)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state_tensors() -> dict[str, torch.Tensor]:
    """Capture every global RNG as tensors (no pickle), keys prefixed ``rng.``."""
    version, mt, gauss = random.getstate()
    _, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state(legacy=True)
    out = {
        "rng.torch_cpu": torch.get_rng_state(),
        "rng.python_mt": torch.tensor([version, *mt], dtype=torch.int64),
        "rng.python_gauss": torch.tensor(
            [0.0 if gauss is None else 1.0, 0.0 if gauss is None else gauss], dtype=torch.float64
        ),
        "rng.numpy_keys": torch.from_numpy(np_keys.astype(np.int64)),
        "rng.numpy_pos": torch.tensor([np_pos, np_has_gauss], dtype=torch.int64),
        "rng.numpy_gauss": torch.tensor([np_gauss], dtype=torch.float64),
    }
    # Only touch CUDA when it is already initialised: querying it otherwise costs seconds.
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            out[f"rng.torch_cuda.{i}"] = state
    return out


def restore_rng_state(tensors: Mapping[str, torch.Tensor]) -> None:
    """Restore what :func:`rng_state_tensors` captured; other keys in ``tensors`` are ignored.

    CUDA states are restored for the devices present now (a CPU-only resume skips them).
    A malformed state (a tampered or truncated checkpoint) is one UserInputError.
    """
    try:
        _restore_rng_state(tensors)
    except (ValueError, TypeError, RuntimeError, IndexError, OverflowError, KeyError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserInputError(f"cannot resume: the checkpoint's random-number state is corrupt ({reason})") from None


def _restore_rng_state(tensors: Mapping[str, torch.Tensor]) -> None:
    if "rng.torch_cpu" in tensors:
        torch.set_rng_state(tensors["rng.torch_cpu"].cpu().to(torch.uint8))
    if "rng.python_mt" in tensors:
        mt = [int(v) for v in tensors["rng.python_mt"].tolist()]
        has_gauss, gauss = tensors["rng.python_gauss"].tolist()
        random.setstate((mt[0], tuple(mt[1:]), gauss if has_gauss else None))
    if "rng.numpy_keys" in tensors:
        keys = tensors["rng.numpy_keys"].cpu().numpy().astype(np.uint32)
        pos, has_gauss = (int(v) for v in tensors["rng.numpy_pos"].tolist())
        np.random.set_state(("MT19937", keys, pos, has_gauss, float(tensors["rng.numpy_gauss"][0])))
    cuda_keys = sorted(k for k in tensors if k.startswith("rng.torch_cuda."))
    if cuda_keys and torch.cuda.is_available():
        for key in cuda_keys:
            index = int(key.rsplit(".", 1)[1])
            if index < torch.cuda.device_count():
                torch.cuda.set_rng_state(tensors[key].cpu().to(torch.uint8), index)


# --------------------------------------------------------------------------- device / precision


def select_device(name: str = "auto") -> torch.device:
    """``auto`` picks CUDA when present, else CPU; ``cuda`` / ``cuda:N`` must exist."""
    name = (name or "auto").strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise UserInputError(
                f"--device {name}: CUDA is not available (torch {torch.__version__}); "
                "use --device cpu or --device auto"
            )
        device = torch.device(name)
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserInputError(
                f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) present"
            )
        return device
    raise UserInputError(f"--device {name}: choose auto, cpu, cuda or cuda:N")


def check_precision(device: torch.device, precision: str) -> None:
    """Refuse precision/device pairs that do not work; call it before a run starts.

    bf16 on CPU is allowed (CPU autocast runs conv/linear in bf16, verified with the binary ops
    and backward); fp16 on CPU is refused: slow kernels and no loss scaling there.
    """
    if precision not in PRECISIONS:
        raise UserInputError(f"--precision {precision}: choose one of {', '.join(PRECISIONS)}")
    if device.type == "cpu" and precision == "fp16":
        raise UserInputError("--precision fp16 needs CUDA; use --precision fp32 (or bf16) on CPU")
    if device.type == "cuda" and precision == "bf16" and not torch.cuda.is_bf16_supported():
        raise UserInputError(
            "--precision bf16: this GPU does not support bfloat16; use --precision fp16 or fp32"
        )


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager[Any]:
    """Mixed-precision context for the forward pass (a no-op for fp32)."""
    check_precision(device, precision)
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def make_grad_scaler(device: torch.device, precision: str) -> torch.amp.GradScaler:
    """A GradScaler that is enabled only for fp16 on CUDA; disabled ones pass through unchanged.

    So the loop is always ``scaler.scale(loss).backward(); scaler.step(opt); scaler.update()``.
    """
    check_precision(device, precision)
    enabled = precision == "fp16" and device.type == "cuda"
    return torch.amp.GradScaler(device.type, enabled=enabled)


def memory_format(
    device: torch.device, model_kind: str | torch.nn.Module = "grouped", *, precision: str = "fp32"
) -> torch.memory_format:
    """Memory format to move model and inputs to.

    ``model_kind`` is ``"grouped"`` (networks with grouped/depthwise convs: every BATS cell),
    ``"dense"``, or a module (inspected for grouped convs). channels_last is ~2x faster for
    grouped convs on CPU; on CUDA it pays off with tensor cores (bf16/fp16).
    """
    if isinstance(model_kind, torch.nn.Module):
        # ``grouped_conv``: modules that stand in for grouped convs (the bitwise engine's).
        grouped = any(
            (isinstance(m, torch.nn.Conv2d) and m.groups > 1) or getattr(m, "grouped_conv", False)
            for m in model_kind.modules()
        )
    elif model_kind in ("grouped", "dense"):
        grouped = model_kind == "grouped"
    else:
        raise ValueError(f"model_kind must be 'grouped', 'dense' or a module, not {model_kind!r}")
    if device.type == "cpu":
        return torch.channels_last if grouped else torch.contiguous_format
    if device.type == "cuda" and precision in ("bf16", "fp16"):
        return torch.channels_last
    return torch.contiguous_format
