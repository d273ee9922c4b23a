"""`bats export MODEL -o FILE.onnx`: a standard-op ONNX graph of a trained or binarized model."""

from __future__ import annotations

from typing import Any, Mapping

from bats_cli.cli.app import app
from bats_cli.cli.options import ForceOpt, JsonOpt, input_argument, output_option
from bats_cli.cli.output import emit_result, key_value_table

OnnxOutputOpt = output_option("Where to write the ONNX file.", required=True, metavar="FILE.onnx")


def result_table(result: Mapping[str, Any]) -> Any:
    ops = ", ".join(f"{name} {count}" for name, count in result["ops"].items())
    rows = [
        ("source", f"{result['source']} ({result['kind']}, genotype {result['genotype']})"),
        ("onnx", f"{result['output']} ({result['bytes']:,} bytes, opset {result['opset']}, "
                 f"input batch x {' x '.join(str(d) for d in result['input'][1:])})"),
        ("binary convs", f"{result['binary_convs']} (sign as Where, Conv with ±1 weights, Mul by α)"),
        ("ops", ops),
        ("check", f"onnxruntime vs PyTorch on a random batch: max |diff| {result['max_abs_diff']:.2e}"),
        ("next", f"bats eval {result['output']}"),
    ]
    return key_value_table(rows)


ModelArg = input_argument("MODEL", "A packed artifact, a binarize checkpoint or a train (step-1) checkpoint.")


@app.command("export")
def export_command(
    model: ModelArg,
    out: OnnxOutputOpt,
    force: ForceOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Write MODEL as a standard-op ONNX graph (needs the `export` extra: onnx, onnxruntime).

    BatchNormalization, the sign as Where(x >= 0, 1, -1), Conv with ±1 weights then Mul by the
    XNOR-Net++ scale, PRelu, pools, Concat, Add; genotype and settings in the metadata; auxiliary head
    dropped; dynamic batch. Check it with `bats eval FILE.onnx`.

    Example: bats export runs/tiny.packed.safetensors -o tiny.onnx
    """
    from bats_cli.training.export import export_model
    from bats_cli.utils.outputs import check_output_file

    check_output_file(out, flag="-o", force=force, inputs=[model])  # before the onnx import
    result = export_model(model, out, force=force)
    emit_result(result, as_json=as_json, table_fn=result_table)
