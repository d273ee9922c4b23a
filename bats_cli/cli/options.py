"""Option types shared by the long commands, and the one way results reach stdout.

Use them as parameter annotations::

    @app.command()
    def train(genotype: ..., dataset: DatasetOpt = None, seed: SeedOpt = None,
              device: DeviceOpt = "auto", as_json: JsonOpt = False, quiet: QuietOpt = False): ...

Defaults are None where a preset (or the paper default in the command's config model) supplies
the value; pass them to ``bats_cli.config.resolve_config`` as overrides.
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, Optional

import typer

DATA = "Data"
RUN = "Run"
OUTPUT = "Output"

# Far beyond any machine: each is a process / thread, so an absurd value is a fork bomb.
from bats_cli.config import (  # noqa: E402  (one limit for flags and files)
    MAX_IMAGE_SIZE,
    MAX_IMAGES,
    MAX_SEED,
    MAX_THREADS,
    MAX_WORKERS,
)

_DEVICE_RE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


def _check_device(value: str | None) -> str | None:
    if value is not None and not _DEVICE_RE.match(value.strip().lower()):
        raise typer.BadParameter(f"{value!r}: choose auto, cpu, cuda or cuda:N")
    return value.strip().lower() if value is not None else None


DatasetOpt = Annotated[
    Optional[str],
    typer.Option(
        "--dataset",
        help="cifar10, cifar100, imagenet, imagefolder, fashion-mnist or fashion-mini.",
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
SeedOpt = Annotated[
    Optional[int],
    typer.Option("--seed", min=0, max=MAX_SEED, help="Random seed (weights, data order, augmentation).", rich_help_panel=RUN),
]
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
ResumeOpt = Annotated[
    bool,
    typer.Option(
        "--resume",
        help="Continue the run in --out from its last.safetensors (an error if there is none).",
        rich_help_panel=RUN,
    ),
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
        "--num-workers", min=0, max=MAX_WORKERS, metavar="N", help="Data-loading worker processes.", rich_help_panel=RUN
    ),
]
PresetOpt = Annotated[
    Optional[str],
    typer.Option("--preset", help="Named set of settings; explicit flags override it.", rich_help_panel=RUN),
]
ThreadsOpt = Annotated[
    Optional[int],
    typer.Option(
        "--threads",
        min=1,
        max=MAX_THREADS,
        rich_help_panel=RUN,
        help="CPU threads (default: torch's choice; 1 is often faster on a busy machine).",
    ),
]
JsonOpt = Annotated[
    bool,
    typer.Option("--json", help="Print the result as one JSON object on stdout.", rich_help_panel=OUTPUT),
]
QuietOpt = Annotated[
    bool,
    typer.Option("--quiet", "-q", help="No progress output; errors only.", rich_help_panel=OUTPUT),
]


def opt(*names: str, panel: str, **kw: Any) -> Any:
    """``typer.Option(*names, rich_help_panel=panel, **kw)``: a command's own option, in a help panel."""
    return typer.Option(*names, rich_help_panel=panel, **kw)


def path_or_none(path: Path | None) -> str | None:
    """A path option as a config value (configs hold plain strings)."""
    return str(path) if path is not None else None


def is_main_process() -> bool:
    """False on the other ranks under torchrun: only rank 0 prints the result."""
    import os

    return int(os.environ.get("RANK", "0")) == 0


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


def preset_option(presets: Mapping[str, Mapping[str, Any]], *, also: str = "") -> Any:
    """A ``--preset`` type whose help says what each of this command's presets sets (``also``:
    a further sentence, e.g. another network's presets)."""
    from bats_cli.presets import describe_presets

    return Annotated[
        Optional[str],
        typer.Option(
            "--preset",
            metavar="NAME",
            help=f"Named settings; --config and explicit flags override them. "
                 f"{describe_presets(presets)}.{' ' + also if also else ''}",
            rich_help_panel=RUN,
            callback=choice_callback(presets, "preset"),
        ),
    ]


def key_value_table(rows: Iterable[tuple[str, Any]], *, fold: bool = False) -> Any:
    """A borderless two-column rich table: bold keys, values as ``str`` (wrapped with ``fold``)."""
    from rich.table import Table

    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold")
    table.add_column(overflow="fold" if fold else "ellipsis")
    for key, value in rows:
        table.add_row(console_text(key), console_text(value))
    return table


def console_text(value: Any) -> str:
    """``value`` for a rich table or markup string: no escapes, no markup from file contents."""
    from rich.markup import escape

    from bats_cli.names import safe_text

    return escape(safe_text(value))


def pct(value: float | None) -> str:
    """A percentage for a result table; ``-`` when there is none."""
    return "-" if value is None else f"{value:.2f} %"


def _default_table(result: Mapping[str, Any]) -> Any:
    from bats_cli.fileio import to_jsonable

    return key_value_table((key, _cell(value)) for key, value in _flat(to_jsonable(result)).items())


