"""`bats flops`: parameters, FLOPs, BOPs, OPs and model size of a genotype's network (or resnet18)."""

from __future__ import annotations

import json
import sys
from typing import Annotated, Any, Optional

import typer

from bats_cli.cli.app import app
from bats_cli.cli.options import DatasetOpt, JsonOpt, ThreadsOpt
from bats_cli.core.errors import UserInputError


@app.command("flops")
def flops(
    target: Annotated[
        Optional[str],
        typer.Argument(
            metavar="[GENOTYPE|CHECKPOINT|RUN_DIR]",
            help="A genotype .json, a bundled genotype name, resnet18 (Table 5's binary ResNet-18), "
            "a train / binarize / packed checkpoint (its genotype and network settings are read from "
            "the header), a search checkpoint (the evaluation network of the genotype it derives) "
            "or a run directory (its last.safetensors). Default: bats_c10.",
        ),
    ] = None,
    dataset: DatasetOpt = None,
    width: Annotated[
        Optional[str],
        typer.Option(
            "--width",
            metavar="1x|medium|large|2x",
            help="Width preset (channels and groups scale together; 2x = Table 6's "
            "'2x-wider' = 1.5x channels). Default: 1x.",
        ),
    ] = None,
    layers: Annotated[
        Optional[int],
        typer.Option("--layers", metavar="N", help="Number of cells (default: 20 CIFAR, 14 ImageNet)."),
    ] = None,
    channels: Annotated[
        Optional[int],
        typer.Option("--channels", metavar="C", help="Initial channels (instead of --width)."),
    ] = None,
    real: Annotated[
        bool,
        typer.Option("--real", help="The real-valued network (no binary layers)."),
    ] = False,
    as_json: JsonOpt = False,
    verbose: Annotated[
        bool,
        typer.Option("--verbose", "-v", help="Add per-stage and per-op-kind breakdowns."),
    ] = False,
    profile: Annotated[
        bool,
        typer.Option(
            "--profile",
            help="Also measure (batch 1, this CPU) the share of inference time in binary convs "
            "vs BatchNorm, activations, pools, real layers and the rest, on PyTorch fp32 and on "
            "the bitwise engine (random weights: time does not depend on their values).",
        ),
    ] = False,
    threads: ThreadsOpt = None,
) -> None:
    """Count params, FLOPs, BOPs and OPs of one inference (batch 1, auxiliary head excluded).

    FLOPs are real-valued multiply-accumulates (stem, classifier); BOPs are binary ones (convs
    with binarized input); OPs = FLOPs + BOPs/64 (Table 6). BatchNorm, pooling and activations
    are not counted. Sizes: fp32 = 4 bytes a parameter; packed = binary conv weights at 1 bit
    plus everything else at fp32.

    Example: bats flops --dataset imagenet

    Example: bats flops genotypes/darts_v2.json --real --json

    Example: bats flops runs/c10/best.safetensors --verbose

    Example: bats flops runs/search-tiny   (a search: the network of the genotype it derives)
    """
    from bats_cli.pipeline.summary import summary

    for name, value in (("--layers", layers), ("--channels", channels)):
        if value is not None and value < 1:
            raise UserInputError(f"{name} must be a positive integer, got {value}")
    counted = summary(target, dataset=dataset, width=width, layers=layers, channels=channels, real=real,
                      verbose=verbose)
    result = counted.result
    if profile:
        from bats_cli.engine.profile import profile_network
        from bats_cli.training.runloop import restores_threads, set_threads

        @restores_threads
        def measure():
            set_threads(threads)
            return profile_network(counted.model, counted.input_size, warn=lambda line: print(line, file=sys.stderr))

        result["profile"] = measure()
    if as_json:
        sys.stdout.write(json.dumps(result, allow_nan=False) + "\n")
        return
    _print_tables(result, verbose=verbose)


# --------------------------------------------------------------------------- output


def _table(rows, columns: tuple[str, ...], title: str | None = None):
    from rich.table import Table

    from bats_cli.cli.output import console_text

    table = Table(title=title, title_justify="left", show_edge=False)
    for i, col in enumerate(columns):
        table.add_column(col, justify="left" if i == 0 else "right")
    for row in rows:
        table.add_row(*(console_text(cell) for cell in row))
    return table


def _print_tables(result: dict[str, Any], *, verbose: bool) -> None:
    from bats_cli.cli.output import console_text, stdout_console
    from bats_cli.pipeline.summary import breakdown_rows, headline, precision_rows, summary_rows

    console = stdout_console()
    console.print(f"[bold]{console_text(result['genotype'])}[/bold]{console_text(headline(result))}")
    table = _table(summary_rows(result), ("quantity", "value", "what"))
    table.columns[1].justify, table.columns[2].justify, table.columns[2].style = "right", "left", "dim"
    ckpt = result.get("checkpoint")
    if ckpt is not None and ckpt["kind"] == "search":
        console.print(console_text(f"{ckpt['path']} is a search checkpoint: counted {ckpt['counted']}"))
    console.print(table)
    console.print(_table(precision_rows(result), ("precision", "params", "MACs", "memory"),
                         "per precision (larq-style summary)"))
    if "profile" in result:
        _print_profile(console, result["profile"])
    if verbose:
        for by in ("stage", "op"):
            console.print(_table(breakdown_rows(result, by), (by, "layers", "params", "FLOPs", "BOPs", "OPs"),
                                 f"per {by}"))


def _print_profile(console, prof: dict[str, Any]) -> None:
    from rich.table import Table

    from bats_cli.engine.profile import CATEGORIES

    engines = [e for e in ("float", "bitwise") if e in prof]
    t = Table(title=f"measured time per image (batch {prof['batch']}, {prof['threads']} threads, "
                    f"mean of {prof['reps']}; --profile)", title_justify="left", show_edge=False)
    t.add_column("layers")
    for e in engines:
        t.add_column(f"{e} ms", justify="right")
        t.add_column("share", justify="right")
    for cat in CATEGORIES:
        row = [cat]
        for e in engines:
            row += [f"{prof[e]['seconds'][cat] * 1e3:.2f}", f"{100 * prof[e]['share'][cat]:.1f} %"]
        t.add_row(*row)
    total = ["total"]
    for e in engines:
        total += [f"{prof[e]['total_s'] * 1e3:.2f}", "100 %"]
    t.add_row(*total)
    console.print(t)
