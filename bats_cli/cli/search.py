"""`bats search`: the BATS progressive architecture search (§4, §6.1)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Any, Mapping, Optional

from bats_cli.cli.app import app
from bats_cli.cli.options import (
    OUTPUT,
    RUN,
    ChannelShuffleOpt,
    ChannelsPerGroupOpt,
    ConfigFileOpt,
    DataDirOpt,
    DatasetOpt,
    DeviceOpt,
    DownloadOpt,
    DryRunOpt,
    GroupPolicyOpt,
    IgnorePlanOpt,
    ImageSizeOpt,
    JsonOpt,
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
    ThreadsOpt,
    opt,
    path_or_none,
    preset_option,
)
from bats_cli.cli.output import key_value_table
from bats_cli.cli.run_helpers import (
    command_config,
    resume_mode,
    run_command,
    starting,
)
from bats_cli.core.errors import UserInputError
from bats_cli.core.presets import SEARCH_PRESETS

SPACE = "Search space and strategy (§4.1, §4.3)"
SCHED = "Progressive schedule (§6.1)"
OPTIM = "Optimisation (§6.1; Appendix B with --real)"

SearchPresetOpt = preset_option(SEARCH_PRESETS)


def _int_list(text: str | None, flag: str) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        values = tuple(int(v) for v in text.replace(" ", "").split(",") if v != "")
    except ValueError:
        raise UserInputError(f"{flag} {text!r}: expected comma-separated integers like 5,11,17") from None
    if not values:
        raise UserInputError(f"{flag}: expected comma-separated integers like 5,11,17")
    return values


def _betas(text: str | None, flag: str) -> tuple[float, float] | None:
    if text is None:
        return None
    try:
        a, b = (float(v) for v in text.split(","))
    except ValueError:
        raise UserInputError(f"{flag} {text!r}: expected two numbers like 0.5,0.999") from None
    return a, b


def result_table(result: Mapping[str, Any]) -> Any:
    from bats_cli.core.genotype import Genotype

    g = Genotype.from_dict(result["genotype"])
    rows = [("genotype", f"{result['genotype_path']} ({g.name})")]
    for cell in ("normal", "reduce"):
        rows.append((cell, " ".join(f"{op}<{src}" for op, src in g.cell(cell))))
    share = result["parameter_free_share"]
    rows.append(("parameter-free", f"normal {share['normal']:.2f}, reduce {share['reduce']:.2f}"))
    for s in result["stages"]:
        rows.append((f"stage {s['stage']}", f"{s['layers']} cells, {s['ops']} ops, {s['epochs']} epochs: "
                                            f"{s['seconds']:.1f} s"))
    rows.append(("total", f"{result['total_seconds']:.1f} s"))
    if result.get("world_size", 1) > 1:
        rows.append(("processes", f"{result['world_size']} (torchrun), {result['per_rank_batch']} images "
                                  "of each batch per process; every rank derived this cell"))
    messages = [w["message"] for w in result.get("warnings", [])]
    heads = [m.split("; ", 1)[0] for m in messages]
    tails = {m.split("; ", 1)[1] for m in messages if "; " in m}
    if len(messages) > 1 and len(tails) == 1 and all("; " in m for m in messages):
        # The same advice after each stage's finding: the findings, then the advice once.
        rows += [("warning", head) for head in heads] + [("", tails.pop())]
    else:
        rows += [("warning", m) for m in messages]
    rows.append(("checkpoint", result["checkpoint"]))
    rows.append(("next", f"bats train {result['genotype_path']}"))
    return key_value_table(rows, fold=True)


@app.command("search")
def search_command(
    dataset: DatasetOpt = None,
    data_dir: DataDirOpt = None,
    download: DownloadOpt = None,
    subset: SubsetOpt = None,
    image_size: ImageSizeOpt = None,
    space: Annotated[Optional[str], opt("--space", panel=SPACE, help="bats (default, Table 1) or darts.")] = None,
    weights: Annotated[Optional[str], opt(
        "--weights", panel=SPACE, help="real (default) or binary weights during the search.")] = None,
    activations: Annotated[Optional[str], opt(
        "--activations", panel=SPACE, help="binary (default) or real activations during the search.")] = None,
    real: Annotated[bool, opt(
        "--real", panel=SPACE,
        help="Appendix B's real-valued search: real weights and activations with SGD lr 0.1, momentum 0.9, "
             "cosine (unless --optimizer says otherwise). --weights real --activations real alone keeps Adam.",
    )] = False,
    temp_normal: Annotated[Optional[float], opt(
        "--temp-normal", panel=SPACE, help="Softmax temperature of normal cells (default 0.2; 1 = DARTS).")] = None,
    temp_reduce: Annotated[Optional[float], opt(
        "--temp-reduce", panel=SPACE, help="Softmax temperature of reduction cells (default 0.15).")] = None,
    layers: Annotated[Optional[str], opt(
        "--layers", panel=SCHED, metavar="L1,L2,..", help="Cells per stage (default 5,11,17).")] = None,
    ops: Annotated[Optional[str], opt(
        "--ops", panel=SCHED, metavar="K1,K2,..", help="Candidate ops per edge per stage (default 8,5,3).")] = None,
    epochs: Annotated[Optional[int], opt("--epochs", panel=SCHED, min=1, help="Epochs per stage (default 25).")] = None,
    warmup: Annotated[Optional[int], opt(
        "--warmup", panel=SCHED, min=0,
        help="First epochs of each stage that train weights only (default 10).")] = None,
    batch_size: Annotated[Optional[int], opt(
        "--batch-size", panel=SCHED, min=1,
        help="Images per step in each half (architecture, weights): the global batch, split over processes "
             "under torchrun. Default 96.")] = None,
    channels: Annotated[Optional[int], opt(
        "--channels", panel=SCHED, min=2, help="Supernet width (default 18 = 6 groups x 3 channels).")] = None,
    nodes: Annotated[Optional[int], opt(
        "--nodes", panel=SCHED, min=1, help="Intermediate nodes per cell (default 4).")] = None,
    channels_per_group: ChannelsPerGroupOpt = None,
    group_policy: GroupPolicyOpt = None,
    reduce_shortcut: ReduceShortcutOpt = None,
    channel_shuffle: ChannelShuffleOpt = None,
    arch_lr: Annotated[Optional[float], opt("--arch-lr", panel=OPTIM, help="Adam lr for alpha (default 6e-4).")] = None,
    arch_weight_decay: Annotated[Optional[float], opt(
        "--arch-weight-decay", panel=OPTIM, help="Weight decay for alpha (default 1e-3).")] = None,
    arch_betas: Annotated[Optional[str], opt(
        "--arch-betas", panel=OPTIM, metavar="B1,B2", help="Adam betas for alpha (default 0.5,0.999).")] = None,
    optimizer: Annotated[Optional[str], opt(
        "--optimizer", panel=OPTIM,
        help="Weights: adam (default, whatever the search domain) or sgd (default with --real).")] = None,
    lr: Annotated[Optional[float], opt("--lr", panel=OPTIM, help="Weights lr (default 1e-3 Adam; 0.1 SGD).")] = None,
    weight_decay: Annotated[Optional[float], opt(
        "--weight-decay", panel=OPTIM, help="Weight decay of the network weights (default 3e-4).")] = None,
    betas: Annotated[Optional[str], opt(
        "--betas", panel=OPTIM, metavar="B1,B2", help="Adam betas for the weights (default 0.9,0.999).")] = None,
    momentum: Annotated[Optional[float], opt("--momentum", panel=OPTIM, help="SGD momentum (default 0.9).")] = None,
    lr_schedule: Annotated[Optional[str], opt(
        "--lr-schedule", panel=OPTIM,
        help="constant (default with Adam) or cosine per stage (default with SGD).")] = None,
    lr_min: Annotated[Optional[float], opt("--lr-min", panel=OPTIM, help="Cosine floor (default 1e-3).")] = None,
    grad_clip: Annotated[Optional[float], opt(
        "--grad-clip", panel=OPTIM, help="Clip the weights' gradient norm (default 5, as DARTS).")] = None,
    max_skip: Annotated[Optional[int], opt(
        "--max-skip", panel=SPACE, min=0,
        help="Cap skip connections in the final normal cell (P-DARTS; off by default).")] = None,
    name: Annotated[Optional[str], opt(
        "--name", panel=OUTPUT, help="Genotype name (default: the run directory's name).")] = None,
    mixed_op: Annotated[Optional[str], opt(
        "--mixed-op", panel=RUN, help="fast (default) or reference implementation of the mixed op.")] = None,
    threads: ThreadsOpt = None,
    seed: SeedOpt = None,
    out: OutOpt = None,
    resume: ResumeOpt = False,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = None,
    num_workers: NumWorkersOpt = None,
    resume_or_start: ResumeOrStartOpt = False,
    preset: SearchPresetOpt = None,
    config_file: ConfigFileOpt = None,
    print_config_: PrintConfigOpt = False,
    dry_run: DryRunOpt = False,
    ignore_plan: IgnorePlanOpt = False,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Search a cell with BATS: 3 stages (5/11/17 cells, 8/5/3 ops), binary activations, T=0.2/0.15.

    Writes OUT/genotype.json (for bats train / flops), OUT/last.safetensors (resumable; also
    `bats derive` input), OUT/metrics.csv, OUT/alphas/*.json, OUT/genotypes/*.json.
    Ctrl-C saves a checkpoint; rerun with --resume to continue at the same stage, epoch and step.
    Multi-GPU: torchrun --nproc-per-node N -m bats_cli search ... (--batch-size stays the global batch).

    Example: bats search --preset tiny --out runs/search-tiny

    Example: bats search --dataset imagefolder --data-dir DIR --preset small --out runs/c10mini
    (DIR: an ImageFolder tree with train/ and val/, e.g. a CIFAR-10 copy)
    """
    starting("search", "loading torch and the data", quiet=quiet or print_config_)
    from bats_cli.nas.search import SearchConfig, run_search
    from bats_cli.utils.progress import Reporter

    if real:
        for flag, value in (("--weights", weights), ("--activations", activations)):
            if value not in (None, "real"):
                raise UserInputError(f"--real contradicts {flag} {value}")
        weights = activations = "real"
        # Appendix B's recipe is what --real asks for; --weights/--activations alone keep Adam.
        optimizer = optimizer or "sgd"
    overrides = {
        "dataset": dataset, "data_dir": path_or_none(data_dir),
        "download": download, "subset": subset, "image_size": image_size, "space": space,
        "weights": weights, "activations": activations, "temp_normal": temp_normal,
        "temp_reduce": temp_reduce, "layers": _int_list(layers, "--layers"),
        "ops": _int_list(ops, "--ops"), "epochs": epochs, "warmup": warmup,
        "batch_size": batch_size, "channels": channels, "nodes": nodes,
        "channels_per_group": channels_per_group, "group_policy": group_policy,
        "reduce_shortcut": reduce_shortcut, "channel_shuffle": channel_shuffle, "arch_lr": arch_lr,
        "arch_weight_decay": arch_weight_decay, "arch_betas": _betas(arch_betas, "--arch-betas"),
        "optimizer": optimizer, "lr": lr, "weight_decay": weight_decay, "betas": _betas(betas, "--betas"),
        "momentum": momentum, "lr_schedule": lr_schedule, "lr_min": lr_min,
        "grad_clip": grad_clip, "max_skip": max_skip, "name": name, "mixed_op": mixed_op,
        "seed": seed, "device": device, "precision": precision, "num_workers": num_workers,
        "threads": threads,
    }
    resume = resume_mode(out, resume, resume_or_start)
    if out is None:
        out = Path("runs") / time.strftime("search-%Y%m%d-%H%M%S")
    cfg, file_config = command_config(SearchConfig, preset=preset, presets=SEARCH_PRESETS, overrides=overrides,
                                      config_file=config_file, print_config_=print_config_)
    if cfg is None:
        return

    def search(hook: Any, resumed: dict[str, Any]) -> Any:
        from bats_cli.training.plan import DryRun

        try:
            result = run_search(cfg, out_dir=out, resume=resume, reporter=Reporter(quiet=quiet),
                                preflight=hook, preset=preset, overrides=resumed)
        except DryRun as dry:
            if dry.plan is None:  # another rank under torchrun: rank 0 prints the plan
                return None
            raise
        return result.to_dict()

    run_command(search, file_config=file_config, overrides=overrides, dry_run=dry_run, ignore_plan=ignore_plan,
                as_json=as_json, quiet=quiet, table_fn=result_table)
