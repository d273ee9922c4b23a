"""Option types: one per concept, declared once and used by every command that has it.

Use them as parameter annotations::

    @app.command()
    def train(genotype: ..., dataset: DatasetOpt = None, seed: SeedOpt = None,
              device: DeviceOpt = "auto", as_json: JsonOpt = False, quiet: QuietOpt = False): ...

Defaults are None where a preset (or the paper default in the command's config model) supplies
the value; pass them to ``bats_cli.core.config.resolve_config`` as overrides. ``-o/--output`` always
names an output FILE, ``--out`` a run or study DIRECTORY, and ``--force`` only ever overwrites
outputs (``--ignore-plan`` overrides the memory plan).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, Optional

import typer

# One limit for flags and files.
from bats_cli.core.config import MAX_IMAGE_SIZE, MAX_IMAGES, MAX_SEED, MAX_THREADS, MAX_WORKERS

# Help panels.
DATA = "Data"
RUN = "Run"
OUTPUT = "Output"
DISTILL = "Distillation"
NETWORK = "Network"

_DEVICE_RE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


def _check_device(value: str | None) -> str | None:
    if value is not None and not _DEVICE_RE.match(value.strip().lower()):
        raise typer.BadParameter(f"{value!r}: choose auto, cpu, cuda or cuda:N")
    return value.strip().lower() if value is not None else None


def opt(*names: str, panel: str, **kw: Any) -> Any:
    """``typer.Option(*names, rich_help_panel=panel, **kw)``: a command's own option, in a help panel."""
    return typer.Option(*names, rich_help_panel=panel, **kw)


def path_or_none(path: Path | None) -> str | None:
    """A path option as a config value (configs hold plain strings)."""
    return str(path) if path is not None else None


def choice_callback(choices: Iterable[str], what: str) -> Callable[[Any], Any]:
    """A typer callback refusing a value outside ``choices`` at parse time (before torch is
    imported), with the closest name suggested."""
    names = list(choices)

    def check(value: Any) -> Any:
        if value is None or value in names:
            return value
        import difflib

        close = difflib.get_close_matches(str(value), names, n=1, cutoff=0.5)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise typer.BadParameter(f"unknown {what} {str(value)[:40]!r}; {hint}choose one of: {', '.join(names)}")

    return check


PRESET_HELP = "Named settings; --config and explicit flags override them."


def preset_option(presets: Mapping[str, Any], *, lead: str = PRESET_HELP, also: str = "",
                  described: str | None = None, panel: str = RUN) -> Any:
    """THE ``--preset`` type: a name from ``presets``, refused at parse time otherwise, whose help
    lists what each preset sets (``described``: that list in words, for presets that are not
    settings; ``also``: a further sentence, e.g. another network's presets)."""
    from bats_cli.core.presets import describe_presets

    listing = described if described is not None else describe_presets(presets)
    return Annotated[
        Optional[str],
        typer.Option(
            "--preset",
            metavar="NAME",
            help=f"{lead} {listing}.{' ' + also if also else ''}",
            rich_help_panel=panel,
            callback=choice_callback(presets, "preset"),
        ),
    ]


# --------------------------------------------------------------------------- data

DatasetOpt = Annotated[
    Optional[str],
    typer.Option(
        "--dataset",
        metavar="NAME",
        help="cifar10, cifar100, imagenet, imagefolder, fashion-mnist or fashion-mini "
             "(default: the preset's, or the checkpoint's).",
        rich_help_panel=DATA,
    ),
]
DataDirOpt = Annotated[
    Optional[Path],
    typer.Option(
        "--data-dir",
        help="Where the data set lives (or is downloaded to).",
        envvar="BATS_DATA_DIR",
        file_okay=False,
        rich_help_panel=DATA,
    ),
]
DownloadOpt = Annotated[
    Optional[bool],
    typer.Option(
        "--download/--no-download",
        help="Download the data set if it is missing (torchvision data sets only).",
        rich_help_panel=DATA,
    ),
]
SubsetOpt = Annotated[
    Optional[int],
    typer.Option(
        "--subset",
        min=1,
        max=MAX_IMAGES,
        metavar="N",
        help="Use only N training images (a fixed, seeded subset); for quick tries.",
        rich_help_panel=DATA,
    ),
]
HoldoutOpt = Annotated[
    Optional[int],
    typer.Option(
        "--holdout",
        min=1,
        max=MAX_IMAGES,
        metavar="N",
        help="Validate on N class-balanced training images held out of training instead of the test "
             "split (per-epoch validation and best.safetensors then never read the test split).",
        rich_help_panel=DATA,
    ),
]
ImageSizeOpt = Annotated[
    Optional[int],
    typer.Option(
        "--image-size", min=8, max=MAX_IMAGE_SIZE, metavar="PX", help="Input resolution.", rich_help_panel=DATA
    ),
]

# --------------------------------------------------------------------------- run

