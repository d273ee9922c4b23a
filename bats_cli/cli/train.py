"""`bats train GENOTYPE|resnet18`: step 1 of the two-step strategy (binary activations, real weights)."""

from __future__ import annotations

from typing import Annotated, Any, Mapping, Optional

import typer

from bats_cli.cli.app import app
from bats_cli.cli.options import (
    NETWORK,
    AttentionWeightOpt,
    ChannelShuffleOpt,
    ChannelsPerGroupOpt,
    ConfigFileOpt,
    DataDirOpt,
    DatasetOpt,
    DeviceOpt,
    DownloadOpt,
    DryRunOpt,
    GroupPolicyOpt,
    HoldoutOpt,
    IgnorePlanOpt,
    ImageSizeOpt,
    JsonOpt,
    KdTemperatureOpt,
    KdWeightOpt,
    NumWorkersOpt,
    OutOpt,
    PrecisionOpt,
    PrintConfigOpt,
    QuietOpt,
    ReduceShortcutOpt,
    ResumeOpt,
    ResumeOrStartOpt,
    SeedOpt,
    SubsetOpt,
    TeacherOpt,
    ThreadsOpt,
    opt,
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
from bats_cli.core.presets import RESNET_TRAIN_PRESETS, TRAIN_PRESETS, describe_presets

OPTIM = "Optimisation (defaults: the paper, §6.2)"
AUG = "Augmentation"

TrainPresetOpt = preset_option(
    TRAIN_PRESETS, also=f"For resnet18 — {describe_presets(RESNET_TRAIN_PRESETS)}.")


def result_table(result: Mapping[str, Any]) -> Any:
    from bats_cli.models.modelio import network_label

    net = result["network"]
    kind = "real" if not net["binary_activations"] else (
        "binary weights and activations" if net["binary_weights"] else "binary activations, real weights")
    rows = [
        ("genotype", result["genotype"]),
        ("dataset", f"{result['dataset']} ({result['train_images']} train / "
                    f"{result['test_images']} test images)"),
        ("network", f"{net['kind']}, {network_label(net)}, {kind}, {result['parameters']:,} parameters"
                    + (f" ({result['parameters_without_aux']:,} without the auxiliary head, as bats flops "
                       "counts)" if net.get("auxiliary") else "")),
        ("epochs", f"{result['epochs']} x {result['steps_per_epoch']} steps"
                   + (f" on {result['world_size']} processes" if result["world_size"] > 1 else "")),
        ("train top-1", pct(result["final_train_top1"])),
        ("val top-1", pct(result["final_val_top1"]) + f"  (best {pct(result['best_val_top1'])}, "
                      f"epoch {result['best_epoch']})"),
        ("val top-5", pct(result["final_val_top5"])),
        ("time", f"{result['seconds']:.0f} s"),
        ("checkpoints", f"{result['last']}, {result['best']}"),
        ("next", f"bats binarize {result['last']}"),
    ]
    return key_value_table(rows)


@app.command("train")
def train_command(
    genotype: Annotated[
        str,
        typer.Argument(metavar="GENOTYPE", help="A genotype .json file, a bundled name (bats_c10, darts_v2, ...), "
                       "or resnet18: Table 5's binary ResNet-18 baseline (--channels = base width, 64; "
                       "cell-only options are refused)."),
    ],
    dataset: DatasetOpt = None,
    data_dir: DataDirOpt = None,
    download: DownloadOpt = None,
    subset: SubsetOpt = None,
    holdout: HoldoutOpt = None,
    image_size: ImageSizeOpt = None,
    width: Annotated[Optional[str], opt(
        "--width", panel=NETWORK,
        help="Width preset: 1x, medium, large or 2x (§6.2).")] = None,
    layers: Annotated[Optional[int], opt(
        "--layers", panel=NETWORK, min=3,
        help="Cells (default 20 CIFAR / 14 ImageNet).")] = None,
    channels: Annotated[Optional[int], opt(
        "--channels", panel=NETWORK, min=1,
        help="Initial channels C (overrides --width; default 36 / 80); resnet18: its base width (default 64).")] = None,
    real: Annotated[Optional[bool], opt(
        "--real", panel=NETWORK,
        help="Real-valued activations too (no binarization at all): the real network of the same architecture, e.g. a "
             "--teacher. Keeps --optimizer adam unless told: Appendix B's real-valued recipe is --optimizer sgd (lr "
             "0.1).")] = None,
    activation: Annotated[Optional[str], opt(
        "--activation", panel=NETWORK,
        help="After each binary conv: prelu (default), rprelu (ReActNet's PReLU(x - shift) + shift, learnable per "
             "channel; no RSign: the BatchNorm before each sign already shifts its threshold), relu or none.")] = None,
    group_policy: GroupPolicyOpt = None,
    channels_per_group: ChannelsPerGroupOpt = None,
    reduce_shortcut: ReduceShortcutOpt = None,
    channel_shuffle: ChannelShuffleOpt = None,
    epochs: Annotated[Optional[int], opt(
        "--epochs", panel=OPTIM, min=1,
        help="Default 600 (CIFAR-sized data) / 75 (ImageNet-sized).")] = None,
    batch_size: Annotated[Optional[int], opt(
        "--batch-size", panel=OPTIM, min=1,
        help="Global batch (split over processes under torchrun). Default 256.")] = None,
    optimizer: Annotated[Optional[str], opt(
        "--optimizer", panel=OPTIM,
        help="adam (default, §6.2) or sgd (momentum 0.9, lr 0.1: Appendix B's recipe for real-valued "
             "networks).")] = None,
    momentum: Annotated[Optional[float], opt("--momentum", panel=OPTIM, help="SGD momentum. Default 0.9.")] = None,
    lr: Annotated[Optional[float], opt(
        "--lr", panel=OPTIM,
        help="Learning rate, cosine-decayed every step to --lr-min. Default 1e-3 (Adam), 0.1 (SGD).")] = None,
    lr_min: Annotated[Optional[float], opt("--lr-min", panel=OPTIM, help="Final learning rate. Default 0.")] = None,
    weight_decay: Annotated[Optional[float], opt("--weight-decay", panel=OPTIM, help="Default 0.")] = None,
    aux_weight: Annotated[Optional[float], opt(
        "--aux-weight", panel=OPTIM,
        help="Auxiliary tower loss weight. Default 0.4.")] = None,
    drop_path: Annotated[Optional[float], opt(
        "--drop-path", panel=OPTIM,
        help="Drop-path probability. Default 0.")] = None,
    cutout: Annotated[Optional[int], opt(
        "--cutout", panel=AUG, metavar="PX",
        help="Cutout hole side; 0 = off. Default 16 on cifar10, else off.")] = None,
    mixup: Annotated[Optional[float], opt(
        "--mixup", panel=AUG, metavar="ALPHA",
        help="MixUp alpha; 0 = off. Default 0.2 on cifar100, else off.")] = None,
    autoaugment: Annotated[Optional[bool], opt(
        "--autoaugment", panel=AUG,
        help="torchvision AutoAugment (CIFAR / ImageNet policy).")] = None,
    teacher: TeacherOpt = None,
    kd_temperature: KdTemperatureOpt = None,
    kd_weight: KdWeightOpt = None,
    attention_weight: AttentionWeightOpt = None,
    seed: SeedOpt = None,
    out: OutOpt = None,
    resume: ResumeOpt = False,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = None,
    num_workers: NumWorkersOpt = None,
    threads: ThreadsOpt = None,
    resume_or_start: ResumeOrStartOpt = False,
    preset: TrainPresetOpt = None,
    config_file: ConfigFileOpt = None,
    print_config_: PrintConfigOpt = False,
    dry_run: DryRunOpt = False,
    ignore_plan: IgnorePlanOpt = False,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Train a genotype's network (or resnet18, Table 5's binary ResNet-18) from scratch: binary activations,
    real weights (§4.3 step 1).

    Writes OUT/last.safetensors (resumable), OUT/best.safetensors, metrics.csv, config.json.
    Multi-GPU: torchrun --nproc-per-node N -m bats_cli train ...

    Example: bats train bats_c10 --preset tiny --out runs/tiny

    Example: bats train resnet18 --preset tiny --out runs/resnet-tiny

    Example (a real-valued teacher): bats train bats_c10 --preset tiny --real --out runs/teacher

    Example (distillation from it): bats train bats_c10 --preset tiny --teacher runs/teacher/last.safetensors
    """
    starting("train", "loading torch, the data and the network", quiet=quiet or print_config_)
    from bats_cli.core.presets import train_presets
    from bats_cli.core.zoo import resolve_network
    from bats_cli.pipeline.train import TrainConfig, train

    g = resolve_network(genotype)
    presets = train_presets(g if isinstance(g, str) else "cells")
    overrides = {
        "genotype": genotype, "dataset": dataset,
        "data_dir": path_or_none(data_dir), "download": download,
        "subset": subset, "holdout": holdout, "image_size": image_size, "width": width, "layers": layers,
        "channels": channels, "real": real, "activation": activation,
        "group_policy": group_policy, "channels_per_group": channels_per_group,
        "reduce_shortcut": reduce_shortcut, "channel_shuffle": channel_shuffle,
        "optimizer": optimizer, "momentum": momentum, "epochs": epochs, "batch_size": batch_size, "lr": lr,
        "lr_min": lr_min, "weight_decay": weight_decay, "aux_weight": aux_weight,
        "drop_path": drop_path, "cutout": cutout, "mixup": mixup, "autoaugment": autoaugment,
        "seed": seed, "device": device, "precision": precision, "num_workers": num_workers, "threads": threads,
        "teacher": path_or_none(teacher), "kd_temperature": kd_temperature, "kd_weight": kd_weight,
        "attention_weight": attention_weight,
    }
    cfg, file_config = command_config(TrainConfig, preset=preset, presets=presets, overrides=overrides,
                                      config_file=config_file, print_config_=print_config_)
    if cfg is None:
        return
    resume = resume_mode(out, resume, resume_or_start)
    run_command(lambda hook, resumed: train(cfg, genotype=g, out=out, resume=resume, quiet=quiet,
                                            preset=preset, overrides=resumed, preflight=hook),
                file_config=file_config, overrides=overrides, dry_run=dry_run, ignore_plan=ignore_plan,
                as_json=as_json, quiet=quiet, table_fn=result_table)
