"""`bats genotype ...`: inspect, validate, import and list cell genotypes."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from bats_cli.cli.app import app
from bats_cli.cli.options import ForceOpt, JsonOpt, input_argument, output_option
from bats_cli.core.errors import UserInputError
from bats_cli.core.names import exists, safe_text

genotype_app = typer.Typer(
    help=(
        "Cell genotypes: show, validate, import from DARTS code, list the bundled ones.\n\n"
        "Example: bats genotype show bats_c10"
    ),
    no_args_is_help=True,
    rich_markup_mode="rich",
)
app.add_typer(genotype_app, name="genotype")
ImportOutputOpt = output_option("Write the JSON here (default: print it).")
BestOutputOpt = output_option("Write the chosen genotype's JSON here.", required=True)


def _input_label(i: int) -> str:
    # DARTS naming: inputs 0 and 1 are the outputs c(k-2), c(k-1) of the two previous cells.
    return {0: "0 = c(k-2)", 1: "1 = c(k-1)"}.get(i, f"node {i}")


GenotypeArg = input_argument("NAME_OR_FILE", "A genotype .json file or a bundled name (see `bats genotype list`).",
                             kind=str)
GenotypeTextArg = input_argument("TEXT", "'Genotype(normal=[...], ...)', a .py file holding it, or - for stdin.",
                                 kind=str)


@genotype_app.command("show")
def show(
    genotype: GenotypeArg,
    as_json: JsonOpt = False,
    plot: Annotated[
        Optional[Path],
        typer.Option("--plot", metavar="FILE.svg|FILE.png", dir_okay=False,
                     help="Also draw both cells into this file (SVG or PNG; no graphviz needed)."),
    ] = None,
    force: ForceOpt = False,
) -> None:
    """Print a genotype's cells: for every node, its two (op <- input) edges.

    Example: bats genotype show genotypes/darts_v2.json --json

    Example: bats genotype show bats_c10 --plot bats_c10.svg
    """
    from rich.table import Table

    from bats_cli.core.genotype import CELLS
    from bats_cli.core.zoo import resolve_genotype

    g = resolve_genotype(genotype)
    if plot is not None:
        from bats_cli.studies.plot import save_plot
        from bats_cli.utils.outputs import check_output_file

        check_output_file(plot, flag="--plot", force=force)
        written = save_plot(g, plot)
        print(f"wrote {written}", file=sys.stderr)
    if as_json:
        sys.stdout.write(g.to_json())
        return
    from bats_cli.cli.output import console_text, stdout_console

    console = stdout_console()

    console.print(
        f"[bold]{console_text(g.name)}[/bold]  space={g.space}  "
        f"nodes: normal {g.steps('normal')}, reduce {g.steps('reduce')}"
    )
    if g.source:
        console.print(f"source: {safe_text(g.source)}", markup=False)
    if g.notes:
        console.print(f"notes:  {safe_text(g.notes)}", markup=False)
    for cell in CELLS:
        table = Table(title=f"{cell} cell", title_justify="left", show_edge=False)
        table.add_column("node", justify="right")
        table.add_column("edge 1")
        table.add_column("edge 2")
        edges = g.edges(cell)
        for k in range(g.steps(cell)):
            pair = edges[2 * k : 2 * k + 2]
            cells = [f"{e.op} <- {_input_label(e.input)}" for e in pair]
            table.add_row(str(k + 2), *cells)
        console.print(table)
        concat = g.concat(cell)
        console.print(
            "output = concat(" + ", ".join(f"node {i}" for i in concat) + ")\n", markup=False
        )
    console.print("ops used: " + ", ".join(g.ops_used), markup=False)


@genotype_app.command("validate")
def validate(
    files: Annotated[
        list[str], typer.Argument(metavar="FILE", help="Genotype .json files (or bundled names).")
    ],
) -> None:
    """Check genotype files; prints 'ok' per valid file, or one error line and exits 2.

    Example: bats genotype validate genotypes/*.json
    """
    from bats_cli.core.zoo import resolve_genotype

    errors: list[str] = []
    for f in files:
        try:
            g = resolve_genotype(f)
        except UserInputError as exc:
            errors.append(str(exc))
            continue
        print(safe_text(f"ok {f}: {g.name} ({g.space}, {g.steps('normal')}+{g.steps('reduce')} nodes)"))
    if len(errors) == 1:
        raise UserInputError(errors[0])
    if errors:
        raise UserInputError(
            f"{len(errors)} of {len(files)} genotypes are invalid: " + "; ".join(errors)
        )


@genotype_app.command("schema")
def schema() -> None:
    """Print the JSON Schema of a genotype file (for editors and other tools).

    Example: bats genotype schema > genotype.schema.json
    """
    from bats_cli.core.genotype import genotype_json_schema

    sys.stdout.write(json.dumps(genotype_json_schema(), indent=2) + "\n")


@genotype_app.command("list")
def list_(
    as_json: JsonOpt = False,
) -> None:
    """List the bundled genotypes (usable by name wherever a genotype file is expected).

    Example: bats genotype list --json
    """
    from bats_cli.core.zoo import load_zoo_genotype, zoo_names

    rows = []
    for name in zoo_names():
        g = load_zoo_genotype(name)
        rows.append({"name": name, "space": g.space,
                     "nodes": {"normal": g.steps("normal"), "reduce": g.steps("reduce")},
                     "source": g.source or None})
    if as_json:
        sys.stdout.write(json.dumps(rows) + "\n")
        return
    from rich.table import Table

    from bats_cli.cli.output import console_text, stdout_console

    table = Table(show_edge=False)
    for col in ("name", "space", "nodes", "source"):
        table.add_column(col, overflow="fold")
    for row in rows:
        nodes = row["nodes"]
        table.add_row(*(console_text(v) for v in (row["name"], row["space"],
                                                  f"{nodes['normal']}/{nodes['reduce']}", row["source"] or "")))
    stdout_console().print(table)


@genotype_app.command("import")
def import_(
    text: GenotypeTextArg,
    output: ImportOutputOpt = None,
    space: Annotated[
        Optional[str],
        typer.Option("--space", help="bats or darts (default: inferred from the op names)."),
    ] = None,
    name: Annotated[
        Optional[str],
        typer.Option(
            "--name", help="Genotype name (default: the assigned variable, else 'imported')."
        ),
    ] = None,
    pick: Annotated[
        Optional[str],
        typer.Option(
            "--pick", help="Which `NAME = Genotype(...)` to take when the text holds several."
        ),
    ] = None,
    source: Annotated[
        Optional[str], typer.Option("--source", help="Provenance to record (paper, repository).")
    ] = None,
    force: ForceOpt = False,
) -> None:
    """Convert a DARTS-style Python genotype to JSON. Parsed, never executed.

    Example: bats genotype import "Genotype(normal=[('sep_conv_3x3', 1),
    ('skip_connect', 0)], normal_concat=[2], reduce=[('max_pool_3x3', 0),
    ('max_pool_3x3', 1)], reduce_concat=range(2, 3))" -o mine.json --space darts --name mine

    Example: bats genotype import darts/cnn/genotypes.py --pick DARTS_V2 -o darts_v2.json
    """
    from bats_cli.core.darts_import import parse_darts_genotype
    from bats_cli.core.fileio import read_bounded
    from bats_cli.core.genotype import MAX_TEXT_BYTES

    if text == "-":
        body = sys.stdin.read(MAX_TEXT_BYTES + 1)
    elif _names_a_missing_file(text):
        raise UserInputError(
            f"{text}: no such file; give a DARTS genotypes.py file, the text "
            "'Genotype(normal=[...], ...)' itself, or - for stdin"
        )
    elif "Genotype" not in text and exists(text) and Path(text).is_dir():
        raise UserInputError(f"{text}: is a directory; give a DARTS genotypes.py file")
    elif "Genotype" not in text and exists(text):
        raw = read_bounded(text, MAX_TEXT_BYTES, what="a DARTS genotypes.py file")
        try:
            body = raw.decode("utf-8-sig")
        except UnicodeDecodeError:
            raise UserInputError(f"{text}: not a UTF-8 text file") from None
    else:
        body = text
    if output is not None:
        from bats_cli.utils.outputs import check_output_file

        check_output_file(output, flag="--output", force=force,
                          inputs=[text] if text != "-" and "Genotype" not in text else [])
    g = parse_darts_genotype(body, space=space, name=name, pick=pick, source=source)
    if output is None:
        sys.stdout.write(g.to_json())
    else:
        g.save(output)
        print(
            safe_text(f"wrote {output} ({g.name}, {g.space}, {g.steps('normal')}+{g.steps('reduce')} nodes)"),
            file=sys.stderr,
        )


def _check_run_files(runs: list[Path]) -> None:
    """The files `genotype best` reads from each run, checked where they enter: bounded JSON
    objects, and the recorded genotype a valid one."""
    from bats_cli.core.genotype import Genotype
    from bats_cli.storage.rundir import read_json_file

    for run in runs:
        for name in ("result.json", "config.json"):
            if (run / name).is_file():
                data = read_json_file(run / name, what=f"a run's {name}")
                if not isinstance(data, dict):
                    raise UserInputError(f"{run / name}: expected a JSON object")
                if name == "config.json" and data.get("genotype") is not None:
                    Genotype.from_dict(data["genotype"], origin=f"{run / name} (genotype)")


def _names_a_missing_file(text: str) -> bool:
    """True when ``text`` reads as a file name (no Python call in it) that does not exist."""
    stripped = text.strip()
    if not stripped or "Genotype" in text or "(" in text or "\n" in text or exists(text):
        return False
    return "/" in stripped or os.sep in stripped or Path(stripped).suffix.lower() in (".py", ".txt", ".json")


@genotype_app.command("best")
def best(
    runs: Annotated[list[Path], typer.Argument(
        metavar="RUN_DIR", help="Finished `bats train --holdout N` run directories.")],
    output: BestOutputOpt,
    force: ForceOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Keep the genotype of the run with the best top-1 on its held-out training images.

    The selection step of the random-search baseline (`bats ablate random`): runs must have been
    trained with --holdout, so the test split plays no part in the choice.

    Example: bats genotype best runs/cand0 runs/cand1 runs/cand2 -o best.json
    """
    from bats_cli.studies.jobs import best_of_runs
    from bats_cli.utils.outputs import check_output_file

    check_output_file(output, flag="--output", force=force, inputs=[])
    _check_run_files(runs)
    picked = best_of_runs(runs)
    picked["genotype"].save(output)
    report = {"chosen": picked["chosen"], "genotype": picked["genotype"].name, "output": str(output),
              "candidates": picked["candidates"]}
    if as_json:
        sys.stdout.write(json.dumps(report) + "\n")
    for c in picked["candidates"]:
        mark = "*" if c["run"] == picked["chosen"] else " "
        print(safe_text(f"{mark} {c['holdout_top1']:6.2f} % held-out top-1  {c['genotype']}  ({c['run']})"),
              file=sys.stderr)
    print(safe_text(f"wrote {output} ({picked['genotype'].name})"), file=sys.stderr)