SeedOpt = Annotated[
    Optional[int],
    typer.Option("--seed", min=0, max=MAX_SEED, rich_help_panel=RUN,
                 help="Random seed: weights, data order, augmentation, random cells (default: the preset's, "
                      "else 0)."),
]
ResumeOpt = Annotated[
    bool,
    typer.Option(
        "--resume",
        help="Continue the run in --out from its last.safetensors (an error if there is none).",
        rich_help_panel=RUN,
    ),
]
ResumeOrStartOpt = Annotated[
    bool,
    typer.Option("--resume-or-start", rich_help_panel=RUN,
                 help="Like --resume, but start a new run when --out holds no checkpoint yet "
                      "(one command line for the first job and every requeue)."),
]
DeviceOpt = Annotated[
    str,
    typer.Option(
        "--device",
        metavar="auto|cpu|cuda[:N]",
        callback=_check_device,
        help="auto = CUDA when available.",
        rich_help_panel=RUN,
    ),
]
PrecisionOpt = Annotated[
    Optional[Literal["fp32", "bf16", "fp16"]],
    typer.Option(
        "--precision",
        help="Mixed precision for the forward pass (fp16 needs CUDA; bf16 works on CPU too).",
        rich_help_panel=RUN,
    ),
]
NumWorkersOpt = Annotated[
    Optional[int],
    typer.Option(
        "--num-workers", min=0, max=MAX_WORKERS, metavar="N", help="Data-loading worker processes.",
        rich_help_panel=RUN,
    ),
]
ThreadsOpt = Annotated[
    Optional[int],
    typer.Option(
        "--threads",
        min=1,
        max=MAX_THREADS,
        metavar="N",
        rich_help_panel=RUN,
        help="CPU threads (default: the preset's, else torch's choice; 1 is often faster on a busy machine).",
    ),
]
ConfigFileOpt = Annotated[
    Optional[Path],
    typer.Option("--config", dir_okay=False, metavar="FILE", rich_help_panel=RUN,
                 help="JSON settings (e.g. an earlier run's config.json), applied over --preset; "
                      "flags override it."),
]


def run_flag(name: str, help: str) -> Any:
    """An on/off option of the Run panel (default off)."""
    return Annotated[bool, typer.Option(name, rich_help_panel=RUN, help=help)]


PrintConfigOpt = run_flag("--print-config", "Print the resolved settings as JSON and exit.")
DryRunOpt = run_flag("--dry-run", "Print the plan (sizes, steps, peak memory, whether it fits, estimated time) "
                                  "and exit without training.")
IgnorePlanOpt = run_flag("--ignore-plan", "Start even when the plan's peak memory exceeds what is available.")

# --------------------------------------------------------------------------- network (search, train)

GroupPolicyOpt = Annotated[
    Optional[str],
    typer.Option("--group-policy", rich_help_panel=NETWORK,
                 help="groups (fixed number of groups, default) or channels (fixed channels per group) after "
                      "reductions."),
]
ChannelsPerGroupOpt = Annotated[
    Optional[int],
    typer.Option("--channels-per-group", min=1, rich_help_panel=NETWORK,
                 help="Channels per group of the grouped convs (default 3; ImageNet networks 5; §4.1)."),
]
ReduceShortcutOpt = Annotated[
    Optional[str],
    typer.Option("--reduce-shortcut", rich_help_panel=NETWORK,
                 help="Identity connection of stride-2 conv ops: avgpool (default), factorized or none."),
]
ChannelShuffleOpt = Annotated[
    Optional[int],
    typer.Option("--channel-shuffle", min=0, metavar="G", rich_help_panel=NETWORK,
                 help="Channel shuffle in G groups after each grouped conv; 0 = off (default; §4.1 found no gain)."),
]

# --------------------------------------------------------------------------- output

OutOpt = Annotated[
    Optional[Path],
    typer.Option(
        "--out",
        file_okay=False,
        help="Run directory: config.json, metrics.csv, last/best.safetensors (-o always names an "
             "output file).",
        rich_help_panel=OUTPUT,
    ),
]
ForceOpt = Annotated[
    bool,
    typer.Option("--force", rich_help_panel=OUTPUT,
                 help="Overwrite existing output files (never an input)."),
]
JsonOpt = Annotated[
    bool,
    typer.Option("--json", help="Print the result as JSON on stdout instead of tables.", rich_help_panel=OUTPUT),
]
QuietOpt = Annotated[
    bool,
    typer.Option("--quiet", "-q", help="No progress output; errors only.", rich_help_panel=OUTPUT),
]


def input_argument(metavar: str, help: str, kind: Any = Path) -> Any:
    """A command's one input (a file, a run directory, a name), named ``metavar`` in the usage line."""
    return Annotated[kind, typer.Argument(metavar=metavar, help=help)]


def output_option(help: str, *, required: bool = False, metavar: str = "FILE") -> Any:
    """THE ``-o/--output`` type: an output FILE (``--force`` to overwrite it); ``help`` says what
    goes in it."""
    return Annotated[
        Path if required else Optional[Path],
        typer.Option("--output", "-o", dir_okay=False, metavar=metavar, rich_help_panel=OUTPUT, help=help),
    ]


# --------------------------------------------------------------------------- distillation (train, binarize)

TeacherOpt = Annotated[
    Optional[Path],
    typer.Option("--teacher", dir_okay=False, metavar="CKPT", rich_help_panel=DISTILL,
                 help="Distil from this network (any bats train / binarize / packed file of the same data "
                      "set, typically `bats train GENOTYPE --real`): the loss becomes the KL divergence to "
                      "its outputs (ReActNet). It runs frozen, in eval mode, on the same augmented batch; "
                      "its path and sha256 are recorded. Default: none (cross-entropy, the paper's recipe)."),
]
KdTemperatureOpt = Annotated[
    Optional[float],
    typer.Option("--kd-temperature", metavar="T", rich_help_panel=DISTILL,
                 help="Softmax temperature of the distillation loss (scaled by T²). Default 1 (ReActNet)."),
]
KdWeightOpt = Annotated[
    Optional[float],
    typer.Option("--kd-weight", metavar="W", rich_help_panel=DISTILL,
                 help="loss = W·KL + (1−W)·cross-entropy. Default 1: the distributional loss alone (ReActNet)."),
]
AttentionWeightOpt = Annotated[
    Optional[float],
    typer.Option("--attention-weight", metavar="W", rich_help_panel=DISTILL,
                 help="Add W × attention matching of every cell (block) output (Real-to-Binary Nets); the "
                      "teacher must have the student's genotype and stage shapes. Default 0 (off)."),
]
