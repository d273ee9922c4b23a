"""`bats export`: a trained or binarized model as a standard-op ONNX graph.

The graph uses only standard ONNX operators, so any ONNX runtime can run it: BatchNormalization,
the sign as ``Where(x >= 0, 1, -1)``, ``Conv`` with ±1 weights (grouped convs are native ONNX
``group``) followed by a ``Mul`` by the XNOR-Net++ scale α, PRelu, pools, Concat, Add, the real
stem and classifier. Keeping α out of the kernel keeps the conv's sums exact integers (as in
PyTorch), so the file gives the same predictions as the artifact it came from; a binary-aware
runtime can also recognise sign -> Conv(±1) -> Mul and run it bitwise.

The genotype and the recorded settings travel in the model's ``metadata_props`` (``bats_*``
keys, the same JSON as a checkpoint's header), which is what ``bats eval FILE.onnx`` reads to
find its data set. The auxiliary head is dropped (inference only); the batch size is dynamic.
"""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bats_cli.core.errors import UserInputError

EXPORT_KINDS = ("train", "binarize", "packed")
OPSET = 17
INPUT_NAME = "images"
OUTPUT_NAME = "logits"
EXTRA_HINT = "pip install -e '.[export]'"


def require_onnx(command: str = "export") -> tuple[Any, Any]:
    """``(onnx, onnxruntime)``, or one line naming the extra to install."""
    try:
        import onnx
        import onnxruntime
    except ImportError as exc:
        raise UserInputError(
            f"bats {command} needs the onnx and onnxruntime packages ({exc.name} is missing): "
            f"{EXTRA_HINT}"
        ) from None
    return onnx, onnxruntime


@torch.no_grad()
def inference_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` for export: eval mode, binary weights baked to ±1, no aux head.

    ``sign(W)`` (0 -> +1) replaces each binary-weight conv's latent weight, so the graph holds
    the ±1 kernel itself as an initializer instead of a sign over real weights.
    """
    from bats_cli.layers.quant import quant_convs, sign_pm1

    out = copy.deepcopy(model).float().eval()
    for _, conv in quant_convs(out):
        if conv.kernel_quantizer is not None:
            conv.weight.copy_(sign_pm1(conv.weight))
            conv.kernel_quantizer = None
    if getattr(out, "auxiliary_head", None) is not None:
        out.auxiliary_head = None
    for p in out.parameters():
        p.requires_grad_(False)
    return out


def input_shape(settings: dict[str, Any], data: dict[str, Any]) -> tuple[int, int, int]:
    """(channels, height, width) the network was trained on (from the recorded settings)."""
    size = data.get("image_size") or settings.get("image_size")
    if not size:
        size = 224 if settings.get("kind") == "imagenet" else 32
    return int(settings["in_channels"]), int(size), int(size)


def onnx_bytes(model: nn.Module, shape: tuple[int, int, int], *, opset: int = OPSET) -> bytes:
    """Serialized ONNX of ``model`` (already an :func:`inference_copy`), dynamic batch."""
    import io

    example = torch.zeros(2, *shape)
    buf = io.BytesIO()
    with warnings.catch_warnings():
        # The TorchScript exporter is deprecated in favour of the dynamo one, which needs the
        # onnxscript package; this one needs nothing beyond torch and gives the same ops.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model, (example,), buf, dynamo=False, opset_version=opset,
            input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
            do_constant_folding=True,
            # EVAL would fold the stem's BatchNorm into its conv, which rounds differently from
            # PyTorch; PRESERVE keeps every BatchNormalization (inference mode: eval model).
            training=torch.onnx.TrainingMode.PRESERVE,
        )
    return buf.getvalue()


def op_counts(onnx_model) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in onnx_model.graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return dict(sorted(counts.items()))


def export_model(
    path: str | Path,
    out: str | Path,
    *,
    force: bool = False,
    opset: int = OPSET,
    verify_batch: int = 4,
) -> dict[str, Any]:
    """Export the model in ``path`` (train / binarize checkpoint or packed artifact) to ``out``.

    After writing, the file is checked with ``onnx.checker`` and run once with onnxruntime on a
    random batch of ``verify_batch`` images against PyTorch (``max_abs_diff`` in the result).
    """
    from bats_cli.core.fileio import atomic_write_bytes
    from bats_cli.models.modelio import load_model
    from bats_cli.utils.outputs import check_output_file
    from bats_cli.utils.provenance import software_versions

    onnx, ort = require_onnx("export")
    path, out = Path(path), Path(out)

    # Never onto the model it reads (not even with --force); existing files need --force.
    check_output_file(out, flag="-o", force=force, inputs=[path])
    loaded = load_model(path, command="export", kinds=EXPORT_KINDS)
    model = inference_copy(loaded.model)
    shape = input_shape(loaded.settings, loaded.data)
    onnx_model = onnx.load_from_string(onnx_bytes(model, shape, opset=opset))
    meta = loaded.meta
    genotype_json = meta.genotype_json or (loaded.genotype.to_json() if loaded.genotype is not None else None)
    props = {
        "bats_format": "1",
        "bats_kind": "onnx",
        "bats_source_kind": meta.kind,
        "bats_source": str(path),
        # A fixed model (resnet18) has no genotype: its settings' arch says what it is.
        **({"bats_genotype": genotype_json} if genotype_json else {}),
        "bats_config": json.dumps(
            {"network": {**loaded.settings, "auxiliary": False}, "data": loaded.data,
             "run": loaded.run, "source": {"path": str(path), "kind": meta.kind},
             "input": {"name": INPUT_NAME, "shape": list(shape)}},
            sort_keys=True,
        ),
        "bats_versions": json.dumps(software_versions(), sort_keys=True),
    }
    for key, value in props.items():
        entry = onnx_model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx_model.doc_string = f"bats export of {path.name} ({meta.kind}), network {loaded.name}"
    onnx.checker.check_model(onnx_model)
    data = onnx_model.SerializeToString()
    atomic_write_bytes(out, data)

    x = torch.randn(verify_batch, *shape, generator=torch.Generator().manual_seed(0))
    session = make_session(out, threads=None)
    got = session.run([OUTPUT_NAME], {INPUT_NAME: x.numpy()})[0]
    with torch.no_grad():
        want = model(x)
    diff = float((torch.from_numpy(got) - want).abs().max())
    from bats_cli.layers.quant import quant_convs

    return {
        "command": "export",
        "source": str(path),
        "kind": meta.kind,
        "genotype": loaded.name,
        "output": str(out),
        "bytes": len(data),
        "opset": opset,
        "input": [None, *shape],
        "binary_convs": len(quant_convs(loaded.model)),
        "ops": op_counts(onnx_model),
        "max_abs_diff": diff,
    }


def make_session(path: str | Path, *, threads: int | None = None, optimize: bool = False):
    """An onnxruntime CPU session for ``path``.

    ``optimize=False`` (what ``bats eval`` uses) keeps the graph as exported: onnxruntime's
    optimisations fold BatchNorm into a neighbouring conv, which changes rounding, and one flipped
    sign in a binary network can change a prediction. Benchmarks turn them on.
    """
    _, ort = require_onnx("eval")
    opts = ort.SessionOptions()
    opts.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    try:
        return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types for malformed files
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserInputError(f"{path}: onnxruntime cannot load it ({reason})") from None


__all__ = ["EXPORT_KINDS", "export_model", "inference_copy", "make_session", "onnx_bytes",
           "require_onnx"]
