"""`bats eval CHECKPOINT`: top-1 / top-5 on the test split."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Mapping, Optional

import typer

from bats_cli.cli.app import app
from bats_cli.cli.options import (
    DATA,
    OUTPUT,
    RUN,
    DataDirOpt,
    DatasetOpt,
    DeviceOpt,
    DownloadOpt,
    ForceOpt,
    ImageSizeOpt,
    JsonOpt,
    NumWorkersOpt,
    PrecisionOpt,
    QuietOpt,
    ThreadsOpt,
    choice_callback,
    input_argument,
    output_option,
)
from bats_cli.cli.output import emit_result, key_value_table
from bats_cli.core.config import MAX_BATCH, MAX_IMAGES

EvalOutputOpt = output_option("Also write the result as JSON to this file (atomically; `bats ablate` reads it), "
                              "and the per-image predictions beside it (see --predictions).")


def result_table(result: Mapping[str, Any], *, verbose: bool = False) -> Any:
    rows = [
        ("checkpoint", f"{result['checkpoint']} ({result['kind']}: {result['activations']} "
                       f"activations, {result['weights']} weights)"),
        ("engine", str(result.get("engine", "float"))),
        ("dataset", f"{result['dataset']} test split, {result['images']} images"),
        ("top-1", f"{result['top1']:.2f} %" + (f" (± {result['top1_se']:.2f} s.e.)"
                                                 if result.get("top1_se") is not None else "")),
        ("top-5", f"{result['top5']:.2f} %"),
        ("loss", f"{result['loss']:.4f}"),
    ]
    info = result.get("engine_info")
    if verbose and info:
        rows.append(("SIMD path", f"{info['simd']} (this CPU: {', '.join(info['simd_available'])}); "
                                  f"{info['threads']} thread(s)"))
        rows.append(("binary layers", f"{info['binary_layers']} on the kernel; BatchNorm folded into "
                                      f"thresholds: {info['bn_folded']}, kept float: "
                                      f"{info['bn_kept_float']}; {info['fused_adds']} ops/cells "
                                      "add in the kernel pass"))
    if result.get("predictions"):
        rows.append(("predictions", f"{result['predictions']} (per image; images_sha256 "
                                    f"{str(result.get('images_sha256', ''))[:12]}…)"))
    return key_value_table(rows)


CheckpointArg = input_argument("CHECKPOINT",
                              "A train or binarize checkpoint, a packed artifact, or an exported .onnx file.")


@app.command("eval")
def eval_command(
    checkpoint: CheckpointArg,
    dataset: DatasetOpt = None,
    data_dir: DataDirOpt = None,
    download: DownloadOpt = None,
    image_size: ImageSizeOpt = None,
    subset: Annotated[Optional[int], typer.Option(
        "--subset", min=1, max=MAX_IMAGES, metavar="N", rich_help_panel=DATA,
        help="Evaluate only N test images (a class-balanced subset drawn with the model's training seed).")] = None,
    batch_size: Annotated[int, typer.Option(
        "--batch-size", min=1, max=MAX_BATCH, rich_help_panel=RUN,
        help="Images per forward pass.")] = 256,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = None,
    num_workers: NumWorkersOpt = None,
    threads: ThreadsOpt = None,
    engine: Annotated[
        str,
        typer.Option(
            "--engine", metavar="float|bitwise|auto", rich_help_panel=RUN,
            callback=choice_callback(("float", "bitwise", "auto"), "engine"),
            help="float: PyTorch. bitwise: binary convs as XNOR + popcount (CPU; binary weights; "
            "needs a C++ compiler, else exit 2). auto: bitwise where possible, else float.",
        ),
    ] = "float",
    output: EvalOutputOpt = None,
    predictions: Annotated[
        Optional[Path],
        typer.Option(
            "--predictions", dir_okay=False, rich_help_panel=OUTPUT,
            help="Write each image's predicted class and true label to this .npy file: a (2, N) "
            "int16 array (row 0 predicted, row 1 label, in test-set order; np.load(..., "
            "allow_pickle=False)), for image-by-image comparisons (McNemar). Default with --output "
            "OUT.json: OUT.predictions.npy beside it; without --output: none.",
        ),
    ] = None,
    force: ForceOpt = False,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
    verbose: Annotated[
        bool,
        typer.Option("--verbose", "-v", rich_help_panel=OUTPUT,
                     help="With --engine bitwise: also show the SIMD popcount path used "
                     "(AVX-512 VPOPCNTDQ, AVX2 or portable), threads, and how the binary layers "
                     "were built (BatchNorm folded into thresholds or kept float)."),
    ] = False,
) -> None:
    """Top-1 / top-5 of a checkpoint on the test split (default: the data set it was trained on).

    Example: bats eval runs/tiny/binarize/model.packed.safetensors --json

    Example: bats eval runs/tiny.packed.safetensors --engine bitwise

    Example: bats eval tiny.onnx   (onnxruntime; needs the `export` extra)

    Example: bats eval tiny.packed.safetensors --output eval.json   (+ eval.predictions.npy)
    """
    from bats_cli.training.evaluate import predictions_path, write_eval_files
    from bats_cli.training.onnx_eval import is_onnx_file

    per_image = predictions_path(output, predictions)
    if output is not None:
        from bats_cli.utils.outputs import check_output_file

        # Never the input or a folder, and its folder must take the file: checked before the evaluation.
        check_output_file(output, flag="--output", force=force, inputs=[checkpoint])
    if per_image is not None:
        from bats_cli.utils.outputs import check_output_file

        # Like --output's JSON, and never the JSON itself.
        check_output_file(per_image, flag="--predictions", force=force, inputs=[checkpoint],
                          reserved=[output])
    if is_onnx_file(checkpoint):
        from bats_cli.core.errors import UserInputError
        from bats_cli.training.onnx_eval import evaluate_onnx

        if engine != "float" or device not in ("auto", "cpu") or precision not in (None, "fp32"):
            raise UserInputError("an .onnx file runs on onnxruntime's CPU path in fp32; "
                                 "drop --engine/--device/--precision")
        result = evaluate_onnx(
            checkpoint, dataset=dataset, data_dir=data_dir, download=bool(download),
            image_size=image_size, subset=subset, batch_size=batch_size,
            num_workers=num_workers or 0, threads=threads, return_predictions=per_image is not None,
        )
    else:
        from bats_cli.training.evaluate import evaluate_checkpoint
        from bats_cli.utils.progress import Reporter

        result = evaluate_checkpoint(
            checkpoint, dataset=dataset, data_dir=data_dir, download=download,
            image_size=image_size, subset=subset, batch_size=batch_size, device=device,
            precision=precision or "fp32", num_workers=num_workers or 0, threads=threads,
            engine=engine, reporter=Reporter(quiet=quiet), return_predictions=per_image is not None,
        )
    result = write_eval_files(result, output=output, predictions=per_image)
    emit_result(result, as_json=as_json,
                table_fn=lambda r: result_table(r, verbose=verbose))
