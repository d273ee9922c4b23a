"""The packed binary artifact: a fully binary network as 1-bit weights in one safetensors file.

Layout (metadata ``bats_kind = "packed"``):

* ``bits.<conv>.weight`` (uint8): the sign bits of every binary conv's weight, ``W >= 0`` -> 1,
  flattened in C order and packed 8 per byte, most significant bit first
  (``numpy.packbits(..., bitorder="big")``); the shape is in the metadata;
* ``model.<conv>.scale`` (fp32): that conv's per-output-channel scale α (XNOR-Net++), which
  already holds mean|W| folded in by ``bats binarize``;
* ``model.<key>`` (fp32 / int64): every real-valued tensor as it is: stem, classifier,
  BatchNorm, PReLU (and the auxiliary tower only when asked for: it is used in training only).

``bats_config`` holds ``network`` (settings to rebuild the net, with ``binary_weights`` true),
``data``, ``packing`` (layout and per-conv shapes) and ``source``; ``bats_genotype`` the genotype.
:func:`bats_cli.models.modelio.unpack` rebuilds a model whose binary convs apply exactly ``sign(W) * α``, the same
arithmetic as the binarized checkpoint, so predictions are identical.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from bats_cli.core.errors import UserInputError

LAYOUT = "sign-bits-msb-first-v1"
BITS_PREFIX = "bits."
MODEL_PREFIX = "model."
AUX_PREFIX = "auxiliary_head."


def pack_bits(weight: torch.Tensor) -> torch.Tensor:
    """Sign bits of ``weight`` (``>= 0`` -> 1, as the STE sign maps 0 to +1), 8 per byte."""
    bits = (weight.detach().cpu() >= 0).numpy().reshape(-1)
    return torch.from_numpy(np.packbits(bits, bitorder="big"))


def unpack_bits(packed: torch.Tensor, shape: list[int] | tuple[int, ...]) -> torch.Tensor:
    """±1.0 float32 tensor of ``shape`` from :func:`pack_bits` output."""
    count = math.prod(shape)
    if packed.dtype != torch.uint8 or packed.numel() != (count + 7) // 8:
        raise UserInputError(
            f"packed weight has {packed.numel()} bytes of {packed.dtype}, expected "
            f"{(count + 7) // 8} uint8 bytes for shape {tuple(shape)}"
        )
    bits = np.unpackbits(packed.numpy(), count=count, bitorder="big").reshape(shape)
    return torch.from_numpy(bits.astype(np.float32) * 2.0 - 1.0)


def pack_model(
    model: nn.Module,
    *,
    settings: dict[str, Any],
    keep_aux: bool = False,
) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]:
    """(tensors, packing info, network settings of the packed model) for a binarized model."""
    from bats_cli.layers.quant import quant_convs

    convs = quant_convs(model)
    if not convs:
        raise UserInputError(
            "the network has no binary convolutions (trained with --real?); nothing to pack"
        )
    not_binary = [name for name, conv in convs if conv.kernel_quantizer is None]
    if not_binary:
        raise UserInputError(
            f"{len(not_binary)} binary convs still have real weights (e.g. {not_binary[0]}); "
            "run `bats binarize` first"
        )
    state = model.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    shapes: dict[str, list[int]] = {}
    binary_weight_keys = set()
    for name, conv in convs:
        key = f"{name}.weight"
        binary_weight_keys.add(key)
        shapes[name] = list(conv.weight.shape)
        tensors[f"{BITS_PREFIX}{key}"] = pack_bits(conv.weight)
    for key, value in state.items():
        if key in binary_weight_keys:
            continue
        if not keep_aux and key.startswith(AUX_PREFIX):
            continue
        tensors[f"{MODEL_PREFIX}{key}"] = value.detach().cpu().contiguous()
    packed_settings = {**settings, "auxiliary": bool(keep_aux and settings.get("auxiliary")),
                       "binary_weights": True, "real": False}
    info = {"layout": LAYOUT, "binary_convs": shapes}
    return tensors, info, packed_settings


def save_packed(
    model: nn.Module,
    path: str | Path,
    *,
    settings: dict[str, Any],
    data: dict[str, Any],
    run: dict[str, Any],
    genotype_json: str | None,
    source: dict[str, Any],
    epoch: int = 0,
    keep_aux: bool = False,
) -> Path:
    """Write the packed artifact of a binarized model (atomic)."""
    from bats_cli.storage.checkpoint import save_checkpoint

    path = Path(path)
    if path.is_dir():
        raise UserInputError(f"-o {path} is a directory; give a file name such as model.packed.safetensors")
    tensors, info, packed_settings = pack_model(model, settings=settings, keep_aux=keep_aux)
    config = {"network": packed_settings, "data": data, "run": run, "packing": info,
              "source": source}
    return save_checkpoint(path, tensors, kind="packed", config=config, epoch=epoch,
                           genotype_json=genotype_json)


def packed_size_report(path: str | Path) -> dict[str, Any]:
    """Sizes of a packed artifact against the same model stored as fp32 (header-only read).

    ``binary_convs``: the binary convs' weights and scales, fp32 vs packed (1 bit per weight
    plus a 32-bit scale per output channel); ``total``: every tensor of the packed model, fp32
    vs as stored (the real-valued parts stay 32-bit); ``file_bytes``: the artifact on disk.
    """
    from safetensors import safe_open

    from bats_cli.storage.checkpoint import check_kind, read_metadata

    meta = read_metadata(path)
    check_kind(meta, "packed", "flops")
    shapes = (meta.config.get("packing") or {}).get("binary_convs") or {}
    bin_weights = sum(math.prod(s) for s in shapes.values())
    scale_keys = {f"{MODEL_PREFIX}{name}.scale" for name in shapes}
    bits_bytes = scale_bytes = scales = real_params = real_bytes = 0
    dtype_size = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8, "I64": 8, "I32": 4, "U8": 1, "I8": 1,
                  "BOOL": 1}
    with safe_open(str(meta.path), framework="pt") as fh:
        for key in fh.keys():
            sl = fh.get_slice(key)
            numel = math.prod(sl.get_shape())
            nbytes = numel * dtype_size.get(sl.get_dtype(), 4)
            if key.startswith(BITS_PREFIX):
                bits_bytes += nbytes
            elif key in scale_keys:
                scales += numel
                scale_bytes += nbytes
            elif key.endswith("num_batches_tracked"):
                continue  # bookkeeping, not model size
            else:
                real_params += numel
                real_bytes += nbytes
    bin_fp32 = 4 * (bin_weights + scales)
    bin_packed = bits_bytes + scale_bytes
    total_fp32 = bin_fp32 + 4 * real_params
    total_packed = bin_packed + real_bytes
    return {
        "path": str(meta.path),
        "binary_convs": {
            "count": len(shapes),
            "weights": bin_weights,
            "scales": scales,
            "fp32_bytes": bin_fp32,
            "packed_bytes": bin_packed,
            "ratio": bin_fp32 / bin_packed if bin_packed else None,
            "weights_only_ratio": (4 * bin_weights) / bits_bytes if bits_bytes else None,
        },
        "real_parts": {"params": real_params, "bytes": real_bytes},
        "total": {
            "fp32_bytes": total_fp32,
            "packed_bytes": total_packed,
            "ratio": total_fp32 / total_packed if total_packed else None,
        },
        "file_bytes": Path(meta.path).stat().st_size,
    }


__all__ = [
    "LAYOUT",
    "pack_bits",
    "pack_model",
    "packed_size_report",
    "save_packed",
    "unpack_bits",
]
