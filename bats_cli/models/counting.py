"""Model cost for one inference: parameters, FLOPs, BOPs, OPs and model size (Table 6, §6.3).

Everything is measured on a real forward pass (batch 1, eval mode) with hooks on every
``nn.Conv2d`` / ``nn.Linear``, so any architecture is counted right by construction. What counts:

* **FLOPs** — multiply-accumulates (MACs) of real-valued convolutions and linear layers: the stem,
  the classifier, and every conv whose *input* is real. One MAC = one FLOP, as Table 6 counts
  (and as ResNet-18's "1.8e9 FLOPs" does). BatchNorm, pooling, activations, the element-wise
  additions of a cell and the per-channel output scale of a binary conv are not counted (Table 6
  practice; they are O(activations), not O(MACs)).
* **BOPs** — MACs of binary convolutions: a :class:`~bats_cli.layers.quant.QuantConv2d` whose input is
  binarized counts here *whatever its weights*, because during step 1 of the two-step strategy
  the weights are still real but the deployed model binarizes them (§4.3); it is the same
  XNOR + popcount kernel then. A conv with binary weights but real input (none in our networks)
  counts as FLOPs.
* **OPs** = FLOPs + BOPs / 64 (the Bi-Real Net / Table 6 convention: a 64-bit word of XNORs per
  FLOP). 2x-wider BATS: 1.210e8 + 2.157e9 / 64 = 1.547e8 OPs, the "1.55e8 FLOPs" of §2.
* **params** — every parameter except the auxiliary head's (it is dropped at inference, and the
  papers exclude it). *Binary* params are the weights of binary convs (those ``bats binarize``
  and the packer turn into 1 bit); *float* params are everything else, including the binary
  convs' scales.
* **size** — ``fp32``: 4 bytes per parameter. ``packed``: binary conv weights at 1 bit, packed 8
  per byte (per tensor, rounded up), plus every other parameter and the BatchNorm running
  statistics at 4 bytes each, as the packed artifact stores them (the BatchNorm step counter is
  training state and not stored). A file adds its header on top.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from bats_cli.core.errors import UserInputError
from bats_cli.layers.quant import QuantConv2d

# Binary MACs per real-valued op: one 64-bit XNOR + popcount does 64 binary MACs.
BOPS_PER_FLOP = 64
AUX_PREFIX = "auxiliary_head"


@dataclass(frozen=True)
class DatasetShape:
    """What the cost of a network depends on: input shape, classes, network family."""

    name: str
    image_size: int
    in_channels: int
    num_classes: int
    kind: str  # "cifar" or "imagenet"

    @property
    def input_size(self) -> tuple[int, int, int]:
        return (self.in_channels, self.image_size, self.image_size)


def dataset_shape(name: str) -> DatasetShape:
    """The shape of a data set whose shape does not depend on files (the table in data/spec.py)."""
    from bats_cli.data.spec import FIXED_SPECS  # lazily: the data package imports torchvision

    key = str(name).strip().lower().replace("_", "-")
    if key not in FIXED_SPECS:
        raise UserInputError(f"unknown --dataset {name!r}; choose one of: {', '.join(FIXED_SPECS)}")
    spec = FIXED_SPECS[key]
    return DatasetShape(key, spec.image_size, spec.in_channels, spec.num_classes, spec.network)


@dataclass(frozen=True)
class LayerCost:
    """One conv / linear layer as the forward pass saw it."""

    name: str
    layer: str  # "conv" or "linear"
    stage: str
    op: str
    binary: bool  # input binary: its MACs are BOPs
    binary_weights: bool  # weights stored at 1 bit once deployed
    macs: int
    params: int  # weight elements of this layer
    shape: str  # e.g. "80->80 5x5 g16 s1 @28x28"


@dataclass
class CostReport:
    """The cost of one inference; sums plus the per-layer rows they come from."""

    input_size: tuple[int, int, int]
    params: int
    binary_params: int
    float_params: int
    flops: int
    bops: int
    size_fp32_bytes: int
    size_packed_bytes: int
    buffer_floats: int
    layers: list[LayerCost] = field(default_factory=list)

    @property
    def ops(self) -> float:
        return self.flops + self.bops / BOPS_PER_FLOP

    @property
    def compression(self) -> float:
        return self.size_fp32_bytes / self.size_packed_bytes if self.size_packed_bytes else 1.0

    def breakdown(self, by: str) -> list[dict[str, Any]]:
        """Rows ``{key, flops, bops, ops, params, layers}`` grouped by ``"stage"`` or ``"op"``,
        in the order the forward pass first met them."""
        if by not in ("stage", "op"):
            raise ValueError("by must be 'stage' or 'op'")
        rows: OrderedDict[str, dict[str, Any]] = OrderedDict()
        for layer in self.layers:
            key = getattr(layer, by)
            row = rows.setdefault(key, {by: key, "flops": 0, "bops": 0, "params": 0, "layers": 0})
            row["bops" if layer.binary else "flops"] += layer.macs
            row["params"] += layer.params
            row["layers"] += 1
        for row in rows.values():
            row["ops"] = row["flops"] + row["bops"] / BOPS_PER_FLOP
        return list(rows.values())

    def precision_summary(self) -> list[dict[str, Any]]:
        """larq-style per-precision rows: 1-bit and 32-bit params, MACs and memory.

        ``binary params + float params == params`` and ``binary MACs + float MACs == BOPs +
        FLOPs``; memory is the packed size split by precision (BatchNorm statistics count as
        32-bit memory but not as parameters).
        """
        binary_bytes = sum(math.ceil(p / 8) for p in self._binary_weight_sizes())
        return [
            {"precision": "1-bit", "params": self.binary_params, "macs": self.bops,
             "memory_bytes": binary_bytes},
            {"precision": "32-bit", "params": self.float_params, "macs": self.flops,
             "memory_bytes": self.size_packed_bytes - binary_bytes},
        ]

    def _binary_weight_sizes(self) -> list[int]:
        return [layer.params for layer in self.layers if layer.binary_weights]

    def _costs(self) -> dict[str, Any]:
        """Operations and sizes, as both :meth:`summary` and :meth:`to_dict` give them."""
        return {"flops": self.flops, "bops": self.bops, "ops": self.ops,
                "size_fp32_bytes": self.size_fp32_bytes, "size_packed_bytes": self.size_packed_bytes}

    def summary(self) -> dict[str, Any]:
        """The headline numbers (what ``model_meta`` stores)."""
        return {"num_params": self.params, **self._costs()}

    def to_dict(self, *, layers: bool = False) -> dict[str, Any]:
        out: dict[str, Any] = {
            "input_size": list(self.input_size),
            "params": self.params,
            "binary_params": self.binary_params,
            "float_params": self.float_params,
            **self._costs(),
            "compression": self.compression,
            "precision": self.precision_summary(),
            "by_stage": self.breakdown("stage"),
            "by_op": self.breakdown("op"),
        }
        if layers:
            out["layers"] = [asdict(layer) for layer in self.layers]
        return out


def _is_aux(name: str) -> bool:
    return name == AUX_PREFIX or name.startswith(AUX_PREFIX + ".")


def _cell_stage_labels(model: nn.Module) -> dict[int, str]:
    """``cells.i`` -> "cells 1-6 (stage 1)" / "cell 7 (reduction 1)" (1-based)."""
    cells = getattr(model, "cells", None)
    if not isinstance(cells, nn.ModuleList):
        return {}
    runs: list[tuple[str, list[int]]] = []
    stage, reductions = 1, 0
    for i, cell in enumerate(cells):
        if getattr(cell, "reduction", False):
            reductions += 1
            stage += 1
            key = f"reduction {reductions}"
        else:
            key = f"stage {stage}"
        if runs and runs[-1][0] == key:
            runs[-1][1].append(i)
        else:
            runs.append((key, [i]))
    labels: dict[int, str] = {}
    for key, idx in runs:
        first, last = idx[0] + 1, idx[-1] + 1
        text = f"cell {first}" if first == last else f"cells {first}-{last}"
        for i in idx:
            labels[i] = f"{text} ({key})"
    return labels


def _op_label(model: nn.Module, name: str) -> str:
    """The op kind a layer belongs to: the genotype op name, preprocess, stem, classifier."""
    if callable(getattr(model, "op_label", None)):  # a fixed model (resnet18) names its own
        return model.op_label(name)
    parts = name.split(".")
    cells = getattr(model, "cells", None)
    if parts[0] == "cells" and isinstance(cells, nn.ModuleList) and len(parts) > 2:
        cell = cells[int(parts[1])]
        if parts[2] == "ops" and len(parts) > 3 and hasattr(cell, "op_names"):
            k = int(parts[3])
            op = cell.op_names[k]
            stride2 = getattr(cell, "reduction", False) and cell.indices[k] < 2
            if "shortcut" in parts[4:]:
                return f"{op} shortcut (factorized reduce)"
            return f"{op} (stride 2)" if stride2 and op == "skip_connect" else op
        if parts[2].startswith("preprocess"):
            from bats_cli.layers.ops import FactorizedReduce

            module = getattr(cell, parts[2])
            if isinstance(module, FactorizedReduce):
                return "factorized reduce"
            return "preprocess 1x1"
        return parts[2]
    if parts[0] == "stem" or parts[0].startswith("stem"):
        return "stem"
    if parts[0] == "classifier":
        return "classifier"
    return parts[0]


def _stage_label(cell_labels: dict[int, str], name: str) -> str:
    parts = name.split(".")
    if parts[0] == "cells" and len(parts) > 1 and parts[1].isdigit():
        return cell_labels.get(int(parts[1]), f"cell {int(parts[1]) + 1}")
    if parts[0].startswith("stem"):
        return "stem"
    if parts[0] in ("classifier", "global_pooling"):
        return "classifier"
    return parts[0]


def _shape_text(module: nn.Module, out: torch.Tensor) -> str:
    if isinstance(module, nn.Linear):
        return f"{module.in_features}->{module.out_features} linear"
    kh, kw = module.kernel_size
    k = f"{kh}x{kw}" if kh != kw else f"{kh}x{kh}"
    extra = ""
    if module.groups > 1:
        extra += f" g{module.groups}"
    if module.dilation != (1, 1):
        extra += f" d{module.dilation[0]}"
    stride = module.stride[0] if module.stride[0] == module.stride[1] else module.stride
    return (f"{module.in_channels}->{module.out_channels} {k}{extra} s{stride} "
            f"@{out.shape[-2]}x{out.shape[-1]}")


def _forward_once(model: nn.Module, input_size: tuple[int, int, int], rows: list, *,
                  meta: bool = True) -> None:
    """One forward pass of a batch of 1, on the meta device when possible (and ``meta``).

    Meta tensors carry shapes only, so counting a 2x-wide ImageNet network costs milliseconds of
    arithmetic instead of seconds of convolutions; the model's own tensors are left untouched.
    A forward that needs real values falls back to a real pass.
    """
    from torch.func import functional_call

    if not meta:
        _real_forward(model, input_size)
        return
    shadow = {k: torch.empty_like(v, device="meta") for k, v in model.named_parameters()}
    shadow.update({k: torch.empty_like(v, device="meta") for k, v in model.named_buffers()})
    first = next(iter(shadow.values()), None)
    dtype = first.dtype if first is not None and first.is_floating_point() else torch.float32
    try:
        functional_call(model, shadow, (torch.zeros(1, *input_size, device="meta", dtype=dtype),))
        return
    except (NotImplementedError, RuntimeError):
        rows.clear()
    _real_forward(model, input_size)


def _real_forward(model: nn.Module, input_size: tuple[int, int, int]) -> None:
    param = next(model.parameters(), None)
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    device = param.device if param is not None else torch.device("cpu")
    try:
        model(torch.zeros(1, *input_size, device=device, dtype=dtype))
    except RuntimeError as exc:
        raise UserInputError(
            f"the network cannot take {input_size[1]}x{input_size[2]} px inputs with "
            f"{input_size[0]} channels ({str(exc).splitlines()[0]})"
        ) from None


@torch.no_grad()
def count_model(model: nn.Module, input_size: tuple[int, int, int], *, meta: bool = True) -> CostReport:
    """Count params / FLOPs / BOPs / sizes of ``model`` for one ``input_size`` (C, H, W) image.

    Runs one forward pass of a batch of 1 in eval mode (restoring the previous mode after), so
    the auxiliary head is not run and not counted. ``meta=False`` makes it a real pass: for
    small networks counted many times (``bats derive --match``) it is several times faster than
    the meta device, whose Python dispatch per op outweighs the tiny convolutions.
    """
    if len(input_size) != 3 or min(input_size) < 1:
        raise UserInputError(f"input size must be (channels, height, width), got {input_size}")
    cell_labels = _cell_stage_labels(model)
    rows: list[LayerCost] = []
    handles = []

    def hook(name: str):
        def record(module: nn.Module, inputs: tuple, out: torch.Tensor) -> None:
            batch = out.shape[0]
            if isinstance(module, nn.Linear):
                macs = out.numel() // batch * module.in_features
            else:
                kh, kw = module.kernel_size
                macs = out.numel() // batch * (module.in_channels // module.groups) * kh * kw
            quant = isinstance(module, QuantConv2d)
            binary_input = quant and module.input_quantizer is not None
            rows.append(LayerCost(
                name=name,
                layer="linear" if isinstance(module, nn.Linear) else "conv",
                stage=_stage_label(cell_labels, name),
                op=_op_label(model, name),
                binary=binary_input,
                binary_weights=quant and module.is_binary,
                macs=int(macs),
                params=module.weight.numel(),
                shape=_shape_text(module, out),
            ))

        return record

    for name, module in model.named_modules():
        if _is_aux(name):
            continue
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            handles.append(module.register_forward_hook(hook(name)))
    was_training = model.training
    try:
        model.eval()
        _forward_once(model, input_size, rows, meta=meta)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)

    binary_weight_names = set()
    binary_weight_bytes = 0
    for name, module in model.named_modules():
        if not _is_aux(name) and isinstance(module, QuantConv2d) and module.is_binary:
            binary_weight_names.add(f"{name}.weight" if name else "weight")
            binary_weight_bytes += math.ceil(module.weight.numel() / 8)
    params = binary = 0
    for name, p in model.named_parameters():
        if _is_aux(name):
            continue
        params += p.numel()
        if name in binary_weight_names:
            binary += p.numel()
    buffer_floats = sum(
        b.numel() for name, b in model.named_buffers()
        if not _is_aux(name) and b.is_floating_point()
    )
    float_params = params - binary
    return CostReport(
        input_size=tuple(int(s) for s in input_size),
        params=params,
        binary_params=binary,
        float_params=float_params,
        flops=sum(r.macs for r in rows if not r.binary),
        bops=sum(r.macs for r in rows if r.binary),
        size_fp32_bytes=4 * params,
        size_packed_bytes=binary_weight_bytes + 4 * (float_params + buffer_floats),
        buffer_floats=buffer_floats,
        layers=rows,
    )


def model_meta(model: nn.Module, input_size: tuple[int, int, int]) -> dict[str, Any]:
    """``{num_params, flops, bops, ops, size_fp32_bytes, size_packed_bytes}`` for ``model``;
    also stored as ``model.meta`` so checkpoints and reports can reuse it."""
    meta = count_model(model, input_size).summary()
    model.meta = meta
    return meta


__all__ = [
    "BOPS_PER_FLOP",
    "CostReport",
    "DatasetShape",
    "LayerCost",
    "count_model",
    "dataset_shape",
    "model_meta",
]
