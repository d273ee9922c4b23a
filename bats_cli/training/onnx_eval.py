"""`bats eval FILE.onnx`: top-1 / top-5 of an exported model, run by onnxruntime.

The data set, its directory and image size come from the file's ``bats_config`` metadata (what
``bats export`` copied from the checkpoint) unless given; the metrics are computed exactly as
for a checkpoint (:func:`bats_cli.training.evaluate.evaluate_model` drives an onnxruntime session), so the
two numbers can be compared directly.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from bats_cli.core.errors import UserInputError


def is_onnx_file(path: str | Path) -> bool:
    """An ``.onnx`` name, or an ONNX model under another name (sniffed from its first bytes)."""
    from bats_cli.core.sniff import sniff

    return Path(path).suffix.lower() == ".onnx" or sniff(path).kind == "onnx"


def read_onnx_metadata(path: str | Path) -> dict[str, str]:
    """The ``metadata_props`` of an ONNX file (one line on a missing or malformed file)."""
    from bats_cli.training.export import require_onnx

    onnx, _ = require_onnx("eval")
    import stat

    path = Path(path)
    if not path.exists():
        raise UserInputError(f"{path}: no such ONNX file")
    if not stat.S_ISREG(path.stat().st_mode):
        # A FIFO would block the read forever; a device has no end.
        raise UserInputError(f"{path}: not a regular file (a FIFO, device or socket); give an ONNX file")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf's DecodeError and friends
        raise UserInputError(f"{path}: not a valid ONNX file ({type(exc).__name__})") from None
    return {p.key: p.value for p in model.metadata_props}


class OnnxModule(nn.Module):
    """An onnxruntime session behind an ``nn.Module`` interface (CPU, float32 logits).

    The graph comes from a file: one image-batch input and one (batch, classes) float output are
    checked when it is wrapped, and a graph that fails on the images (or answers in another
    shape) is one error line naming the file, never an internal error.
    """

    def __init__(self, session, *, path: str | Path = "<onnx>", num_classes: int | None = None) -> None:
        super().__init__()
        self.session = session
        self.path = path
        self.num_classes = num_classes
        inputs, outputs = session.get_inputs(), session.get_outputs()
        if len(inputs) != 1 or not outputs:
            raise UserInputError(f"{path}: the graph takes {len(inputs)} inputs and gives {len(outputs)} "
                                 "outputs; bats export writes one image input and one logits output")
        shape = inputs[0].shape
        if shape is not None and len(shape) != 4:
            raise UserInputError(f"{path}: the graph's input has {len(shape)} dimensions; expected "
                                 "(batch, channels, height, width)")
        self.input_name = inputs[0].name
        self.output_name = outputs[0].name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import numpy as np

        feed = {self.input_name: x.detach().cpu().float().contiguous().numpy()}
        try:
            out = self.session.run([self.output_name], feed)[0]
        except Exception as exc:  # onnxruntime's own error types (shape, type, a failing op)
            reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
            raise UserInputError(f"{self.path}: the ONNX graph fails on these images ({reason})") from None
        out = np.asarray(out)
        wanted = (x.shape[0], self.num_classes) if self.num_classes else None
        if out.ndim != 2 or out.shape[0] != x.shape[0] or (wanted and out.shape != wanted) or not (
                np.issubdtype(out.dtype, np.floating)):
            raise UserInputError(f"{self.path}: the ONNX graph answers {out.dtype} of shape {tuple(out.shape)}; "
                                 f"expected float logits of shape (batch, classes)")
        return torch.from_numpy(out.astype(np.float32, copy=False))


def load_onnx(path: str | Path, *, threads: int | None = None):
    """A :class:`bats_cli.training.evaluate.LoadedModel` whose model runs ``path`` with onnxruntime."""
    from bats_cli.core.genotype import Genotype
    from bats_cli.models.modelio import LoadedModel
    from bats_cli.models.registry import model_of
    from bats_cli.training.export import make_session

    path = Path(path)
    props = read_onnx_metadata(path)
    if props.get("bats_kind") != "onnx" or "bats_config" not in props:
        raise UserInputError(f"{path}: an ONNX file without bats metadata (not written by bats export)")
    from bats_cli.storage.metadata import check_recorded_config, load_json

    # Validated like a checkpoint's: the file may come from anywhere.
    config = check_recorded_config(path, load_json(props["bats_config"], where=f"{path}: bats_config"))
    network = config.get("network") or {}
    genotype = None  # a fixed model (resnet18) has none
    if model_of(network).genotype:
        genotype = Genotype.from_json(props.get("bats_genotype", ""), origin=f"{path} (bats_genotype)")
    session = make_session(path, threads=threads)
    classes = network.get("num_classes") or (config.get("data") or {}).get("num_classes")
    return LoadedModel(
        model=OnnxModule(session, path=path, num_classes=classes if isinstance(classes, int) else None),
        meta=props, settings=network,
        data=config.get("data") or {}, run=config.get("run") or {}, genotype=genotype,
    )


def evaluate_onnx(path: str | Path, *, batch_size: int = 256, num_workers: int = 0, threads: int | None = None,
                  return_predictions: bool = False, **data_choice: Any) -> dict[str, Any]:
    """Top-1 / top-5 / loss of an exported ONNX model on a test split (CPU, onnxruntime).

    ``data_choice``: the test data as :func:`bats_cli.training.evaluate.evaluate_checkpoint` takes it
    (``dataset``, ``data_dir``, ``download``, ``image_size``, ``subset``; by default the recorded data).
    """
    from bats_cli.training.evaluate import eval_data, eval_result, evaluate_model

    path = Path(path)
    loaded = load_onnx(path, threads=threads)
    data = eval_data(loaded, path, **data_choice)
    metrics = evaluate_model(loaded.model, data.test, batch_size=batch_size, device="cpu",
                             num_workers=num_workers, return_predictions=return_predictions)
    return eval_result(loaded, path, data, metrics, kind="onnx", engine="onnxruntime")


__all__ = ["OnnxModule", "evaluate_onnx", "is_onnx_file", "load_onnx", "read_onnx_metadata"]