def _flat(obj: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in obj.items():
        if isinstance(v, dict) and v:
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    if value is None:
        return "-"
    if isinstance(value, list):
        return ", ".join(_cell(v) for v in value)
    return str(value)


def stdout_console():
    """A rich console on stdout; piped or redirected, wide enough that tables are not cut
    (rich would assume 80 columns)."""
    from rich.console import Console

    if sys.stdout.isatty():
        return Console(file=sys.stdout, highlight=False)
    width = max(160, int(os.environ.get("COLUMNS", "0") or 0))
    return Console(file=_LinesWithoutTrailingSpaces(sys.stdout), highlight=False, width=width)


class _LinesWithoutTrailingSpaces:
    """A text stream that drops the spaces rich pads table lines with (piped output is diffed and
    grepped, where 160-column padding only gets in the way)."""

    def __init__(self, stream) -> None:
        self._stream = stream
        self._pending = ""

    def write(self, text: str) -> int:
        lines = (self._pending + text).split("\n")
        self._pending = lines.pop()
        for line in lines:
            self._stream.write(line.rstrip() + "\n")
        return len(text)

    def flush(self) -> None:
        if self._pending:
            self._stream.write(self._pending)
            self._pending = ""
        self._stream.flush()

    def isatty(self) -> bool:
        return False

    def fileno(self) -> int:
        return self._stream.fileno()

    @property
    def encoding(self) -> str:
        return getattr(self._stream, "encoding", None) or "utf-8"


def emit_result(
    result: Mapping[str, Any],
    *,
    as_json: bool,
    table_fn: Callable[[Mapping[str, Any]], Any] | None = None,
) -> None:
    """The command's result on stdout: one strict JSON object with ``--json``, else a rich table.

    ``table_fn(result)`` may return any rich renderable (or a str) for a custom human view.
    """
    if as_json:
        # Imported here: bats_cli.fileio imports torch, which `--help` must not pay for.
        from bats_cli.fileio import to_jsonable

        sys.stdout.write(json.dumps(to_jsonable(result), allow_nan=False) + "\n")
        sys.stdout.flush()
        return

    renderable = table_fn(result) if table_fn is not None else _default_table(result)
    stdout_console().print(renderable)


# --------------------------------------------------------------------------- long-run options

DryRunOpt = Annotated[
    bool,
    typer.Option("--dry-run", rich_help_panel=RUN,
                 help="Print the plan (sizes, steps, peak memory, whether it fits, estimated time) "
                      "and exit without training."),
]
ForceOpt = Annotated[
    bool,
    typer.Option("--force", rich_help_panel=RUN,
                 help="Start even when the plan's peak memory exceeds what is available."),
]
ConfigFileOpt = Annotated[
    Optional[Path],
    typer.Option("--config", dir_okay=False, metavar="FILE", rich_help_panel=RUN,
                 help="JSON settings (e.g. an earlier run's config.json), applied over --preset; "
                      "flags override it."),
]
PrintConfigOpt = Annotated[
    bool,
    typer.Option("--print-config", rich_help_panel=RUN,
                 help="Print the resolved settings as JSON and exit."),
]
ResumeOrStartOpt = Annotated[
    bool,
    typer.Option("--resume-or-start", rich_help_panel=RUN,
                 help="Like --resume, but start a new run when --out holds no checkpoint yet "
                      "(one command line for the first job and every requeue)."),
]


def _foreign_files(out: Path) -> str:
    """The first names in ``out`` when it holds files but nothing of a bats run, else ''."""
    try:
        names = sorted(p.name for p in out.iterdir() if not p.name.startswith("."))
    except OSError:
        return ""
    if not names or {"config.json", "metrics.csv", "last.safetensors"} & set(names):
        return ""
    return ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")


def resume_mode(out: Path | None, resume: bool, resume_or_start: bool) -> bool:
    """The library's ``resume`` flag; ``--resume`` of a directory without a checkpoint is refused."""
    from bats_cli.errors import UserInputError

    if resume and resume_or_start:
        raise UserInputError("give --resume or --resume-or-start, not both")
    if not (resume or resume_or_start):
        return False
    flag = "--resume" if resume else "--resume-or-start"
    if out is None:
        raise UserInputError(f"{flag} needs --out DIR (the run directory to continue)")
    from bats_cli.runlock import in_use_message

    busy = in_use_message(out)
    if busy:
        raise UserInputError(busy)
    if resume and not (out / "last.safetensors").is_file() and _foreign_files(out):
        raise UserInputError(
            f"--resume: {out} holds no bats run ({_foreign_files(out)}); give the --out of the run "
            "to continue, or a new --out without --resume"
        )
    if resume and not (out / "last.safetensors").is_file():
        raise UserInputError(
            f"--resume: {out} holds no checkpoint (last.safetensors) to continue; start the run "
            f"without --resume, or use --resume-or-start to start it when there is none"
        )
    return True


def preflight_hook(*, dry_run: bool, force: bool, as_json: bool, quiet: bool) -> Any:
    """The plan hook for a long command (see :mod:`bats_cli.plan`)."""
    from bats_cli.plan import make_preflight

    return make_preflight(dry_run=dry_run, force=force, as_json=as_json, quiet=quiet)


def starting(command: str, what: str, *, quiet: bool) -> None:
    """At a terminal, one line before a long command's slow start (importing torch, reading the
    data, building the network), so it is never silent for long; piped output stays as it was
    (an error is then still the one line on stderr)."""
    if quiet or os.environ.get("RANK", "0") != "0" or not sys.stderr.isatty():
        return
    print(f"{command}: starting: {what}; the plan follows", file=sys.stderr, flush=True)


def run_planned(fn: Callable[[], Any], *, as_json: bool) -> Any:
    """``fn()``; with ``--dry-run`` None (the hook printed the plan's lines on stderr; with
    ``--json`` the plan is printed here, as one JSON object on stdout)."""
    from bats_cli.plan import DryRun, print_plan

    try:
        return fn()
    except DryRun as dry:
        if as_json and dry.plan is not None:
            print_plan(dry.plan, as_json=True)
        return None


def print_config(cfg: Any) -> None:
    """``--print-config``: the resolved settings as indented JSON on stdout."""
    from bats_cli.fileio import to_jsonable

    sys.stdout.write(json.dumps(to_jsonable(cfg), indent=2) + "\n")


# --------------------------------------------------------------------------- distillation (train, binarize)

DISTILL = "Distillation"
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
