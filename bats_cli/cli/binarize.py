"""`bats binarize CHECKPOINT`: step 2 of the two-step strategy, and the packed 1-bit artifact."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Mapping, Optional

import typer

from bats_cli.cli.app import app
from bats_cli.cli.options import (
    OUTPUT,
    AttentionWeightOpt,
    ConfigFileOpt,
    DataDirOpt,
    DeviceOpt,
    DryRunOpt,
    ForceOpt,
    IgnorePlanOpt,
    JsonOpt,
    KdTemperatureOpt,
    KdWeightOpt,
    NumWorkersOpt,
    PrecisionOpt,
    PrintConfigOpt,
    QuietOpt,
    ResumeOpt,
    ResumeOrStartOpt,
    SeedOpt,
    SubsetOpt,
    TeacherOpt,
    ThreadsOpt,
    input_argument,
    output_option,
    path_or_none,
    preset_option,
)
from bats_cli.cli.output import key_value_table, pct
from bats_cli.cli.run_helpers import (
    command_config,
    resume_mode,
    run_command,
    starting,
)
from bats_cli.core.presets import BINARIZE_PRESETS

FT = "Fine-tuning"
BinarizePresetOpt = preset_option(BINARIZE_PRESETS)
PackedOutputOpt = output_option("Where to write the packed 1-bit artifact. Default OUT/model.packed.safetensors.")


def _epochs(n: int) -> str:
    return f"{n} epoch{'' if n == 1 else 's'}"


def result_table(result: Mapping[str, Any]) -> Any:
    rows = [
        ("source", result["source"]),
        ("binary convs", result["binary_convs"]),
        ("top-1 step 1", pct(result["step1_top1"]) + "  (binary activations, real weights)"),
        ("top-1 binarized", pct(result["binarized_top1_no_calibration"]) + " -> "
         + pct(result["binarized_top1"]) + " after re-estimating BatchNorm"),
        ("top-1 final", pct(result["final_top1"]) + f"  after {_epochs(result['fine_tune_epochs'])} "
         f"of fine-tuning  (top-5 {pct(result['final_top5'])})"),
        ("change vs step 1", "-" if result["drop_vs_step1"] is None else
         f"{-result['drop_vs_step1']:+.2f} points (final - step 1)"),
        ("checkpoint", result["last"]),
    ]
    if "packed" in result:
        size = result["packed_size"]
        rows.append(("packed", f"{result['packed']}  ({size['file_bytes']:,} bytes; binary convs "
                               f"{size['binary_convs_ratio']:.1f}x smaller than fp32, whole model "
                               f"{size['total_ratio']:.1f}x)"))
        rows.append(("next", f"bats eval {result['packed']}"))
    return key_value_table(rows)


CheckpointArg = input_argument("CHECKPOINT", "A `bats train` checkpoint (last.safetensors or best.safetensors).")


@app.command("binarize")
def binarize_command(
    checkpoint: CheckpointArg,
    epochs: Annotated[Optional[int], typer.Option(
        "--epochs", min=0, rich_help_panel=FT,
        help="Fine-tuning epochs with binary weights; 0 = binarize only. Default: half the training run's epochs "
             "(measured, docs/pipeline.md).")] = None,
    lr: Annotated[Optional[float], typer.Option(
        "--lr", rich_help_panel=FT,
        help="Adam learning rate for fine-tuning (cosine to 0). Default: the training run's.")] = None,
    batch_size: Annotated[Optional[int], typer.Option(
        "--batch-size", min=1, rich_help_panel=FT,
        help="Default: the training run's.")] = None,
    calibration_batches: Annotated[Optional[int], typer.Option(
        "--calibration-batches", min=0, rich_help_panel=FT,
        help="Training batches to re-estimate BatchNorm statistics on after binarizing; 0 = off. Default 20.")] = None,
    packed: PackedOutputOpt = None,
    out: Annotated[Optional[Path], typer.Option(
        "--out", file_okay=False, rich_help_panel=OUTPUT,
        help="Run directory. Default: a 'binarize' folder next to CHECKPOINT.")] = None,
    force: ForceOpt = False,
    keep_aux: Annotated[Optional[bool], typer.Option(
        "--keep-aux", rich_help_panel=OUTPUT,
        help="Keep the auxiliary tower in the packed artifact (training only; dropped by default).")] = None,
    teacher: TeacherOpt = None,
    kd_temperature: KdTemperatureOpt = None,
    kd_weight: KdWeightOpt = None,
    attention_weight: AttentionWeightOpt = None,
    data_dir: DataDirOpt = None,
    subset: SubsetOpt = None,
    seed: SeedOpt = None,
    resume: ResumeOpt = False,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = None,
    num_workers: NumWorkersOpt = None,
    threads: ThreadsOpt = None,
    resume_or_start: ResumeOrStartOpt = False,
    preset: BinarizePresetOpt = None,
    config_file: ConfigFileOpt = None,
    print_config_: PrintConfigOpt = False,
    dry_run: DryRunOpt = False,
    ignore_plan: IgnorePlanOpt = False,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Binarize the weights of a trained network (sign(W) x per-channel scale), fine-tune, pack.

    Reports top-1 before (step 1) and after; the data set, batch size and seed are the training
    run's. Writes OUT/last.safetensors (kind binarize) and the packed artifact (-o FILE).

    Example: bats binarize runs/tiny/last.safetensors -o tiny.packed.safetensors

    Fine-tuning distils from a teacher only when --teacher is given (default: none, cross-entropy
    as in the paper). Real-to-binary's chain: --teacher CHECKPOINT (the step-1 network it starts
    from); ReActNet's: --teacher a real-valued network (bats train --real).
    """
    starting("binarize", "loading torch, the checkpoint and the data", quiet=quiet or print_config_)
    from bats_cli.pipeline.binarize import BinarizeConfig, binarize
    from bats_cli.utils.outputs import check_output_file

    if packed is not None:
        run_out = out if out is not None else checkpoint.parent / "binarize"
        # Checked before the run: the packed file must never replace a checkpoint.
        check_output_file(
            packed, flag="-o", force=force, inputs=[checkpoint],
            reserved=[run_out / name for name in (
                "last.safetensors", "best.safetensors", "config.json", "metrics.csv", "result.json")],
        )

    overrides = {
        "checkpoint": str(checkpoint), "epochs": epochs, "lr": lr, "batch_size": batch_size,
        "calibration_batches": calibration_batches, "seed": seed,
        "data_dir": path_or_none(data_dir), "subset": subset,
        "keep_aux": keep_aux, "device": device, "precision": precision,
        "num_workers": num_workers, "threads": threads,
        "teacher": path_or_none(teacher), "kd_temperature": kd_temperature, "kd_weight": kd_weight,
        "attention_weight": attention_weight,
    }
    cfg, file_config = command_config(BinarizeConfig, preset=preset, presets=BINARIZE_PRESETS, overrides=overrides,
                                      config_file=config_file, print_config_=print_config_)
    if cfg is None:
        return
    run_out = out if out is not None else checkpoint.parent / "binarize"
    resume = resume_mode(run_out, resume, resume_or_start)
    run_command(lambda hook, resumed: binarize(cfg, out=out, packed=packed, resume=resume, quiet=quiet,
                                               preset=preset, overrides=resumed, preflight=hook),
                file_config=file_config, overrides=overrides, dry_run=dry_run, ignore_plan=ignore_plan,
                as_json=as_json, quiet=quiet, table_fn=result_table)
